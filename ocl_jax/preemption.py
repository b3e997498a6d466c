"""Preemption: SIGTERM asks the run to checkpoint and stop at the next step boundary.

Cloud TPU/GPU VMs and SLURM send SIGTERM some seconds before they kill a job.
The handler only sets a flag; the training loop polls it between steps,
saves a checkpoint of the current step and raises `Preempted`, which
`ocl_jax.main` turns into exit status 143 (128 + SIGTERM), so a scheduler sees
an interrupted job and running the same command again resumes it. In a
multi-process job the flags are combined at log steps, so every process
stops at the same step.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np

EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
  """The run saved a checkpoint at `step` after a termination request and stopped."""

  def __init__(self, step: int, checkpoint_dir: str):
    super().__init__(
        f"preempted: checkpoint of step {step} saved in {checkpoint_dir}; "
        "run the same command again to resume"
    )
    self.step = step


class PreemptionWatcher:
  """Context manager installing a SIGTERM handler (main thread only) that sets a flag."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self.requested = False
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame) -> None:
    del frame
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
