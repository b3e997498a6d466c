"""The package on a plain JAX install: without TensorFlow, TensorFlow Datasets and clu.

Accelerator images often have JAX, flax, optax and orbax but none of those three.
Every library module must import there except the tf.data readers of TFDS datasets and
image folders, and the main job must run on `scenes` (tests/without_tensorflow.py makes
the three unimportable in a subprocess, as if they were not installed).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from ocl_jax import pipeline

ROOT = pathlib.Path(__file__).parents[1]
RUNNER = ROOT / "tests" / "without_tensorflow.py"
# The modules that may need TensorFlow: the tf.data readers and their shared preprocessing.
TF_READERS = {"ocl_jax.data.tf_readers", "ocl_jax.data.preprocess"}
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
sys.path.insert(0, {tests!r})
import without_tensorflow
without_tensorflow.block()
import ocl_jax
result = {{}}
for m in sorted(pkgutil.walk_packages(ocl_jax.__path__, "ocl_jax."), key=lambda m: m.name):
  try:
    importlib.import_module(m.name)
    result[m.name] = ""
  except ImportError as e:
    result[m.name] = e.name or str(e)  # the module that could not be imported
blocked = {blocked!r}
loaded = sorted(k for k, v in sys.modules.items() if v is not None and k.split(".")[0] in blocked)
print(json.dumps({{"modules": result, "loaded": loaded}}))
"""


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  return env


def test_every_library_module_imports_without_tensorflow_tfds_or_clu():
  script = _IMPORT_ALL.format(tests=str(ROOT / "tests"), blocked=BLOCKED)
  out = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=ROOT
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  modules = report["modules"]
  assert len(modules) > 40 and "ocl_jax.train.loop" in modules
  needs_blocked = {
      name: error for name, error in modules.items() if error and error.split(".")[0] in BLOCKED
  }
  # The blocker works: the readers do need TensorFlow ...
  assert set(needs_blocked) >= TF_READERS, needs_blocked
  # ... and nothing else does.
  assert set(needs_blocked) == TF_READERS, {
      k: v for k, v in needs_blocked.items() if k not in TF_READERS
  }
  assert report["loaded"] == []


def test_the_tiny_main_job_runs_all_six_stages_without_tensorflow(scenes_data_dir, tmp_path):
  """The main job's six stages on scenes/tiny, then again (nothing redone), then with the
  bgmix stage's marker lost (it resumes from its checkpoint): all without TF, TFDS, clu."""
  config = tmp_path / "tiny_pipeline.py"
  config.write_text(textwrap.dedent(f"""
          from tests.conftest import make_tiny_config, pipeline_test_config


          def get_config():
            return pipeline_test_config(make_tiny_config({scenes_data_dir!r}))
          """))
  work = tmp_path / "work"
  cmd = [
      sys.executable,
      str(RUNNER),
      "-m",
      "ocl_jax.main",
      f"--config={config}",
      f"--workdir={work}",
  ]

  def run():
    """The console and the log lines of one run (log.txt is appended to)."""
    before = (work / "log.txt").read_text() if (work / "log.txt").exists() else ""
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr + (work / "log.txt").read_text()[len(before) :]

  log = run()
  assert "Stage 6/6: eval" in log
  # The console says where ContraCAM wrote; the log has every checkpoint save.
  assert f"Wrote 256 masks to {work / 'contracam' / 'masks_train'}" in log
  assert f"to {work / 'contracam' / 'boxes_train.txt'}" in log
  assert f"Saving the checkpoint of step 2 to {work / 'vanilla' / 'checkpoints'}" in log
  table = (work / "results.md").read_text()
  for model in ("vanilla", "oacrop", "bgmix", "sgcl"):
    assert f"| {model} |" in table, table
  rows = json.loads((work / "results.json").read_text())
  assert "scenes/linear/test" in json.dumps(rows) and "loc/mask_miou" in json.dumps(rows)
  boxes = work / "contracam" / "boxes_train.txt"
  masks = work / "contracam" / "masks_train"
  assert len(boxes.read_text().splitlines()) == 256 and len(os.listdir(masks)) == 256
  for stage, section, field, want in (
      ("oacrop", "object_aware", "boxes", str(boxes)),
      ("bgmix", "bg_mixup", "masks", str(masks)),
  ):
    cfg = json.loads((work / stage / "export" / "model.json").read_text())["config"]
    assert cfg[section][field] == want
  assert (work / "sgcl" / "saliency.png").exists()
  timing = json.loads((work / "vanilla" / pipeline.DONE_FILE).read_text())["timing"]
  assert timing["steps"] == 2 and timing["first_step_seconds"] > 0 and timing["platform"] == "cpu"
  assert 0 <= timing["device_idle_fraction"] <= 1 and timing["steps_per_second"] > 0
  assert list((work / "vanilla").glob("events.out.tfevents.*")), "no TensorBoard events"

  log = run()
  assert log.count("already done") == 6
  os.remove(work / "bgmix" / pipeline.DONE_FILE)
  log = run()
  assert "Resumed from step 2" in log and log.count("already done") == 5


@pytest.mark.parametrize("name", ["scenes/tiny", "scenes/nope"])
def test_scenes_is_read_without_tensorflow(scenes_data_dir, name):
  """sources.get_builder gives the array source of a scenes name, or a clear error."""
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(ROOT / "tests")!r})
      import without_tensorflow
      without_tensorflow.block()
      from ocl_jax.data import sources
      try:
        b = sources.get_builder({name!r}, {scenes_data_dir!r})
        print(sources.kind(b), b.num_examples("train"), sources.num_classes(b))
      except Exception as e:
        print(type(e).__name__, e)
      """)
  out = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=ROOT
  )
  assert out.returncode == 0, out.stderr[-2000:]
  if name == "scenes/tiny":
    assert out.stdout.split() == ["arrays", "256", "10"]
  else:
    assert "DatasetNotFoundError" in out.stdout and "scenes/tiny" in out.stdout
