"""Checkpoint faults, injected: damaged newest checkpoints fall back to the previous one, an
error in the loop leaves complete checkpoints, a config that does not fit is named before Orbax
reads an array, and the workdir lock refuses a second run."""

import json
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ocl_jax import checkpointing, export, train, workdir_lock
from ocl_jax.models import ModelSpec
from tests.conftest import export_random_init, make_tiny_config


def _config(data_dir, steps=4):
  c = make_tiny_config(data_dir)
  c.num_train_steps = steps
  c.log_every_steps = c.checkpoint_every_steps = 2
  c.eval_every_steps = 0
  c.export_encoder = False
  return c


@pytest.fixture(scope="module")
def trained(scenes_data_dir, tmp_path_factory):
  """A workdir with the checkpoints of steps 2 and 4 of the tiny config (made once)."""
  workdir = tmp_path_factory.mktemp("trained") / "work"
  train.train_and_evaluate(_config(scenes_data_dir), str(workdir))
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  work = tmp_path / "work"
  shutil.copytree(trained, work)
  return work


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The checkpoint's array data files (OCDBT), largest first."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _resume(config, workdir, caplog):
  with caplog.at_level(logging.INFO):
    state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == config.num_train_steps
  return caplog.text


def _assert_fell_back(workdir, log):
  ckpts = workdir / "checkpoints"
  assert f"Resuming from checkpoint {ckpts}/2" in log
  assert "Resumed from step 2" in log
  assert (workdir / "checkpoints.corrupt" / "4").is_dir()
  assert (ckpts / "4").is_dir()  # written again


def test_garbled_array_bytes_fall_back_to_the_previous_checkpoint(workdir, scenes_data_dir, caplog):
  path = _array_files(workdir / "checkpoints" / "4")[0]
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 64):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))
  log = _resume(_config(scenes_data_dir), workdir, caplog)
  ckpts = workdir / "checkpoints"
  assert re.search(
      rf"checkpoint {ckpts}/4 is (corrupt|unreadable): array [\w.]+ (does not match the digest|"
      "cannot be read)",
      log,
  ), log
  _assert_fell_back(workdir, log)


def _restore_warnings(config, workdir, caplog) -> tuple[int, str]:
  """Resume `workdir` through the Checkpointer alone (no training): (restored step, warnings)."""
  ckpt = checkpointing.Checkpointer(str(workdir), ModelSpec.from_config(config), config)
  template = train.create_train_state(0, config, train.make_context(config, 4, 10))
  with caplog.at_level(logging.WARNING):
    state = ckpt.restore_or(template)
  ckpt.close()
  return int(state.step), caplog.text


def test_truncated_array_file_is_named_and_falls_back(workdir, scenes_data_dir, caplog):
  path = _array_files(workdir / "checkpoints" / "4")[0]
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  step, log = _restore_warnings(_config(scenes_data_dir), workdir, caplog)
  ckpts = workdir / "checkpoints"
  assert step == 2
  assert re.search(
      rf"checkpoint {ckpts}/4 is unreadable: array [\w.]+ cannot be read from " rf"{ckpts}/4/state",
      log,
  ), log
  assert f"Resuming from checkpoint {ckpts}/2" in log
  assert (workdir / "checkpoints.corrupt" / "4").is_dir() and not (ckpts / "4").exists()


@pytest.mark.parametrize("item", ["meta/metadata", "state/_METADATA"])
def test_truncated_metadata_json_is_named_and_falls_back(workdir, scenes_data_dir, caplog, item):
  path = workdir / "checkpoints" / "4" / item
  path.write_text(path.read_text()[:100])
  step, log = _restore_warnings(_config(scenes_data_dir), workdir, caplog)
  assert step == 2
  assert f"checkpoint {workdir / 'checkpoints'}/4 is unreadable" in log
  assert str(path.parent) in log and "JSONDecodeError" in log
  assert f"Resuming from checkpoint {workdir / 'checkpoints'}/2" in log


def test_nonfinite_stop_before_any_checkpoint_says_so(scenes_data_dir, tmp_path):
  c = _config(scenes_data_dir)
  ckpt = checkpointing.Checkpointer(str(tmp_path), ModelSpec.from_config(c), c)
  with pytest.raises(train.NonFiniteError) as e:
    train.loop.check_finite([{"nonfinite": np.ones(1)}], 1, "stop", ckpt)
  assert "before any checkpoint was written" in str(e.value)
  assert "step None" not in str(e.value)


def test_an_error_in_the_loop_propagates_and_leaves_complete_checkpoints(
    scenes_data_dir, tmp_path, monkeypatch, caplog
):
  c = _config(scenes_data_dir)
  c.eval_every_steps = 1
  calls = []

  def probe(*args):
    calls.append(1)
    if len(calls) == 3:  # step 3, while step 2's save may still be in flight
      raise RuntimeError("probe exploded")
    return 0.5

  monkeypatch.setattr(train.loop, "evaluate_probe", probe)
  with pytest.raises(RuntimeError, match="probe exploded"):
    train.train_and_evaluate(c, str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  assert not [p for p in ckpts.iterdir() if "orbax-checkpoint-tmp" in p.name]
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2"]
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()  # released
  # Restorable, digests verified.
  ckpt = checkpointing.Checkpointer(str(tmp_path), ModelSpec.from_config(c), c)
  template = train.create_train_state(0, c, train.make_context(c, 4, 10))
  with caplog.at_level(logging.INFO):
    state = ckpt.restore_or(template)
  ckpt.close()
  assert int(state.step) == 2 and "no digests" not in caplog.text


def test_another_queue_size_names_the_field_before_orbax_reads(workdir, scenes_data_dir):
  c = _config(scenes_data_dir)
  c.moco.queue_size = 128
  with pytest.raises(checkpointing.CheckpointMismatchError) as e:
    train.train_and_evaluate(c, str(workdir))
  assert "moco.queue_size 64 (checkpoint) vs 128 (config)" in str(e.value)
  assert "queue has shape (64, 8) in the checkpoint, the config expects (128, 8)" in str(e.value)


def test_another_crop_size_names_it_for_the_bg_mixup_fifo(scenes_data_dir, tmp_path):
  """The FIFO holds views, (fifo_size, crop, crop, 3): the new crop size is named, not the
  batch size, which changed too but shapes no array."""
  c = _config(scenes_data_dir)
  c.bg_mixup.enabled = True
  ckpt = checkpointing.Checkpointer(str(tmp_path), ModelSpec.from_config(c), c)
  ckpt.save(2, jax.device_get(train.create_train_state(0, c, train.make_context(c, 4, 10))))
  ckpt.close()
  c.augment.crop_size, c.batch_size = 24, 32
  ckpt = checkpointing.Checkpointer(str(tmp_path), ModelSpec.from_config(c), c)
  template = train.create_train_state(0, c, train.make_context(c, 4, 10))
  with pytest.raises(checkpointing.CheckpointMismatchError) as e:
    ckpt.restore_or(template)
  ckpt.close()
  assert "bg_fifo.images has shape (50, 32, 32, 3) in the checkpoint" in str(e.value)
  assert "augment.crop_size 32 (checkpoint) vs 24 (config)" in str(e.value)
  assert "batch_size" not in str(e.value)


def test_another_model_names_the_model_field(workdir, scenes_data_dir):
  c = _config(scenes_data_dir)
  c.model.width = 8
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"model\.width 4 .* vs 8"):
    train.train_and_evaluate(c, str(workdir))


def test_nonfinite_parameters_in_a_checkpoint_are_an_error_naming_it(scenes_data_dir, tmp_path):
  c = _config(scenes_data_dir)
  spec = ModelSpec.from_config(c)
  state = jax.device_get(train.create_train_state(0, c, train.make_context(c, 4, 10)))
  params = jax.tree_util.tree_map(np.array, state.params)
  jax.tree_util.tree_leaves(params)[0][...] = np.nan
  ckpt = checkpointing.Checkpointer(str(tmp_path), spec, c)
  ckpt.save(2, state.replace(params=params))
  ckpt.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path), spec, c)
  with pytest.raises(checkpointing.NonFiniteCheckpointError) as e:
    ckpt.restore_or(state)
  ckpt.close()
  assert f"checkpoint {tmp_path / 'checkpoints'}/2 holds non-finite values in params." in str(
      e.value
  )
  assert "base_lr" not in str(e.value)


def test_a_second_run_on_a_locked_workdir_is_refused(scenes_data_dir, tmp_path):
  lock = tmp_path / workdir_lock.LOCK_NAME
  holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": "2026-01-01T00:00"}
  lock.write_text(json.dumps(holder))
  with pytest.raises(workdir_lock.WorkdirLockedError) as e:
    train.train_and_evaluate(_config(scenes_data_dir), str(tmp_path))
  assert f"its lock {lock} is held by PID {os.getppid()} on host {socket.gethostname()}" in str(
      e.value
  )
  assert json.loads(lock.read_text()) == holder  # left alone
  assert not (tmp_path / "checkpoints").exists()


def test_a_stale_lock_is_taken_over(workdir, scenes_data_dir, caplog):
  gone = subprocess.Popen(["true"])
  gone.wait()
  lock = workdir / workdir_lock.LOCK_NAME
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(_config(scenes_data_dir), str(workdir))
  assert f"Taking over the stale lock {lock} of PID {gone.pid}" in caplog.text
  assert not lock.exists()


def test_resuming_under_another_config_names_every_changed_field(workdir, scenes_data_dir, caplog):
  c = _config(scenes_data_dir, steps=6)
  c.optim.base_lr = 0.5
  log = _resume(c, workdir, caplog)
  line = next(x for x in log.splitlines() if "under another config" in x)
  assert "optim.base_lr" in line and "(checkpoint) vs 0.5 (config)" in line
  assert "num_train_steps 4 (checkpoint) vs 6 (config)" in line
  assert "batch_size" not in line  # unchanged fields are not named
  caplog.clear()
  log = _resume(c, workdir, caplog)  # nothing left to do; the same config: no warning
  assert "under another config" not in log


def test_a_damaged_export_is_refused_naming_it(scenes_data_dir, tmp_path, caplog):
  """Random overwrites of an export's array files: each either leaves the loaded weights
  exactly as written (the bytes hit a part Orbax does not read) or is an error naming the
  export (a digest mismatch or an unreadable file); never other weights loaded in silence.
  An export written before digests existed loads, unverified, with a log line."""
  _, good = export_random_init(make_tiny_config(scenes_data_dir), str(tmp_path / "run"))
  want = export.load_model(good, head=True).variables
  data_files = sorted(
      p
      for p in pathlib.Path(good).rglob("*")
      if p.is_file() and "/d/" in str(p) and p.stat().st_size
  )
  assert data_files
  rng = np.random.default_rng(0)
  refused = 0
  for trial in range(12):
    copy = tmp_path / f"damaged{trial}"
    shutil.copytree(good, copy)
    victim = copy / data_files[trial % len(data_files)].relative_to(good)
    raw = bytearray(victim.read_bytes())
    start = int(rng.integers(0, max(1, len(raw) - 64)))
    raw[start : start + 64] = rng.integers(0, 256, min(64, len(raw) - start), np.uint8).tobytes()
    victim.write_bytes(bytes(raw))
    try:
      got = export.load_model(str(copy), head=True).variables
    except checkpointing.CheckpointCorruptError as e:
      assert f"export {copy}" in str(e)
      refused += 1
      continue
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  assert refused >= 3  # the overwrites that reach the arrays

  older = tmp_path / "older"
  shutil.copytree(good, older)
  meta = json.loads((older / "model.json").read_text())
  del meta["digests"]
  (older / "model.json").write_text(json.dumps(meta))
  with caplog.at_level(logging.INFO):
    got = export.load_model(str(older), head=True).variables
  assert "loaded unverified" in caplog.text
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


_LOCK_TAKER = """
import json, os, sys, time
from ocl_jax import workdir_lock
workdir, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
  time.sleep(0.001)
try:
  with workdir_lock.WorkdirLock(workdir):
    got = time.time()
    time.sleep(0.1)
    print(json.dumps([got, time.time()]))
except workdir_lock.WorkdirLockedError:
  print("refused")
"""


def test_a_stale_lock_is_taken_over_by_exactly_one_of_simultaneous_runs(tmp_path):
  """Five processes started together on a workdir whose lock a killed run left: in every
  trial at least one of them holds the lock, and never two at once."""
  gone = subprocess.Popen(["true"])
  gone.wait()
  lock = tmp_path / workdir_lock.LOCK_NAME
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
  for _ in range(8):
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    start = time.time() + 1.5  # past every interpreter's start-up
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOCK_TAKER, str(tmp_path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(5)
    ]
    held = []
    for p in procs:
      out, _ = p.communicate(timeout=60)
      assert p.returncode == 0, out
      if out.strip() != "refused":
        held.append(json.loads(out))
    assert held
    held.sort()
    assert all(a[1] <= b[0] for a, b in zip(held, held[1:])), held  # one holder at a time
    assert not lock.exists() and not (tmp_path / (workdir_lock.LOCK_NAME + ".takeover")).exists()


def test_a_failed_background_save_surfaces(scenes_data_dir, tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def full_disk(self, *args, **kwargs):
    raise OSError("No space left on device")

  c = _config(scenes_data_dir)
  state = jax.device_get(train.create_train_state(0, c, train.make_context(c, 4, 10)))
  ckpt = checkpointing.Checkpointer(str(tmp_path), ModelSpec.from_config(c), c)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
  ckpt.save(2, state)
  with pytest.raises(checkpointing.CheckpointSaveError, match="the disk is full") as e:
    ckpt.close()
  assert str(tmp_path) in str(e.value) and "run the same command again" in str(e.value)


def test_a_save_refused_at_once_by_orbax_is_a_checkpoint_save_error(
    scenes_data_dir, tmp_path, monkeypatch
):
  c = _config(scenes_data_dir)
  state = jax.device_get(train.create_train_state(0, c, train.make_context(c, 4, 10)))
  ckpt = checkpointing.Checkpointer(str(tmp_path), ModelSpec.from_config(c), c)

  def refuse(*args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database')

  monkeypatch.setattr(ckpt.manager, "save", refuse)
  with pytest.raises(checkpointing.CheckpointSaveError, match="the disk is full"):
    ckpt.save(2, state)
  monkeypatch.setattr(ckpt.manager, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("EIO")))
  with pytest.raises(checkpointing.CheckpointSaveError, match="OSError: EIO"):
    ckpt.save(2, state)


def test_orbax_error_records_stay_off_the_console():
  import logging as std_logging

  from ocl_jax import console

  keep = console.LibraryTracebacksToLog()
  record = lambda path, level: std_logging.LogRecord("absl", level, path, 1, "m", None, None)
  assert not keep.filter(record("/x/orbax/checkpoint/future.py", std_logging.ERROR))
  assert keep.filter(record("/x/orbax/checkpoint/future.py", std_logging.WARNING))
  assert keep.filter(record("/x/ocl_jax/train/loop.py", std_logging.ERROR))


def test_loading_a_corrupt_newest_checkpoint_for_inference_names_it(workdir):
  """Evaluation and ContraCAM read a workdir's newest checkpoint: damage is an error naming
  the checkpoint, not a model with garbled weights."""
  from ocl_jax import export

  path = _array_files(workdir / "checkpoints" / "4")[0]
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 64):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(
      checkpointing.CheckpointCorruptError, match=rf"checkpoint {workdir}/checkpoints/4 is "
  ):
    export.load_model(str(workdir))
