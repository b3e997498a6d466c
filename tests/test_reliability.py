"""Reliability: non-finite steps, SIGTERM, and SIGKILL at random moments (also mid-save)
followed by resumes that end with exactly the parameters of an uninterrupted run."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ocl_jax import preemption
from ocl_jax import train
from tests.conftest import train_two_steps

ROOT = pathlib.Path(__file__).parents[1]


def test_nonfinite_steps_are_skipped_and_counted(tiny_config, tmp_path, caplog):
  c = tiny_config
  c.optim.base_lr = 1e30  # diverges at once
  c.max_param_norm_growth = 0  # the non-finite path alone (the norm guard would stop first)
  c.nonfinite = "skip"
  state, log = train_two_steps(c, tmp_path, caplog)
  assert "non-finite loss or gradients; update skipped" in log
  assert float(re.findall(r"skipped_steps=([0-9.]+)", log)[-1]) >= 1
  # No NaN ever entered the state.
  for leaf in jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state)):
    assert np.all(np.isfinite(leaf))


def test_nonfinite_step_stops_the_run_keeping_the_last_good_checkpoint(tiny_config, tmp_path):
  c = tiny_config
  c.optim.base_lr = 1e30
  c.max_param_norm_growth = 0  # the non-finite path alone (the norm guard would stop first)
  c.num_train_steps = 4
  c.log_every_steps = c.checkpoint_every_steps = 1
  c.eval_every_steps = 0
  c.export_encoder = False
  with pytest.raises(train.NonFiniteError, match=r"non-finite loss or gradients at step (\d)") as e:
    train.train_and_evaluate(c, str(tmp_path))
  bad = int(re.search(r"at step (\d)", str(e.value)).group(1))
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert saved == list(range(1, bad))  # every good step, none from the bad one on
  assert f"last good checkpoint (step {bad - 1})" in str(e.value)


def _run(
    workdir, data_dir, steps, env_extra=None, kill_at=None, term_at=None, term_signal=None, times=1
):
  """The CLI on the tiny setting; optionally SIGKILL / SIGTERM (or `term_signal`, `times`
  times 20 ms apart) it once the log shows training step `kill_at` / `term_at` (or later),
  after a further random fraction of a step. Step-triggered, not timed, so the fault lands
  where the test needs it on a fast or a slow machine alike."""
  env = {
      **os.environ,
      "JAX_COMPILATION_CACHE_DIR": str(pathlib.Path(workdir).parent / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      **(env_extra or {}),
  }
  args = [
      sys.executable,
      "-m",
      "tests.fault_injection_run",
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
      "--config.log_every_steps=1",
      "--config.eval_every_steps=0",
      "--config.checkpoint_every_steps=4",
      "--config.view_pictures=0",
      "--config.export_encoder=False",
      "--verbosity=0",
  ]
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
  target = kill_at if kill_at is not None else term_at
  sig = signal.SIGKILL if kill_at is not None else (term_signal or signal.SIGTERM)

  def send():
    for i in range(times):
      time.sleep(0.02 if i else 0.0)
      proc.send_signal(sig)

  lines, timer = [], None
  for line in proc.stderr:
    lines.append(line)
    logged = re.search(r"\] \[(\d+)\] .*learning_rate=", line)
    if target is not None and timer is None and logged and int(logged.group(1)) >= target:
      timer = threading.Timer(np.random.uniform(0.0, 0.05), send)
      timer.start()
  proc.wait(timeout=600)
  if timer is not None:
    timer.cancel()
  return proc.returncode, "".join(lines)


def _final_params(workdir, step):
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints"))) as m:
    return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state[
        "params"
    ]


def test_ctrl_c_saves_like_sigterm(tmp_path, scenes_data_dir):
  """A first Ctrl-C (SIGINT) saves the current step and exits 130, as SIGTERM does with 143."""
  code, log = _run(tmp_path / "once", scenes_data_dir, 40, term_at=5, term_signal=signal.SIGINT)
  assert code == 128 + signal.SIGINT, log[-3000:]
  saved = int(re.search(r"Termination requested: saved step (\d+)", log).group(1))
  assert saved >= 5 and str(saved) in os.listdir(tmp_path / "once" / "checkpoints")
  assert "Ctrl-C: saving a checkpoint" in log


def test_a_second_ctrl_c_stops_at_once(capsys):
  """The watcher: SIGTERM or a first SIGINT only set the flag (and which signal it was); a
  second SIGINT raises KeyboardInterrupt where the program is; leaving restores the handlers."""
  before = signal.getsignal(signal.SIGINT)
  with preemption.PreemptionWatcher() as watcher:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert watcher.requested and watcher.signum == signal.SIGINT
    assert "Ctrl-C again to stop at once" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.5)
  assert signal.getsignal(signal.SIGINT) is before
  with preemption.PreemptionWatcher() as watcher:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)  # after SIGTERM: still one request, no exception
    time.sleep(0.01)
    assert watcher.requested and watcher.signum == signal.SIGTERM
  assert preemption.Preempted(3, "/c", watcher.signum).exit_status == 143


def test_killed_and_resumed_run_ends_with_identical_parameters(tmp_path, scenes_data_dir):
  steps = 40
  code, log = _run(tmp_path / "reference", scenes_data_dir, steps)
  assert code == 0, log[-3000:]

  work = tmp_path / "interrupted"
  rng = np.random.default_rng()
  # 1. SIGKILL at a random step of training.
  code, log = _run(work, scenes_data_dir, steps, kill_at=int(rng.integers(2, 15)))
  assert code == -signal.SIGKILL, log[-3000:]
  # 2. SIGKILL in the middle of the next save (files written, not committed).
  code, log = _run(work, scenes_data_dir, steps, env_extra={"OCL_KILL_DURING_SAVE": "first"})
  killed = re.search(r"FAULT: killed while saving step (\d+)", log)
  assert code == -signal.SIGKILL and killed, log[-3000:]
  assert killed.group(1) not in os.listdir(work / "checkpoints")
  # 3. SIGTERM at a random step: the run saves the step it is at and exits with 143.
  first = int(killed.group(1)) + 1
  code, log = _run(
      work, scenes_data_dir, steps, term_at=int(rng.integers(first, max(first + 1, 30)))
  )
  assert code == preemption.EXIT_STATUS, log[-3000:]
  saved = int(re.search(r"Termination requested: saved step (\d+)", log).group(1))
  # 4. Resume to the end.
  code, log = _run(work, scenes_data_dir, steps)
  assert code == 0 and f"Resumed from step {saved}" in log, log[-3000:]

  want, got = _final_params(tmp_path / "reference", steps), _final_params(work, steps)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)
