"""One writer per workdir: a lock file held for the life of a run.

`workdir/run.lock` is locked with `flock` (released by the kernel when the
holder dies, kill -9 included) and holds the holder's host, pid, start time and
a heartbeat refreshed every `HEARTBEAT_SECONDS`. A second run on the workdir
fails at once with `WorkdirLockedError` naming the holder. On file systems
without `flock` (some network mounts) the lock falls back to the recorded
holder: a lock whose holder is a dead process on this host, or whose heartbeat
is older than `STALE_SECONDS`, is taken over. Only process 0 of a multi-host
job takes the lock; the job is one writer.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Optional

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _process_start(pid: int) -> Optional[str]:
  """The kernel's start time of `pid` (tells a reused pid apart), if known."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive_here(holder: dict) -> bool:
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  started = holder.get("pid_start")
  return started is None or _process_start(pid) in (None, started)


def _same_file(handle, path: str) -> bool:
  try:
    return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


def describe(holder: Optional[dict]) -> str:
  if not holder:
    return "another run (its details could not be read)"
  age = time.time() - holder.get("heartbeat", time.time())
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, running since "
          f"{holder.get('since')} (last heartbeat {age:.0f} s ago)")


class WorkdirLock:
  """Exclusive hold of a workdir; a context manager. Disabled (`enabled=False`)
  on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self._file = None
    self._holder: Optional[dict] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def read_holder(self) -> Optional[dict]:
    for _ in range(3):  # a heartbeat may be rewriting the file
      try:
        with open(self.path) as f:
          return json.load(f)
      except FileNotFoundError:
        return None
      except (OSError, ValueError):
        time.sleep(0.05)
    return None

  def acquire(self) -> None:
    if not self.enabled:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while self._file is None:
      handle = open(self.path, "a+")  # pylint: disable=consider-using-with
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        handle.close()
        raise WorkdirLockedError(self._busy_message(self.read_holder())) from None
      except OSError as e:
        if e.errno not in _NO_FLOCK:
          handle.close()
          raise
        holder = self.read_holder()  # no flock here: judge the recorded holder
        if holder and self._is_live(holder):
          handle.close()
          raise WorkdirLockedError(self._busy_message(holder)) from None
      if _same_file(handle, self.path):
        self._file = handle
      else:  # the previous holder removed the file between our open and flock
        handle.close()
    now = time.time()
    self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                    "pid_start": _process_start(os.getpid()),
                    "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "heartbeat": now}
    self._write()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                    daemon=True)
    self._thread.start()

  def _busy_message(self, holder: Optional[dict]) -> str:
    return (f"workdir {os.path.dirname(self.path)} is in use by {describe(holder)}. "
            f"Wait for that run to finish or stop it, or use another --workdir.")

  @staticmethod
  def _is_live(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname():
      return _alive_here(holder)
    return time.time() - holder.get("heartbeat", 0) < STALE_SECONDS

  def _write(self) -> None:
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps(self._holder))
    self._file.flush()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      self._holder["heartbeat"] = time.time()
      try:
        self._write()
      except (OSError, ValueError):
        return

  def release(self) -> None:
    if self._file is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      os.remove(self.path)
    except OSError:
      pass
    self._file.close()  # closing releases the flock
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
