"""Multi-process data parallelism: per-process input slices, 2 processes = 1 process, resume.

The input tests fake the process count in one process; the end-to-end test starts
2 CPU processes x 2 devices over localhost (gloo) and 1 process x 4 devices with the
launch scripts, and compares their losses and the resume of one from the other.
"""

import itertools
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import numpy as np
from PIL import Image

from ocl_jax.data import eval_data
from ocl_jax.data import train_data
from tests.conftest import make_tiny_config

ROOT = pathlib.Path(__file__).parents[1]


def _as_process(monkeypatch, index, count):
  monkeypatch.setattr(jax, "process_index", lambda *a, **k: index)
  monkeypatch.setattr(jax, "process_count", lambda *a, **k: count)


def _flat(batch):
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def _process_batches(config, monkeypatch, count, start, steps):
  """Each of `count` faked processes' train batches [start, start + steps), as host arrays."""
  out = []
  for p in range(count):
    _as_process(monkeypatch, p, count)
    data = train_data.create_train_data(config)
    assert data.local_batch == config.batch_size // count
    out.append([_flat(b) for b in itertools.islice(data.iterate(start), steps)])
  monkeypatch.undo()
  return out


def _assert_slices_make_up(config, monkeypatch, start, steps):
  """Process p's batch at every step is slice p of the single-process global batch."""
  single = _process_batches(config, monkeypatch, 1, start, steps)[0]
  parts = _process_batches(config, monkeypatch, 2, start, steps)
  for step, whole in enumerate(single):
    for key, value in whole.items():
      np.testing.assert_array_equal(
          np.concatenate([parts[p][step][key] for p in range(2)]), value, err_msg=f"{step} {key}"
      )


def test_process_slices_make_up_the_global_batches(tiny_config, monkeypatch):
  spe = train_data.create_train_data(tiny_config).steps_per_epoch
  _assert_slices_make_up(tiny_config, monkeypatch, 0, 3)
  _assert_slices_make_up(tiny_config, monkeypatch, spe - 1, 2)  # resumed, across an epoch


def test_folder_process_slices_make_up_the_global_batches(tmp_path, monkeypatch):
  for label, name in enumerate(("a", "b")):
    (tmp_path / name).mkdir()
    for i in range(12):
      Image.fromarray(np.full((20, 24, 3), 20 * i + label, np.uint8)).save(
          tmp_path / name / f"{i}.png"
      )
  (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
  c = make_tiny_config("unused")
  c.dataset.name = f"folder:{tmp_path}"
  c.batch_size = 8
  _assert_slices_make_up(c, monkeypatch, 0, 4)  # 25 files: 3 steps per epoch, one unreadable
  _assert_slices_make_up(c, monkeypatch, 2, 2)


def test_eval_batches_of_uneven_shards_have_equal_counts(tiny_config, monkeypatch):
  split = "test[:33]"  # 17 + 16 examples: 3 and 2 batches of 8 before padding
  ref = [_flat(b) for b in eval_data.eval_batches(tiny_config, split)]
  shards = []
  for p in range(2):
    _as_process(monkeypatch, p, 2)
    shards.append([_flat(b) for b in eval_data.eval_batches(tiny_config, split)])
    assert len(shards[-1]) == 3 and all(b["image"].shape[0] == 8 for b in shards[-1])
    capped = list(eval_data.eval_batches(tiny_config, split, max_batches=2))
    assert len(capped) == 2
  monkeypatch.undo()
  valid = lambda batches, key: np.concatenate([b[key][b["valid"] > 0] for b in batches])
  for key in ("label", "image"):  # every example once, in the single-process order
    np.testing.assert_array_equal(np.concatenate([valid(s, key) for s in shards]), valid(ref, key))


def _train_flags(data_dir, workdir, steps):
  return [
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
      # Warm-up longer than the run: the lr of a step does not depend on num_train_steps.
      "--config.optim.warmup_steps=100",
      f"--config.num_train_steps={steps}",
      "--config.log_every_steps=1",
      "--config.checkpoint_every_steps=2",
      "--config.eval_every_steps=4",
      "--config.dataset.eval_split=test[:33]",
      "--config.probe.eval_batches=-1",
      "--config.view_pictures=0",
      "--verbosity=0",
      # BG-mixup draws donors and keeps its FIFO over the global batch: 2 x 2 = 1 x 4 too.
      "--config.bg_mixup.enabled=True",
      "--config.bg_mixup.prob=0.7",
  ]


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the scripts set devices
  env.update(
      PYTHON=sys.executable,
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="2",
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  # Kept between test runs: compiling the steps is most of this test's time.
  env.setdefault(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(tempfile.gettempdir(), "ocl_jax_test_compilation_cache"),
  )
  return env


def _start(script_args, log_path):
  log = open(log_path, "w")
  return (
      subprocess.Popen(
          ["bash", *script_args], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
      ),
      log,
  )


def _finish(run, timeout=600):
  proc, log = run
  try:
    code = proc.wait(timeout=timeout)
  finally:
    proc.kill()
    log.close()
  text = pathlib.Path(log.name).read_text()
  assert code == 0, text[-4000:]
  return text


def _scalars(text, name, prefix=""):
  """{step: value} of a logged scalar (lines of `prefix` only)."""
  pattern = re.compile(rf"^{re.escape(prefix)}.*\] \[(\d+)\] .*\b{name}=([-+.\w]+)", re.M)
  return {int(s): float(v) for s, v in pattern.findall(text)}


def test_two_processes_train_like_one_and_resume_on_one(tmp_path, scenes_data_dir):
  two, one = tmp_path / "two", tmp_path / "one"
  # 1 process x 4 devices, 6 steps (the reference) and 2 processes x 2 devices, 4 steps.
  ref = _start(
      ["launch/local.sh", "4", *_train_flags(scenes_data_dir, one, 6)], tmp_path / "one.log"
  )
  multi = _start(
      ["launch/local_multiprocess.sh", "2", "2", *_train_flags(scenes_data_dir, two, 4)],
      tmp_path / "two.log",
  )
  ref_log, multi_log = _finish(ref), _finish(multi)
  assert "JAX process 1/2, 2 local devices" in multi_log and "4 devices in all" in multi_log
  want = _scalars(ref_log, "loss")
  got = _scalars(multi_log, "loss", "[p0] ")
  assert sorted(want) == [1, 2, 3, 4, 5, 6] and sorted(got) == [1, 2, 3, 4]
  assert _scalars(multi_log, "loss", "[p1] ") == got  # every process logs the global mean
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-4)
  mixed_ref, mixed_two = _scalars(ref_log, "bg_mixup/mixed"), _scalars(
      multi_log, "bg_mixup/mixed", "[p0] "
  )
  assert sum(mixed_ref.values()) > 0 and all(mixed_two[s] == mixed_ref[s] for s in mixed_two)
  # The online probe's evaluation of uneven shards (17 + 16 test images) counts each once.
  acc_ref, acc_two = _scalars(ref_log, "eval_probe_accuracy"), _scalars(
      multi_log, "eval_probe_accuracy", "[p0] "
  )
  assert abs(acc_two[4] - acc_ref[4]) <= 1.5 / 33, (acc_two, acc_ref)
  assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]
  assert (two / "export" / "model.json").exists()

  # The 2-process checkpoint resumes in 1 process and continues like the reference.
  resumed = _finish(
      _start(
          ["launch/local.sh", "4", *_train_flags(scenes_data_dir, two, 6)], tmp_path / "resumed.log"
      )
  )
  assert "Resumed from step 4" in resumed
  after = _scalars(resumed, "loss")
  assert sorted(after) == [5, 6]
  np.testing.assert_allclose([after[5], after[6]], [want[5], want[6]], rtol=1e-4)
  assert "6" in os.listdir(two / "checkpoints")
