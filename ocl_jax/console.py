"""What a person reads: stage banners, one progress bar per long loop and the results table.

The entry point sends absl's INFO lines (metrics, hyperparameters, library
chatter) to WORKDIR/log.txt and keeps the console for warnings, banners and
progress bars; `--verbosity=0` (or any `-v`) puts every INFO line back on the
console. Library users who call neither function keep Python's logging as it is.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import threading
from typing import Any, Iterable

from absl import logging
import jax
import tqdm

LOG_FILE = "log.txt"


class QuietLibraries(std_logging.Filter):
  """Drop the per-file INFO chatter of Orbax and TFDS; keep their warnings."""

  NOISY = ("/orbax/", "/tensorflow_datasets/")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in self.NOISY
    )


def log_path(workdir: str, process_index: int) -> str:
  """WORKDIR/log.txt for process 0, WORKDIR/log.process<i>.txt for the others."""
  name = LOG_FILE if process_index == 0 else f"log.process{process_index}.txt"
  return os.path.join(workdir, name)


class LibraryTracebacksToLog(std_logging.Filter):
  """Keep Orbax's own error records (each with a traceback of its background threads) off
  the console: they reach log.txt, and the run's error is reported once, briefly."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not ("/orbax/" in record.pathname and record.levelno >= std_logging.ERROR)


def show_on_console(verbose: bool) -> None:
  """The console gets warnings, and INFO lines too when `verbose`; call first thing."""
  logging.get_absl_logger().addFilter(QuietLibraries())
  logging.get_absl_handler().setLevel(std_logging.INFO if verbose else std_logging.WARNING)
  if not verbose:
    logging.get_absl_handler().addFilter(LibraryTracebacksToLog())


def log_to_file(workdir: str) -> str:
  """Every INFO line also to the workdir's log file (appended on resume); returns its path.

  Call after the distributed runtime has started (the log file is per process).
  """
  quiet = QuietLibraries()
  os.makedirs(workdir, exist_ok=True)
  path = log_path(workdir, jax.process_index())
  handler = std_logging.FileHandler(path, mode="a", encoding="utf-8")
  handler.setFormatter(logging.PythonFormatter())
  handler.setLevel(std_logging.INFO)
  handler.addFilter(quiet)
  std_logging.getLogger().addHandler(handler)
  return path


def _console_shows_info() -> bool:
  """Whether an INFO log line reaches the console (absl's handler, as set up above)."""
  handler = logging.get_absl_handler()
  return (
      handler in std_logging.getLogger().handlers
      and handler.level <= std_logging.INFO
      and logging.get_absl_logger().isEnabledFor(std_logging.INFO)
  )


def say(message: str) -> None:
  """A line for the person at the console (process 0), and for the log: shown once."""
  logging.info("%s", message)
  if jax.process_index() == 0 and not _console_shows_info():
    tqdm.tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def route_stray_tracebacks() -> None:
  """Tracebacks that libraries print from their own threads and callbacks (e.g. an asyncio
  loop that Orbax closed while a read was failing) go to the log file, not the console,
  where the one paragraph of the error that stopped the run (report_error) is what counts."""

  def to_log(exc_type, exc, tb, where="a library callback"):
    logging.info("Traceback in %s (not what stopped the run):", where, exc_info=(exc_type, exc, tb))

  sys.excepthook = to_log
  sys.unraisablehook = lambda u: to_log(
      u.exc_type, u.exc_value, u.exc_traceback, f"a callback ({u.err_msg or 'unraisable'})"
  )
  threading.excepthook = lambda a: to_log(
      a.exc_type, a.exc_value, a.exc_traceback, f"thread {getattr(a.thread, 'name', '?')}"
  )


def report_error(error: BaseException, log_file: str | None = None, max_lines: int = 20) -> None:
  """The error that stopped a run as one short paragraph on stderr (what, and its message,
  which names the file or field), with where the traceback went."""
  lines = (str(error).strip() or repr(error)).splitlines()
  if len(lines) > max_lines:
    lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines in the log)"]
  text = f"Error ({type(error).__name__}): " + "\n  ".join(lines)
  if log_file:
    text += f"\n(The traceback is in {log_file}.)"
  sys.stderr.write(text + "\n")
  sys.stderr.flush()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    leave: bool = True,
) -> tqdm.tqdm:
  """A progress bar on process 0's stderr; sparse updates when stderr is a file (CI logs),
  where a transient bar (`leave=False`, e.g. one split's features) is not drawn at all.

  With INFO lines on the console (`--verbosity`) there is no bar: the metrics are logged from
  a background thread, and a bar redrawn in the middle of a log line would garble it.
  """
  interactive = sys.stderr.isatty()
  return tqdm.tqdm(
      iterable,
      total=total,
      desc=desc,
      unit=unit,
      initial=initial,
      leave=leave,
      disable=(jax.process_index() > 0 or (not interactive and not leave) or _console_shows_info()),
      dynamic_ncols=interactive,
      mininterval=0.5 if interactive else 30.0,
      file=sys.stderr,
  )
