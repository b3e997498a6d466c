"""Preemption: SIGTERM (or a first Ctrl-C) asks the run to checkpoint and stop at the next step.

Cloud TPU/GPU VMs and SLURM send SIGTERM some seconds before they kill a job.
The handler only sets a flag; the training loop polls it between steps,
saves a checkpoint of the current step and raises `Preempted`, which
`ocl_jax.main` turns into exit status 128 + the signal (143 for SIGTERM, 130 for
Ctrl-C), so a scheduler sees an interrupted job and running the same command
again resumes it. Ctrl-C at the console does the same, so no work since the last
checkpoint is lost; a second Ctrl-C stops at once (KeyboardInterrupt). In a
multi-process job the flags are combined at log steps, so every process stops
at the same step.
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np

EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
  """The run saved a checkpoint at `step` after a termination request and stopped."""

  def __init__(self, step: int, checkpoint_dir: str, signum: int = signal.SIGTERM):
    super().__init__(
        f"preempted: checkpoint of step {step} saved in {checkpoint_dir}; "
        "run the same command again to resume"
    )
    self.step = step
    self.exit_status = 128 + int(signum)


class PreemptionWatcher:
  """Context manager installing SIGTERM and SIGINT handlers (main thread only) that set a
  flag; a second SIGINT raises KeyboardInterrupt at once."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self.signals = signals
    self.requested = False
    self.signum = signal.SIGTERM  # the first signal received
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT:
      if self.requested and self.signum == signal.SIGINT:
        raise KeyboardInterrupt
      print(
          "\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
          "(Ctrl-C again to stop at once, losing the steps since the last checkpoint)",
          file=sys.stderr,
          flush=True,
      )
    if not self.requested:
      self.signum = signum
    self.requested = True

  def __enter__(self) -> "PreemptionWatcher":
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def should_stop(self, sync: bool) -> bool:
    """Whether to stop now; with `sync` (a step all processes reach) any process's request
    counts."""
    if jax.process_count() == 1 or not sync:
      return self.requested and jax.process_count() == 1
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))
