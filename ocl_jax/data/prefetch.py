"""Host batches produced in a background thread, a few steps ahead of the train loop.

tf.data prefetches within an epoch, but the training stream builds a new pipeline
per epoch (its order is a function of (seed, epoch)), and that pipeline's first
batch waits for its shuffle buffer to fill. Pulled from the loop's thread, that
wait stalls the devices at every epoch start; pulled from a thread `size` batches
ahead, it overlaps the steps already queued. The order of the batches is unchanged.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Any, Iterator

_END = object()


class _Raised:
  """An exception of the producer, re-raised in the consumer's thread."""

  def __init__(self, error: BaseException):
    self.error = error


def _produce(iterator: Iterator[Any], items: queue.Queue, stop: threading.Event) -> None:
  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    for item in iterator:
      if not put(item):
        return
    put(_END)
  except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
    put(_Raised(e))


class BackgroundPrefetch:
  """Iterate `iterator` in a daemon thread, at most `size` items ahead of the consumer.

  Errors of the iterator are raised by `next` in the consumer's thread. `close` (or
  dropping the object) stops the thread once it next hands over an item.
  """

  def __init__(self, iterator: Iterator[Any], size: int):
    if size < 1:
      raise ValueError(f"size must be >= 1, got {size}")
    self._items: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    # The thread holds the queue and the event, not self, so dropping self stops it.
    self._thread = threading.Thread(
        target=_produce, args=(iterator, self._items, self._stop), name="host_prefetch", daemon=True
    )
    weakref.finalize(self, self._stop.set)
    self._thread.start()

  def __iter__(self) -> "BackgroundPrefetch":
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    item = self._items.get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Raised):
      self._done = True
      raise item.error
    return item

  def close(self) -> None:
    self._stop.set()
    self._done = True
