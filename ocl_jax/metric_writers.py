"""Metrics to the log and to TensorBoard, with or without TensorFlow and clu.

Why: the package has to run where only jax, flax, optax, orbax, numpy and PIL are
installed. The training loop and ContraCAM write through `create_writer`, which
takes the best back end there is for the TensorBoard events: clu's SummaryWriter
(TensorFlow) when clu imports, else TensorBoard's own pure-Python event writer
with the same tags and values, else none (the log alone, with one warning).
Scalars are logged in clu's LoggingWriter format (`[step] name=value, ...`)
whichever back end writes the events, so log.txt reads as before.

`ReportProgress` stands in for clu's `periodic_actions.ReportProgress`: steps/s,
progress and ETA to the log, `steps_per_sec` and `uptime` to the writer.
"""

from __future__ import annotations

import concurrent.futures
import io
import threading
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

from absl import logging
import numpy as np
from PIL import Image

try:  # Optional: without tensorboard the events come from clu, or are not written.
  from tensorboard.compat.proto import event_pb2, summary_pb2
  from tensorboard.plugins.hparams import summary_v2 as hparams_summary
  from tensorboard.plugins.image import metadata as image_metadata
  from tensorboard.plugins.scalar import summary_v2 as scalar_summary
  from tensorboard.summary.writer import event_file_writer
  from tensorboard.util import tensor_util
except ImportError:
  event_file_writer = None

# Which writer produces the TensorBoard events: "auto" (clu, else tensorboard, else none).
BACKENDS = ("auto", "clu", "tensorboard", "none")

INSTALL_HINT = "pip install tensorboard (or clu and tensorflow)"

_warned_no_events = False
_warned_lock = threading.Lock()


class MetricWriter(Protocol):
  """The writer methods the loop and ContraCAM call: clu's writers and ours both have them."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    ...

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    ...

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    ...

  def flush(self) -> None:
    ...

  def close(self) -> None:
    ...


def format_scalars(step: int, scalars: Mapping[str, Any]) -> str:
  """clu's LoggingWriter line, `[step] a=0.5, b=3` (sorted names), kept for log readers."""
  values = [
      f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())
  ]
  return f"[{step}] " + ", ".join(values)


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mappings and sequences to dotted names, None to "", as clu does for TensorBoard."""
  flat: dict[str, Any] = {}
  for k, v in hparams.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping) or hasattr(v, "items"):
      flat.update(flatten_hparams(v, name + "."))
    elif isinstance(v, (list, tuple)):
      flat.update(flatten_hparams({str(i): x for i, x in enumerate(v)}, name + "."))
    else:
      flat[name] = "" if v is None else v
  return flat


class LoggingWriter:
  """Metrics to absl's INFO log, in clu's LoggingWriter format (log.txt parsers rely on it).

  `log_hparams=False` keeps the hyperparameters out of the log (the loop writes them to
  TensorBoard and config.json only).
  """

  def __init__(self, *, log_hparams: bool = True):
    self.log_hparams = log_hparams

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info("%s", format_scalars(step, scalars))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self.log_hparams:
      logging.info("[Hyperparameters] %s", hparams)

  def flush(self) -> None:
    logging.flush()

  def close(self) -> None:
    self.flush()


def to_uint8(images: np.ndarray) -> np.ndarray:
  """uint8 as given; floats clipped to [0, 1] and scaled as tf.image.convert_image_dtype does."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    return np.clip(images.astype(np.float64) * 255.5, 0, 255).astype(np.uint8)
  raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")


def encode_png(image: np.ndarray) -> bytes:
  """One (H, W, C) image, C in 1..4, as PNG bytes (what tf.image.encode_png writes)."""
  modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
  if image.ndim != 3 or image.shape[-1] not in modes:
    raise ValueError(f"an image must be (H, W, C) with C in 1..4, got shape {image.shape}")
  channels = image.shape[-1]
  pixels = image[..., 0] if channels == 1 else image
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(pixels), mode=modes[channels]).save(buffer, format="PNG")
  return buffer.getvalue()


class TensorBoardWriter:
  """TensorBoard event files through tensorboard's pure-Python writer: no TensorFlow needed.

  Writes what clu's SummaryWriter (tf.summary) writes: one event per value, scalars as float32
  tensors of the scalars plugin, images as [width, height, png...] string tensors of the images
  plugin, hyperparameters as the hparams plugin's session-start summary at step 0.
  """

  def __init__(self, logdir: str):
    if event_file_writer is None:
      raise ImportError(f"TensorBoardWriter needs tensorboard: {INSTALL_HINT}")
    self._events = event_file_writer.EventFileWriter(logdir)

  def _add(self, step: int, summary: Any) -> None:
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for tag, value in scalars.items():
      self._add(step, scalar_summary.scalar_pb(tag, np.asarray(value)))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for tag, value in images.items():
      value = to_uint8(value)
      if value.ndim == 3:
        value = value[None]
      if value.ndim != 4:
        raise ValueError(f"image {tag!r} must be (N, H, W, C), got shape {value.shape}")
      strings = [str(value.shape[2]).encode(), str(value.shape[1]).encode()]
      strings += [encode_png(image) for image in value]
      summary = summary_pb2.Summary()
      summary.value.add(
          tag=tag,
          metadata=image_metadata.create_summary_metadata(display_name=None, description=None),
          tensor=tensor_util.make_tensor_proto(np.array(strings, dtype=object)),
      )
      self._add(step, summary)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._add(0, hparams_summary.hparams_pb(flatten_hparams(hparams)))

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()


def create_event_writer(logdir: str, backend: str = "auto") -> MetricWriter | None:
  """The TensorBoard writer for `logdir` from `backend` (see BACKENDS); None writes no events.

  "auto" takes clu's SummaryWriter when clu (and TensorFlow) import, else TensorBoardWriter
  when tensorboard imports, else None with one warning. "clu" and "tensorboard" raise
  ImportError when that back end is missing.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "none":
    return None
  if backend in ("auto", "clu"):
    try:
      from clu import metric_writers as clu_writers
    except ImportError:
      if backend == "clu":
        raise
    else:
      return clu_writers.SummaryWriter(logdir)
  try:
    return TensorBoardWriter(logdir)
  except ImportError:
    if backend == "tensorboard":
      raise
  global _warned_no_events
  with _warned_lock:
    if not _warned_no_events:
      _warned_no_events = True
      logging.warning(
          "Neither clu nor tensorboard can be imported: metrics go to the log only, no "
          "TensorBoard event files are written. To get them: %s",
          INSTALL_HINT,
      )
  return None


class AsyncWriter:
  """Hands every write to `writers` to one background thread, in call order.

  Why: encoding images and writing events must not stall the training thread. Writes run
  on a single worker (so their order holds); an error there is raised on the caller's next
  write or flush. Pending writes still run at interpreter exit, as with clu's AsyncMultiWriter.
  """

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="metric_writer"
    )
    self._error: BaseException | None = None
    self._closed = False

  def _record_error(self, future: concurrent.futures.Future) -> None:
    if self._error is None and future.exception() is not None:
      self._error = future.exception()

  def _raise_error(self) -> None:
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def _call_writers(self, method: str, *args: Any) -> None:
    for writer in self.writers:
      getattr(writer, method)(*args)

  def _submit(self, method: str, *args: Any) -> concurrent.futures.Future:
    self._raise_error()
    if self._closed:
      raise ValueError("the metric writer is closed")
    future = self._executor.submit(self._call_writers, method, *args)
    future.add_done_callback(self._record_error)
    return future

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._submit("write_scalars", step, dict(scalars))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    self._submit("write_images", step, dict(images))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._submit("write_hparams", dict(hparams))

  def flush(self) -> None:
    """Blocks until every write so far is done and each writer has flushed."""
    concurrent.futures.wait([self._submit("flush")])
    self._raise_error()

  def close(self) -> None:
    """Flushes, closes the writers and stops the thread; later calls do nothing."""
    if self._closed:
      return
    self._closed = True  # the writers are closed even after a failed write, then it is raised
    future = self._executor.submit(self._call_writers, "close")
    future.add_done_callback(self._record_error)
    self._executor.shutdown(wait=True)
    self._raise_error()


def create_writer(
    workdir: str, *, just_logging: bool = False, log_hparams: bool = True, backend: str = "auto"
) -> AsyncWriter:
  """The log plus (unless `just_logging`, e.g. on processes > 0) TensorBoard events in
  `workdir`, written asynchronously; call flush() or close() before reading them."""
  writers: list[MetricWriter] = [LoggingWriter(log_hparams=log_hparams)]
  if not just_logging:
    events = create_event_writer(workdir, backend)
    if events is not None:
      writers.append(events)
  return AsyncWriter(writers)


def format_seconds(seconds: float) -> str:
  """123456.7 -> '1d10h17m', as clu formats the ETA."""
  days, rest = divmod(int(seconds), 24 * 3600)
  hours, rest = divmod(rest, 3600)
  text = f"{days}d" if days else ""
  text += f"{hours}h" if hours else ""
  return text + f"{rest // 60}m"


class ReportProgress:
  """clu's ReportProgress as the loop uses it: call after every step with the step number.

  Every `every_secs` seconds and at `num_train_steps` it logs steps/s, the percentage done and
  the ETA, and writes `steps_per_sec` (steps since the last report over the time since) and
  `uptime` (seconds since construction) to `writer`. The first call only starts the clock.
  `clock` is there so tests can fake the time.
  """

  def __init__(
      self,
      *,
      num_train_steps: int | None = None,
      writer: MetricWriter | None = None,
      every_secs: float | None = 60.0,
      clock: Callable[[], float] = time.monotonic,
  ):
    self.num_train_steps = num_train_steps if num_train_steps and num_train_steps > 0 else None
    self.writer = writer
    self.every_secs = every_secs
    self.clock = clock
    self._start = clock()
    self._previous_step: int | None = None
    self._previous_time = 0.0

  def __call__(self, step: int, t: float | None = None) -> bool:
    """Reports if it is time to; returns whether it did."""
    t = self.clock() if t is None else t
    if self._previous_step is None:
      self._previous_step, self._previous_time = step, t
      return False
    due = (self.every_secs is not None and t - self._previous_time > self.every_secs) or (
        step == self.num_train_steps
    )
    if step == self._previous_step or not due:
      return False
    steps_per_sec = (step - self._previous_step) / (t - self._previous_time)
    message = f"{steps_per_sec:.1f} steps/s"
    if self.num_train_steps:
      eta = (self.num_train_steps - step) / steps_per_sec
      message += (
          f", {100 * step / self.num_train_steps:.1f}% ({step}/{self.num_train_steps}), "
          f"ETA: {format_seconds(eta)}"
      )
    logging.info("Progress: %s", message)
    if self.writer is not None:
      self.writer.write_scalars(step, {"steps_per_sec": steps_per_sec})
      self.writer.write_scalars(step, {"uptime": self.clock() - self._start})
    self._previous_step, self._previous_time = step, t
    return True
