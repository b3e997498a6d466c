"""A lock file in the workdir, so two runs never train (and checkpoint) into one workdir.

Two runs on one workdir would interleave their checkpoints and each resume from
the other's. The lock is WORKDIR/train.lock, created atomically (O_EXCL) and
holding the holder's host, PID and start time; it is removed when the run ends,
also by an exception. A lock whose process is gone (same host, PID not running:
a killed run) is taken over with a warning; one from another host cannot be
checked and is refused. A takeover happens under a second, short-lived lock
(train.lock.takeover, also O_EXCL) that re-reads the stale lock before removing it,
so of several runs started at once on a workdir with a stale lock exactly one
ends up holding it. In a multi-process job only process 0 takes it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from typing import Any

from absl import logging

LOCK_NAME = "train.lock"
# An unreadable lock younger than this may be one being written right now; a takeover lock
# older than this was left by a process that died inside its takeover.
_UNREADABLE_GRACE_S = 10.0


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock."""


def _alive(pid: Any) -> bool:
  """Whether process `pid` runs on this host (a PID we may not signal runs too)."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      holder = json.load(f)
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def describe(holder: dict[str, Any] | None) -> str:
  """'PID 123 on host h (started 2026-...)' for messages."""
  if holder is None:
    return "an unknown process (the lock file is unreadable)"
  return (
      f"PID {holder.get('pid')} on host {holder.get('host')} "
      f"(started {holder.get('started', '?')})"
  )


class WorkdirLock:
  """Context manager holding WORKDIR/train.lock; `enabled=False` (processes > 0) does nothing."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self.holder: dict[str, Any] | None = None

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for _ in range(100):  # a look per lost race; a run that holds the lock is refused at once
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale(me["host"])
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.holder = me
      return
    raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep taking it")

  def _stale(self, host: str) -> tuple[bool, dict[str, Any] | None, bytes | None]:
    """(whether the current lock's holder is gone, the holder, the lock's bytes); bytes None
    when there is no lock any more."""
    try:
      with open(self.path, "rb") as f:
        raw = f.read()
    except FileNotFoundError:
      return False, None, None
    try:
      other = json.loads(raw)
      other = other if isinstance(other, dict) else None
    except ValueError:
      other = None
    if other is None:
      try:
        return time.time() - os.path.getmtime(self.path) > _UNREADABLE_GRACE_S, None, raw
      except FileNotFoundError:
        return False, None, None
    return other.get("host") == host and not _alive(other.get("pid")), other, raw

  def _take_over_if_stale(self, host: str) -> None:
    """Remove the existing lock if its holder is gone, else raise WorkdirLockedError.

    The removal happens under train.lock.takeover, after reading the lock again: a lock
    another run created since the first look (it can only have, once the stale one was
    removed by a takeover) is then seen as alive and refused, never removed.
    """
    stale, other, raw = self._stale(host)
    if raw is None:
      return  # released meanwhile: try again
    if not stale:
      raise self._locked(other)
    guard = self.path + ".takeover"
    try:
      fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        if time.time() - os.path.getmtime(guard) > _UNREADABLE_GRACE_S:
          os.remove(guard)  # left by a process that died during its takeover
      except FileNotFoundError:
        pass
      time.sleep(0.01)
      return  # another run is taking over: look again
    try:
      os.close(fd)
      stale, other, now = self._stale(host)
      if now is None:
        return
      if not stale or now != raw:
        raise self._locked(other)
      logging.warning(
          "Taking over the stale lock %s of %s: that process is not running (a run that was "
          "killed)",
          self.path,
          describe(other),
      )
      os.remove(self.path)
    finally:
      os.remove(guard)

  def _locked(self, other: dict[str, Any] | None) -> WorkdirLockedError:
    return WorkdirLockedError(
        f"the workdir {os.path.dirname(self.path)} is in use by another run: its lock "
        f"{self.path} is held by {describe(other)}. Wait for that run to end or use another "
        f"--workdir; delete {self.path} only if that run is certainly gone."
    )

  def release(self) -> None:
    """Remove the lock if it is still ours."""
    if self.holder is None:
      return
    current = _read(self.path)
    if current is not None and current.get("pid") == self.holder["pid"]:
      if current.get("host") == self.holder["host"]:
        os.remove(self.path)
    self.holder = None

  def __enter__(self) -> "WorkdirLock":
    if self.enabled:
      self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()
