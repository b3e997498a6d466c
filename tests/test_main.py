"""End to end: the CLI trains, checkpoints, resumes and exports; COCO under mock data; errors."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ocl_jax import checkpointing, export
from ocl_jax import train
from ocl_jax.configuration import ConfigError, load_sibling_config, validate_config
from ocl_jax.models import ModelSpec

ROOT = pathlib.Path(__file__).parents[1]


def _cli(workdir, data_dir, steps, *extra, env=None):
  args = [
      sys.executable,
      "-m",
      "ocl_jax.main",
      "--config=configs/scenes.py",
      f"--workdir={workdir}",
      f"--config.dataset.data_dir={data_dir}",
      "--config.dataset.name=scenes/tiny",
      "--config.dataset.image_size=32",
      "--config.augment.crop_size=32",
      "--config.model.arch=resnet10",
      "--config.model.width=4",
      "--config.model.small_stem=True",
      "--config.model.proj_dim=8",
      "--config.batch_size=16",
      "--config.moco.queue_size=64",
      f"--config.num_train_steps={steps}",
      "--config.log_every_steps=2",
      "--config.eval_every_steps=2",
      "--config.checkpoint_every_steps=2",
      "--config.probe.eval_batches=1",
      "--verbosity=0",
      *extra,
  ]
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_cli_trains_checkpoints_resumes_and_exports(tmp_path, scenes_data_dir, tiny_config):
  workdir = tmp_path / "run"
  first = _cli(workdir, scenes_data_dir, 4)
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert "loss=" in first.stderr and "eval_probe_accuracy=" in first.stderr
  idle = [float(x) for x in re.findall(r"device_idle_fraction=([0-9.e-]+)", first.stderr)]
  assert len(idle) == 2 and all(0 <= x <= 1 for x in idle)  # logged at steps 2 and 4
  assert "%|" not in first.stderr  # log lines on the console (--verbosity): no progress bar
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  # Started again with a longer schedule, the run continues from step 4; here with the CPU
  # split into 2 devices by --cpu_devices (the suite's XLA_FLAGS device count removed).
  env = {**os.environ, "XLA_FLAGS": ""}
  second = _cli(workdir, scenes_data_dir, 6, "--cpu_devices=2", env=env)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "2 local devices" in second.stderr and "4 local devices" in first.stderr
  assert "Resumed from step 4" in second.stderr
  assert "[6] " in second.stderr and "[2] learning_rate" not in second.stderr
  assert "6" in os.listdir(workdir / "checkpoints")

  # The export holds the encoder of the final state: same features as the checkpoint's.
  module, variables, _, meta, _ = export.load_model(str(workdir / "export"))
  assert meta["model"]["arch"] == "resnet10" and meta["config"]["method"] == "moco"
  tiny_config.num_train_steps = 6
  spec = ModelSpec.from_config(tiny_config)
  ckpt = checkpointing.Checkpointer(str(workdir), spec, tiny_config)
  ctx = train.make_context(tiny_config, 6, 10)
  template = jax.eval_shape(lambda: train.create_train_state(0, tiny_config, ctx))
  state = ckpt.restore_or(template)
  assert int(state.step) == 6
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  net = spec.build(axis_name=None)
  expected = net.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      x,
      train=False,
      method=net.feature_map,
  )
  np.testing.assert_allclose(
      module.apply(variables, x, train=False), expected, rtol=1e-6, atol=1e-6
  )

  # A checkpoint of another model, or of another state layout, is a clear error.
  other = tiny_config.copy_and_resolve_references()
  other.model.width = 8
  with pytest.raises(checkpointing.CheckpointMismatchError, match="model="):
    checkpointing.Checkpointer(str(workdir), ModelSpec.from_config(other), other).restore_or(
        template
    )
  other = tiny_config.copy_and_resolve_references()
  other.moco.queue_size = 128
  ctx2 = train.make_context(other, 6, 10)
  template2 = jax.eval_shape(lambda: train.create_train_state(0, other, ctx2))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="queue"):
    checkpointing.Checkpointer(str(workdir), spec, other).restore_or(template2)


def test_coco_config_trains_under_mock_data(tmp_path):
  config = load_sibling_config(str(ROOT / "configs" / "coco.py"), "coco.py")
  config.method = "simclr"
  config.dataset.image_size = 40
  config.augment.crop_size = 32
  config.model.arch, config.model.width, config.model.small_stem = "resnet10", 4, True
  config.batch_size = 8
  config.num_train_steps = 2
  config.log_every_steps = config.checkpoint_every_steps = config.eval_every_steps = 2
  config.probe.eval_batches = 1
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  assert np.all(np.isfinite(jax.tree_util.tree_leaves(state.params)[0]))
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
  assert (tmp_path / "export" / "model.json").exists()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("method", "swav", "config.method"),
        ("batch_size", 6, "not divisible by the 4 devices"),
        ("moco.queue_size", 100, "config.moco.queue_size"),
        ("optim.base_lr", -0.1, "config.optim.base_lr"),
        ("model.arch", "vit", "config.model.arch"),
        ("augment.flip_prob", 1.5, "flip_prob"),
        ("augment.scale", (0.5, 0.2), "scale"),
        ("moco.temperature", 0.0, "config.moco.temperature"),
        ("mode", "fly", "config.mode"),
        ("contracam.crf_bilateral_srgb", 0.0, "config.contracam.crf_bilateral_srgb"),
        ("contracam.crf_iterations", 0, "config.contracam.crf_iterations"),
        ("dataset.train_image_size", -1, "config.dataset.train_image_size"),
    ],
)
def test_invalid_config_values_are_named(field, value, message):
  config = load_sibling_config(str(ROOT / "configs" / "demo.py"), "demo.py")
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    validate_config(config, num_devices=4, num_processes=1)


def test_shipped_configs_are_valid(tmp_path):
  box_file = tmp_path / "boxes_train.txt"
  box_file.write_text("1 0.1,0.1,0.5,0.5\n")
  for path in sorted((ROOT / "configs").glob("*.py")):
    config = load_sibling_config(str(path), path.name)
    if path.name.endswith("_cam.py"):  # the box file is a required command-line value
      with pytest.raises(ConfigError, match="object_aware.boxes"):
        validate_config(config, num_devices=4, num_processes=1)
      config.object_aware.boxes = str(box_file)
    if path.name.startswith("in9"):  # ImageNet-9 folders (and masks) are required values
      with pytest.raises(ConfigError) as err:
        validate_config(config, num_devices=4, num_processes=1)
      required = ["dataset.name", "evaluation.folders.imagenet9"]
      required += ["bg_mixup.masks"] if config.bg_mixup.enabled else []
      for field in required:
        assert f"config.{field}:" in str(err.value), (path.name, field)
      config.dataset.name = f"folder:{tmp_path}"
      config.evaluation.folders.imagenet9 = config.bg_mixup.masks = str(tmp_path)
    validate_config(config, num_devices=4, num_processes=1)


def test_paper_configs_use_the_release_contracam_score():
  """coco* and in9* (the paper's datasets) make boxes and masks with the release's score;
  the others keep the default per-image form."""
  paper = sorted(ROOT.glob("configs/coco*.py")) + sorted(ROOT.glob("configs/in9*.py"))
  assert len(paper) >= 6
  for path in paper:
    assert load_sibling_config(str(path), path.name).contracam.official_score is True, path.name
  for name in ("default.py", "scenes.py", "demo.py"):
    assert load_sibling_config(str(ROOT / "configs" / name), name).contracam.official_score is False


def test_a_config_typo_is_one_line_not_a_traceback(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "ocl_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}"]
      + ["--config.batchsize=3"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert run.returncode == 2
  assert "Traceback" not in run.stderr
  assert 'Did you mean "batch_size" instead of "batchsize"?' in run.stderr
  assert "\\n" not in run.stderr and len(run.stderr.strip().splitlines()) == 2


def test_an_error_is_one_paragraph_on_the_console_and_its_traceback_in_the_log(
    tmp_path, scenes_data_dir
):
  """A damaged stage marker stops the pipeline with a short paragraph naming the file;
  the traceback is in log.txt only."""
  marker = tmp_path / "vanilla" / "stage_done.json"
  marker.parent.mkdir(parents=True)
  marker.write_text('{"stage": "vani')
  run = subprocess.run(
      [sys.executable, "-m", "ocl_jax.main", "--config=configs/scenes.py"]
      + [f"--workdir={tmp_path}", "--config.mode=pipeline", "--config.dataset.name=scenes/tiny"]
      + [f"--config.dataset.data_dir={scenes_data_dir}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr
  assert f"Error (ValueError): {marker} (the marker of the finished stage vanilla)" in run.stderr
  assert f"(The traceback is in {tmp_path / 'log.txt'}.)" in run.stderr
  assert "Traceback" in (tmp_path / "log.txt").read_text()


def test_eval_on_a_damaged_checkpoint_is_a_short_paragraph(tmp_path, scenes_data_dir):
  """The library's own tracebacks (Orbax's closed event loop, in callbacks) go to log.txt;
  the console gets the error naming the checkpoint and the array."""
  run = _cli(tmp_path / "run", scenes_data_dir, 2, "--config.export_encoder=False")
  assert run.returncode == 0, run.stderr[-3000:]
  files = sorted(
      (p for p in (tmp_path / "run" / "checkpoints" / "2" / "state").rglob("*") if p.is_file()),
      key=lambda p: p.stat().st_size,
  )
  raw = bytearray(files[-1].read_bytes())
  raw[100:4196] = bytes(min(4096, len(raw) - 100))
  files[-1].write_bytes(bytes(raw))
  run = subprocess.run(
      [sys.executable, "-m", "ocl_jax.main", "--config=configs/scenes.py"]
      + [f"--workdir={tmp_path / 'eval'}", "--config.mode=eval"]
      + [f"--config.evaluation.checkpoints=('{tmp_path / 'run'}',)"]
      + ["--config.dataset.name=scenes/tiny", f"--config.dataset.data_dir={scenes_data_dir}"]
      + ["--config.dataset.image_size=32", "--config.model.arch=resnet10"]
      + ["--config.model.width=4", "--config.model.small_stem=True", "--config.model.proj_dim=8"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) <= 6, run.stderr
  assert f"Error (CheckpointCorruptError): checkpoint {tmp_path / 'run'}" in run.stderr
