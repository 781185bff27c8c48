"""One writer per workdir: a lock held for the life of a run.

Two kernel locks, both released when the holder dies (kill -9 included):
  * `flock` on the workdir folder itself. Deleting `run.lock` by hand cannot
    undo it (a flock belongs to the inode, and a new `run.lock` would be a new
    inode a second run could lock); the folder cannot be deleted while it holds
    the run's files.
  * `flock` on `workdir/run.lock`, which holds the holder's host, pid, start
    time and a heartbeat refreshed every `HEARTBEAT_SECONDS`. If the file is
    deleted or replaced, the heartbeat locks and refills the file now at the
    path, so the holder is named again within a heartbeat.
A second run on the workdir fails at once with `WorkdirLockedError` naming the
holder. On file systems without `flock` (some network mounts; folder locks on
NFS) the missing lock is skipped, and without a file lock the recorded holder
decides: a lock whose holder is a dead process on this host, or whose
heartbeat is older than `STALE_SECONDS`, is taken over. Only process 0 of a
multi-host job takes the lock; the job is one writer. Linux and macOS.
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
# Linux's NFS client emulates flock with byte-range locks, and refuses an
# exclusive one on a descriptor not open for writing (a folder): EBADF.
_NO_FOLDER_FLOCK = _NO_FLOCK + (errno.EBADF, errno.EACCES, errno.EPERM)


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


def _lock_folder(folder: str) -> Optional[int]:
  """An open descriptor of `folder` holding an exclusive flock; None where the
  file system cannot lock folders. Raises BlockingIOError when it is held."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError as e:
    if e.errno in _NO_FOLDER_FLOCK:
      return None
    raise
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if isinstance(e, BlockingIOError) or e.errno not in _NO_FOLDER_FLOCK:
      raise
    return None
  return fd


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
    self._folder_fd: Optional[int] = None
    self._file = None
    self._holder: Optional[dict] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def read_holder(self) -> Optional[dict]:
    for _ in range(3):  # a heartbeat may be rewriting the file
      try:
        with open(self.path) as f:
          holder = json.load(f)
        return holder if isinstance(holder, dict) else None
      except FileNotFoundError:
        return None
      except (OSError, ValueError):
        time.sleep(0.05)
    return None

  def acquire(self) -> None:
    """Takes the folder lock, then `run.lock`; WorkdirLockedError if held."""
    if not self.enabled:
      return
    folder = os.path.dirname(self.path)
    os.makedirs(folder, exist_ok=True)
    try:
      self._folder_fd = _lock_folder(folder)
    except BlockingIOError:
      raise WorkdirLockedError(self._busy_message(self.read_holder())) from None
    try:
      self._file = self._lock_file()
    except BaseException:
      self._unlock_folder()
      raise
    self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                    "pid_start": _process_start(os.getpid()),
                    "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "heartbeat": time.time()}
    self._write()
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                    daemon=True)
    self._thread.start()

  def _lock_file(self):
    """`run.lock`, open and flocked (or judged free where flock is missing)."""
    while True:
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
        return handle
      handle.close()  # the previous holder removed the file between our open and flock

  def _busy_message(self, holder: Optional[dict]) -> str:
    who = describe(holder)
    if holder is None and not os.path.exists(self.path):
      who = f"another run (its {LOCK_NAME} was deleted while it runs)"
    return (f"workdir {os.path.dirname(self.path)} is in use by {who}. "
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

  def _reattach(self) -> None:
    """`run.lock` was deleted or replaced while held: lock the file now at the
    path and record the holder in it again."""
    handle = open(self.path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if isinstance(e, BlockingIOError) or e.errno not in _NO_FLOCK:
        handle.close()  # someone else's lock (no folder lock here): leave it
        return
    old, self._file = self._file, handle
    old.close()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      self._holder["heartbeat"] = time.time()
      try:
        if not _same_file(self._file, self.path):
          self._reattach()
        self._write()
      except (OSError, ValueError):
        return

  def _unlock_folder(self) -> None:
    if self._folder_fd is not None:
      os.close(self._folder_fd)  # closing releases the flock
      self._folder_fd = None

  def release(self) -> None:
    if self._file is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if _same_file(self._file, self.path):  # not a file another run put there
      try:
        os.remove(self.path)
      except OSError:
        pass
    self._file.close()  # closing releases the flock
    self._file = None
    self._unlock_folder()

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
