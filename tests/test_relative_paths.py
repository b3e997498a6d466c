"""Every mode with relative and `~` paths, run from a directory other than the repository root.

The README's own command uses a relative --workdir, and Orbax refuses relative
paths: these tests keep every path a user may type working.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

from ocl_jax import configuration, main
from ocl_jax.data import scenes
from tests.conftest import pipeline_test_config

ROOT = pathlib.Path(__file__).parents[1]


def _small(c):
  c = pipeline_test_config(c)
  c.contracam.num_pictures = 2
  c.evaluation.protocols = ("knn",)
  c.evaluation.max_examples = 64
  return c


def test_every_mode_has_a_runner():
  assert set(main.MODE_RUNNERS) == set(configuration.MODES)


def test_every_mode_runs_with_relative_and_home_paths(
    tiny_config, scenes_data_dir, tmp_path, monkeypatch
):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  (tmp_path / "home").mkdir()
  os.symlink(scenes_data_dir, tmp_path / "home" / "tfds")
  c = _small(tiny_config)
  c.dataset.data_dir = os.path.relpath(scenes_data_dir)  # relative to `elsewhere`
  c.evaluation.data_dir = "~/tfds"

  def run(mode, workdir, **fields):
    cfg = c.copy_and_resolve_references()
    cfg.mode = mode
    for field, value in fields.items():
      section, key = field.split("__")
      cfg[section][key] = value
    return main.run_mode(cfg, workdir)

  run("train", "runs/a")
  a = elsewhere / "runs" / "a"
  assert (a / "export" / "model.json").exists() and (a / "config.json").exists()
  run("save_boxes", "runs/a")
  run("save_masks", "runs/a")
  assert (a / "boxes_train.txt").exists() and len(os.listdir(a / "masks_train")) == 256
  run("eval_localization", "runs/a", contracam__max_images=16)
  assert (a / "localization_scenes_tiny_test.md").exists()
  # ContraCAM from another workdir, named relative to the current directory.
  run("save_masks", "runs/cam", contracam__checkpoint="runs/a")
  assert len(os.listdir(elsewhere / "runs" / "cam" / "masks_train")) == 256
  rows = run("eval", "runs/eval", evaluation__checkpoints=("runs/a",))
  assert "scenes/knn/test" in rows["a"]
  # The pipeline, into a ~ workdir: its evaluation reads the stages' exports (the README
  # command's failure). Box files and mask folders are path fields like the others
  # (tests/test_paths.py); the stage configs carry them absolute.
  rows = run("pipeline", "~/runs/p", pipeline__stages=("vanilla", "eval"))
  assert set(rows) == {"vanilla"} and "loc/mask_miou" in rows["vanilla"]
  p = tmp_path / "home" / "runs" / "p"
  assert "| vanilla |" in (p / "results.md").read_text()
  saved = json.load(open(p / "vanilla" / "export" / "model.json"))["config"]
  assert saved["dataset"]["data_dir"] == os.path.abspath(scenes_data_dir)
  # Every mode read the one scenes cache the relative and ~ data dirs name: nothing was
  # rendered anywhere else (the current directory, the default data dir under ~).
  assert os.listdir(os.path.join(scenes_data_dir, "scenes", "tiny")) == [scenes.VERSION]
  assert sorted(os.listdir(elsewhere)) == ["runs"]
  assert not (tmp_path / "home" / "tensorflow_datasets").exists()


def test_cli_with_a_relative_workdir_keeps_the_console_readable(scenes_data_dir, tmp_path):
  """From another directory, a relative --workdir and config path: the run ends, the console
  has the progress bar and no INFO lines or hyperparameters; the log file has them."""
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  config = os.path.relpath(ROOT / "configs" / "scenes.py", elsewhere)
  args = [
      sys.executable,
      "-m",
      "ocl_jax.main",
      f"--config={config}",
      "--workdir=runs/cli",
      f"--config.dataset.data_dir={os.path.relpath(scenes_data_dir, elsewhere)}",
      "--config.dataset.name=scenes/tiny",
      "--config.dataset.image_size=32",
      "--config.augment.crop_size=32",
      "--config.model.arch=resnet10",
      "--config.model.width=4",
      "--config.model.small_stem=True",
      "--config.model.proj_dim=8",
      "--config.batch_size=16",
      "--config.moco.queue_size=64",
      "--config.num_train_steps=2",
      "--config.log_every_steps=1",
      "--config.eval_every_steps=0",
      "--config.view_pictures=2",
  ]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  run = subprocess.run(args, cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  work = elsewhere / "runs" / "cli"
  assert (work / "export" / "model.json").exists() and (work / "views.png").exists()
  console = run.stdout + run.stderr
  assert "Hyperparameters" not in console and "oneDNN" not in console
  assert not [line for line in console.splitlines() if re.match(r"I\d{4} ", line)]
  assert "2/2" in run.stderr  # the training progress bar
  log = (work / "log.txt").read_text()
  assert "Training moco for 2 steps" in log and "] [2] " in log and "Hyperparameters" not in log
  saved = json.load(open(work / "config.json"))
  assert saved["dataset"]["data_dir"] == str(
      pathlib.Path(scenes_data_dir).resolve()
  ) or os.path.samefile(saved["dataset"]["data_dir"], scenes_data_dir)
