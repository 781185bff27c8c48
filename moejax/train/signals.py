"""SIGTERM and SIGINT, turned into a clean stop.

Before the training loop (`deferred=False`) a signal stops the run at once by
raising `Interrupted`: nothing has been trained, so nothing needs saving. In
the loop (`deferred=True`) the first signal only sets `received`; the loop
saves a checkpoint after the current step and exits. Every later signal is
ignored with a note, so a second Ctrl-C or a second SIGTERM from a cluster
manager cannot abort the save. The handlers stay installed until the run has
closed its checkpoints and writers.

A command-line entry point (`moejax.main`, `experiments.sweep`) calls
`hold_until_exit()` first: then, once a signal has stopped a run, later
signals stay ignored until the process exits, not only until the run
returns, so the exit status is the documented one (0 after SIGTERM, 130 after
SIGINT) and not the signal's. A library caller (a notebook, a test) gets its
own handlers back when the run returns.
"""

import atexit
import signal
import sys
import threading
from typing import Callable, Optional

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
_HOLD = {"until_exit": False, "at_exit_registered": False}


def hold_until_exit() -> None:
  """After a signal has stopped a run, ignore further signals until exit."""
  _HOLD["until_exit"] = True


def _note_ignored(signum, frame) -> None:
  del frame
  print(f"{NAMES[signum]} ignored: the run has stopped (its checkpoint is saved) and is "
        f"exiting", file=sys.stderr, flush=True)


def _ignore_in_shutdown() -> None:
  # Interpreter shutdown resets Python-level handlers to the default action
  # (which kills) but keeps SIG_IGN, so the last moments (JAX/XLA teardown)
  # need SIG_IGN.
  for signum in NAMES:
    signal.signal(signum, signal.SIG_IGN)


def _ignore_until_exit() -> None:
  for signum in NAMES:
    signal.signal(signum, _note_ignored)
  if not _HOLD["at_exit_registered"]:
    atexit.register(_ignore_in_shutdown)
    _HOLD["at_exit_registered"] = True


class StopSignals:
  """A context manager; `received` is the first signal seen in the loop."""

  def __init__(self, on_startup_signal: Callable[[int], BaseException]):
    self.received: Optional[int] = None
    self.deferred = False
    self._on_startup_signal = on_startup_signal
    self._stopped_at_startup = False
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if not self.deferred:
      self._stopped_at_startup = True
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
    stopping = self.received is not None or self._stopped_at_startup
    if self._previous and stopping and _HOLD["until_exit"]:
      _ignore_until_exit()  # the process is on its way out: keep it on that way
    else:
      for signum, previous in self._previous.items():
        signal.signal(signum, previous)
    self._previous = {}
