"""Hostile conditions around a run: its lock file deleted, a second signal
after the save. Each case runs the holder or the run in a subprocess."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from moejax.train import lock
from test_train import REPO, checkpoint_steps, cli

TIMEOUT = 300

# Holds the workdir lock of argv[1] (heartbeat every argv[2] s) until stdin closes.
_HOLDER = textwrap.dedent("""
    import sys
    from moejax.train import lock
    lock.HEARTBEAT_SECONDS = float(sys.argv[2])
    held = lock.WorkdirLock(sys.argv[1])
    held.acquire()
    print("held", flush=True)
    sys.stdin.read()
    held.release()
""")


def _hold(workdir, heartbeat: float) -> subprocess.Popen:
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir), str(heartbeat)],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "held\n", holder.stderr.read()
  return holder


def _wait_for(condition, seconds: float = 30.0) -> bool:
  deadline = time.time() + seconds
  while time.time() < deadline:
    if condition():
      return True
    time.sleep(0.05)
  return False


def test_deleting_run_lock_does_not_let_a_second_writer_in(tmp_path):
  holder = _hold(tmp_path, heartbeat=0.2)
  try:
    os.remove(tmp_path / lock.LOCK_NAME)
    with pytest.raises(lock.WorkdirLockedError, match="is in use by") as refused:
      lock.WorkdirLock(str(tmp_path)).acquire()
    assert str(tmp_path) in str(refused.value)
    assert "\n" not in str(refused.value)  # one line
    # The holder's heartbeat puts its record back: the refusal names it again.
    assert _wait_for(lambda: f'"pid": {holder.pid}' in
                     ((tmp_path / lock.LOCK_NAME).exists()
                      and (tmp_path / lock.LOCK_NAME).read_text() or ""))
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {holder.pid} on host"):
      lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()  # SIGKILL: the kernel drops both of its locks
    holder.wait()
  with lock.WorkdirLock(str(tmp_path)):
    assert (tmp_path / lock.LOCK_NAME).exists()
  assert not (tmp_path / lock.LOCK_NAME).exists()


def test_a_released_lock_is_free_and_a_second_lock_in_one_process_is_refused(tmp_path):
  first = lock.WorkdirLock(str(tmp_path))
  first.acquire()
  try:
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
      lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    first.release()
  with lock.WorkdirLock(str(tmp_path)):
    pass


# --- a second signal after the save --------------------------------------------------------

# The first signal stops the loop (deferred); the second comes after the
# StopSignals block has closed (the save is done), before the process exits.
_SECOND_SIGNAL = textwrap.dedent("""
    import os, signal, sys, time
    from moejax.train import signals
    signum = int(sys.argv[1])
    if sys.argv[2] == "cli":
      signals.hold_until_exit()
    class Startup(Exception):
      pass
    with signals.StopSignals(lambda s: Startup()) as stop:
      stop.deferred = True
      os.kill(os.getpid(), signum)
      time.sleep(0.2)
      assert stop.received == signum
    os.kill(os.getpid(), signum)
    time.sleep(0.2)
    print("survived", flush=True)
    sys.exit(130 if signum == signal.SIGINT else 0)
""")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_after_the_save_is_ignored_until_exit(signum, status):
  result = subprocess.run([sys.executable, "-c", _SECOND_SIGNAL, str(int(signum)), "cli"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == status, (result.returncode, result.stderr[-3000:])
  assert "survived" in result.stdout and "Traceback" not in result.stderr
  name = signal.Signals(signum).name
  assert f"{name} ignored" in result.stderr


def test_library_callers_get_their_handlers_back():
  # Without hold_until_exit (a notebook, a test), the second signal is the
  # caller's again: here the default SIGTERM action.
  result = subprocess.run([sys.executable, "-c", _SECOND_SIGNAL, str(int(signal.SIGTERM)),
                           "library"], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == -signal.SIGTERM and "survived" not in result.stdout


# Runs moejax.main; a second SIGTERM reaches it right after its StopSignals
# block has closed (the checkpoint is saved), before the process exits.
_MAIN_WITH_SECOND_SIGTERM = textwrap.dedent("""
    import os, runpy, signal, sys, time
    from moejax.train import signals
    close = signals.StopSignals.__exit__
    def close_then_signal(self, *exc):
      close(self, *exc)
      if self.received is not None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
    signals.StopSignals.__exit__ = close_then_signal
    sys.argv[0] = "moejax.main"
    runpy.run_module("moejax.main", run_name="__main__", alter_sys=True)
""")


@pytest.mark.slow
def test_cli_second_sigterm_after_the_save_keeps_exit_status_0(tmp_path):
  workdir = tmp_path / "run"
  command = cli(workdir, "--config.train.steps=40", "--config.train.checkpoint_every=100")
  command[1:3] = ["-c", _MAIN_WITH_SECOND_SIGTERM]  # replaces "-m moejax.main"
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  assert _wait_for(lambda: (workdir / "metrics.jsonl").exists() or proc.poll() is not None,
                   TIMEOUT)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 0, (proc.returncode, stderr[-3000:])
  (stopped,) = checkpoint_steps(workdir)
  assert f"stopped by SIGTERM with a checkpoint at step {stopped}" in stdout
  assert "SIGTERM ignored" in stderr and "Traceback" not in stderr
