"""SIGTERM and SIGINT, turned into a clean stop.

Before the training loop (`deferred=False`) a signal stops the run at once by
raising `Interrupted`: nothing has been trained, so nothing needs saving. In
the loop (`deferred=True`) the first signal only sets `received`; the loop
saves a checkpoint after the current step and exits. Every later signal is
ignored with a note, so a second Ctrl-C or a second SIGTERM from a cluster
manager cannot abort the save. The handlers stay installed until the run has
closed its checkpoints and writers.
"""

import signal
import sys
import threading
from typing import Callable, Optional

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopSignals:
  """A context manager; `received` is the first signal seen in the loop."""

  def __init__(self, on_startup_signal: Callable[[int], BaseException]):
    self.received: Optional[int] = None
    self.deferred = False
    self._on_startup_signal = on_startup_signal
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if not self.deferred:
      raise self._on_startup_signal(signum)
    if self.received is None:
      self.received = signum
      print(f"{NAMES[signum]}: saving a checkpoint after this step, then stopping",
            file=sys.stderr, flush=True)
    else:
      print(f"{NAMES[signum]} ignored: already stopping (a checkpoint is being saved)",
            file=sys.stderr, flush=True)

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in NAMES:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
