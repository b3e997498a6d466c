"""How long the devices sat with no step to run: the honest measure of a starved step.

Steps are dispatched asynchronously, so the time the loop blocks in `next(batches)`
mostly overlaps steps still queued on the devices; on a CPU host the tf.data threads
then also compete with those steps for the cores. That wait says little about
whether the devices ever ran dry. A step cannot start before it is dispatched nor
before the previous one has finished, so the devices were idle for

    max(0, dispatch[k+1] - done[k])

before step k+1. A watcher thread records each step's completion time; the loop
records dispatch times. The time includes everything the host did between steps
(input, logging, checkpoint hand-offs), which is what a faster step would wait on.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import jax


class DeviceIdleMeter:
  """Idle seconds of the devices between dispatched steps, read and reset by `take`.

  `wait` blocks until a step's outputs are computed and `clock` reads the time; both
  are parameters so the bookkeeping can be tested without devices.
  """

  def __init__(
      self,
      wait: Callable[[Any], Any] = jax.block_until_ready,
      clock: Callable[[], float] = time.perf_counter,
  ):
    self._wait, self._clock = wait, clock
    self._queue: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._idle = 0.0
    self._last_done: float | None = None
    self._thread = threading.Thread(target=self._watch, name="device_idle", daemon=True)
    self._thread.start()

  def run_step(self, step: Callable[..., Any], state: Any, batch: Any) -> tuple[Any, Any]:
    """`step(state, batch)` -> (state, metrics), dispatched now and watched through its
    metrics (the state may be donated to the next step, so it cannot be waited on)."""
    dispatch_time = self._clock()
    state, metrics = step(state, batch)
    self.dispatched(dispatch_time, metrics)
    return state, metrics

  def dispatched(self, dispatch_time: float, outputs: Any) -> None:
    """Watch `outputs` of the step dispatched at `dispatch_time` until they are computed."""
    self._queue.put((dispatch_time, outputs))

  def _watch(self) -> None:
    while True:
      item = self._queue.get()
      try:
        if item is None:
          return
        dispatch_time, outputs = item
        try:
          self._wait(outputs)
        except Exception:  # pylint: disable=broad-except
          pass  # a failed step is reported by the loop, which reads the same outputs
        done = self._clock()
        with self._lock:
          if self._last_done is not None:
            self._idle += max(0.0, dispatch_time - self._last_done)
          self._last_done = done
      finally:
        self._queue.task_done()

  def flush(self) -> None:
    """Wait until every dispatched step has been seen to finish."""
    self._queue.join()

  def take(self, flush: bool = False) -> float:
    """Idle seconds since the previous `take`; `flush` first waits for every watched step."""
    if flush:
      self.flush()
    with self._lock:
      idle, self._idle = self._idle, 0.0
    return idle

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()

  def __enter__(self) -> "DeviceIdleMeter":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
