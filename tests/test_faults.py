"""Fault injection through the training CLI: each case of the run-safety issue.

Every test runs `python -m moejax.main` in a subprocess (stdout and stderr are
pipes, so the console is in its non-terminal mode) and checks the exit status,
the message and what is on disk afterwards.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train import REPO, checkpoint_steps, cli, read_metrics, train_losses

pytestmark = pytest.mark.slow
TIMEOUT = 300


def run(workdir, *flags, config=None):
  command = cli(workdir, *flags)
  if config is not None:
    command = [arg if not arg.startswith("--config=") else f"--config={config}"
               for arg in command]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)


def snapshot(root) -> dict:
  """Every path under `root` with its size and modification time."""
  root = pathlib.Path(root)
  if not root.exists():
    return {}
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob("*")}


def assert_clean_error(result, *fragments):
  assert result.returncode == 1, (result.returncode, result.stdout, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  message = result.stderr[result.stderr.index("error:"):]
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


def no_temporary_folders(workdir) -> bool:
  return not [p for p in pathlib.Path(workdir).rglob("*") if "orbax-checkpoint-tmp" in p.name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 8-step run with checkpoints at 4 and 8 (copy it before use)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = run(workdir, "--config.train.steps=8")
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoint_steps(workdir) == [4, 8]
  return workdir


def copy_of(trained, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


# --- resume guard -----------------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--config.model.moe.router=expert_choice", "--config.train.batch_size=16",
      "--config.seed=7"],
     ["config.model.moe.router: 'topk' in the checkpoint, 'expert_choice' now",
      "config.train.batch_size: 8 in the checkpoint, 16 now",
      "config.seed: 0 in the checkpoint, 7 now"]),
    (["--config.model.d_model=64", "--config.data.num_domains=3"],
     ["config.model.d_model: 32 in the checkpoint, 64 now",
      "config.data.num_domains: 2 in the checkpoint, 3 now"]),
])
def test_changed_config_stops_before_writing(trained, tmp_path, flags, expected):
  workdir = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  result = run(workdir, "--config.train.steps=12", *flags)
  message = assert_clean_error(result, "checkpoint step 8", *expected,
                               "--config.train.resume_with_changes=true", "new --workdir")
  assert "config.train.steps" not in message  # steps may change on a resume
  assert snapshot(workdir) == before


def test_resumable_keys_and_opt_in_changes_resume_and_are_recorded(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  # Cadence keys change freely.
  result = run(workdir, "--config.train.steps=10", "--config.train.log_every=5",
               "--config.train.checkpoint_every=5", "--config.train.keep_checkpoints=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from step 8" in result.stdout
  assert checkpoint_steps(workdir) == [4, 8, 10]
  # A changed learning rate needs the opt-in, and is recorded.
  result = run(workdir, "--config.train.steps=12", "--config.train.learning_rate=1e-3",
               "--config.train.resume_with_changes=true")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from step 10" in result.stdout
  assert "train.learning_rate 0.003 -> 0.001" in result.stdout
  cadence, entry = [json.loads(line) for line in (workdir / "config_changes.jsonl").open()]
  assert cadence["resumed_from_step"] == 8 and cadence["outside_resumable_keys"] == []
  assert cadence["changes"]["config.train.log_every"] == {"checkpoint": 2, "now": 5}
  assert entry["resumed_from_step"] == 10
  assert entry["changes"]["config.train.learning_rate"] == {"checkpoint": 0.003, "now": 0.001}
  assert entry["outside_resumable_keys"] == ["config.train.learning_rate"]
  # The new checkpoint records the new learning rate (the next resume compares with it).
  recorded = json.loads((workdir / "checkpoints" / "12" / "config" / "metadata").read_text())
  assert recorded["train"]["learning_rate"] == 1e-3
  # The opt-in cannot change parameter shapes; nothing is moved or written.
  before = snapshot(workdir / "checkpoints")
  result = run(workdir, "--config.train.steps=16", "--config.model.moe.num_experts=8",
               "--config.train.learning_rate=1e-3", "--config.train.resume_with_changes=true")
  assert_clean_error(result, "checkpoint step 12 holds other parameter shapes",
                     "params/layers/0/ffn/experts/wi: [4, 32, 32] saved, [8, 32, 32] now",
                     "model.moe.num_experts 4 -> 8")
  assert snapshot(workdir / "checkpoints") == before
  assert not (workdir / "damaged_checkpoints").exists()


# --- one writer per workdir --------------------------------------------------------------


def test_second_run_on_a_live_workdir_fails_and_a_dead_holder_does_not_block(tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(cli(workdir, "--config.train.steps=100000"), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
      time.sleep(0.1)
    assert (workdir / "metrics.jsonl").exists()
    second = run(workdir, "--config.train.learning_rate=1e-3")
    assert_clean_error(second, f"pid {first.pid} on host", "running since",
                       "is in use by", str(workdir))
  finally:
    first.kill()  # SIGKILL: the lock file stays behind, its holder dead
    first.wait()
  assert (workdir / "run.lock").exists()
  target = max(checkpoint_steps(workdir) or [0]) + 2
  third = run(workdir, f"--config.train.steps={target}")
  assert third.returncode == 0, third.stderr[-3000:]
  assert checkpoint_steps(workdir)[-1] == target
  assert not (workdir / "run.lock").exists()
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == sorted(set(steps))  # no step logged twice


# --- signals ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full") / "run"
  result = run(workdir, "--config.train.steps=40", "--config.train.checkpoint_every=100")
  assert result.returncode == 0, result.stderr[-3000:]
  return train_losses(workdir)


def _interrupt_and_resume(workdir, flags, signum, status) -> dict[int, float]:
  """Signals a run as soon as it logs, checks the save, resumes it; its losses."""
  proc = subprocess.Popen(cli(workdir, *flags), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
    time.sleep(0.05)
  proc.send_signal(signum)
  time.sleep(0.5)
  if proc.poll() is None:
    proc.send_signal(signum)  # a second signal must not abort the save
  stdout, stderr = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == status, (proc.returncode, stderr[-3000:])
  assert "Traceback" not in stderr, stderr[-3000:]
  (stopped,) = checkpoint_steps(workdir)
  assert 2 <= stopped < 40
  assert f"stopped by {signal.Signals(signum).name} with a checkpoint at step {stopped}" in stdout
  assert no_temporary_folders(workdir)

  result = run(workdir, *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from step {stopped}" in result.stdout
  return train_losses(workdir)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_saves_ignores_a_second_signal_and_resume_is_exact(uninterrupted, tmp_path,
                                                                  signum, status):
  flags = ["--config.train.steps=40", "--config.train.checkpoint_every=100"]
  losses = _interrupt_and_resume(tmp_path / "run", flags, signum, status)
  assert sorted(losses) == sorted(uninterrupted)
  for step, loss in uninterrupted.items():
    np.testing.assert_allclose(losses[step], loss, rtol=1e-6)


def test_sigterm_resume_with_bias_balancing_is_exact(tmp_path):
  # Auxiliary-loss-free balancing: the bias (router state outside the
  # optimizer) must come back from the checkpoint exactly.
  flags = ["--config.train.steps=40", "--config.train.checkpoint_every=100",
           "--config.model.moe.bias_update_rate=1e-2", "--config.model.moe.aux_loss_type=none"]
  result = run(tmp_path / "full", *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  uninterrupted = train_losses(tmp_path / "full")
  losses = _interrupt_and_resume(tmp_path / "run", flags, signal.SIGTERM, 0)
  assert sorted(losses) == sorted(uninterrupted)
  for step, loss in uninterrupted.items():
    assert abs(losses[step] - loss) <= 1e-6, step


# --- divergence --------------------------------------------------------------------------


def test_divergence_keeps_a_healthy_complete_checkpoint_that_resumes(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  exploding = ["--config.train.learning_rate=1e30", "--config.train.grad_clip=0",
               "--config.train.checkpoint_every=1", "--config.train.log_every=1",
               "--config.train.steps=12", "--config.train.resume_with_changes=true"]
  result = run(workdir, *exploding)
  message = assert_clean_error(result, "non-finite", "the last good checkpoint (step 8) is kept")
  assert "the state after step 9" in message and "not saved" in message
  assert checkpoint_steps(workdir) == [4, 8]
  assert no_temporary_folders(workdir)
  # The kept checkpoint trains on at the recorded learning rate.
  result = run(workdir, "--config.train.steps=12")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from step 8" in result.stdout
  records = read_metrics(workdir)
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)) and steps[-1] == 12
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)


# --- damaged checkpoints -----------------------------------------------------------------


def _truncate_largest_array_file(step_dir: pathlib.Path) -> None:
  largest = max((p for p in (step_dir / "state").rglob("*") if p.parent.name == "d"),
                key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)


def _garbage(relative: str):
  def damage(step_dir: pathlib.Path) -> None:
    (step_dir / relative).write_bytes(b"\xb9\x00 not json")
  return damage


def _empty(step_dir: pathlib.Path) -> None:
  for child in step_dir.iterdir():
    shutil.rmtree(child) if child.is_dir() else child.unlink()


def test_damage_is_named_by_file(trained, tmp_path):
  """The cheap file checks that run before orbax is asked (no training)."""
  from moejax.train import checkpoints  # pylint: disable=g-import-not-at-top
  for damage, reason in [(_garbage("state/_METADATA"), "state/_METADATA is not valid JSON"),
                         (_garbage("data/metadata"), "data/metadata is not valid JSON"),
                         (_garbage("state/array_metadatas/process_0"),
                          "state/array_metadatas/process_0 is not valid JSON"),
                         (_empty, "state/ is missing")]:
    step_dir = tmp_path / "8"
    shutil.rmtree(step_dir, ignore_errors=True)
    shutil.copytree(trained / "checkpoints" / "8", step_dir)
    assert checkpoints.check_files(str(step_dir)) is None
    damage(step_dir)
    assert checkpoints.check_files(str(step_dir)).startswith(reason)


@pytest.mark.parametrize("damage, reason", [
    (_truncate_largest_array_file, "array "),
    (_garbage("state/_METADATA"), "state/_METADATA is not valid JSON"),
])
def test_damaged_newest_checkpoint_is_moved_aside_and_orphans_removed(trained, tmp_path,
                                                                      damage, reason):
  workdir = copy_of(trained, tmp_path)
  damage(workdir / "checkpoints" / "8")
  orphan = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1796163000"
  (orphan / "state").mkdir(parents=True)
  (orphan / "state" / "junk").write_text("from a killed save")
  result = run(workdir, "--config.train.steps=12")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "warning: checkpoint step 8 does not restore: " + reason in result.stdout, result.stdout
  assert "Resumed from step 4" in result.stdout
  assert (workdir / "damaged_checkpoints" / "8").is_dir()  # moved, not deleted
  assert f"moved to {workdir / 'damaged_checkpoints' / '8'}" in result.stdout
  assert not orphan.exists()
  assert checkpoint_steps(workdir) == [4, 8, 12]
  assert [r["step"] for r in read_metrics(workdir)] == [2, 4, 6, 8, 10, 12]


# --- CLI input ---------------------------------------------------------------------------


def _no_such_config(tmp_path):
  return {"config": str(tmp_path / "missing.py")}, [f"--config={tmp_path / 'missing.py'}",
                                                    "No such file"]


def _syntax_error(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(:\n  return None\n")
  return {"config": str(path)}, [f"--config={path}", "syntax error at line 1"]


@pytest.mark.parametrize("case", ["missing_config", "syntax_error", "workdir_is_a_file",
                                  "workdir_url", "unknown_key", "num_heads", "group_size"])
def test_cli_input_errors_are_one_line_before_anything_is_written(tmp_path, case):
  workdir = tmp_path / "run"
  flags, kwargs, fragments = [], {}, []
  if case == "missing_config":
    kwargs, fragments = _no_such_config(tmp_path)
  elif case == "syntax_error":
    kwargs, fragments = _syntax_error(tmp_path)
  elif case == "workdir_is_a_file":
    workdir.write_text("not a folder")
    fragments = [f"--workdir={workdir} is a file"]
  elif case == "workdir_url":
    workdir = "gs://bucket/run"
    fragments = ["--workdir=gs://bucket/run: a URL is not supported"]
  elif case == "unknown_key":
    flags = ["--config.train.stepz=3"]
    fragments = ["unknown config key config.train.stepz; did you mean config.train.steps?"]
  elif case == "num_heads":
    flags = ["--config.model.num_heads=3"]
    fragments = ["config.model.num_heads=3 does not divide config.model.d_model=32",
                 "config.model.head_dim"]
  elif case == "group_size":
    flags = ["--config.model.moe.group_by=sequence", "--config.model.moe.group_size=7"]
    fragments = ["config.model.moe.group_size=7 does not divide the 256 tokens"]
  before = snapshot(tmp_path)
  result = run(workdir, *flags, **kwargs)
  assert_clean_error(result, *fragments)
  assert snapshot(tmp_path) == before


def _make_read_only(folder: pathlib.Path):
  """Makes `folder` unwritable, even for root; returns how to undo it (or None)."""
  if os.geteuid() != 0:
    folder.chmod(0o555)
    return lambda: folder.chmod(0o755)
  # Root ignores permission bits: a read-only tmpfs, else the immutable attribute.
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                    capture_output=True).returncode == 0:
    return lambda: subprocess.run(["umount", str(folder)], check=True)
  if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
  return None


def test_unwritable_workdir_is_one_line(tmp_path):
  parent = tmp_path / "read_only"
  parent.mkdir()
  undo = _make_read_only(parent)
  if undo is None:
    pytest.skip("cannot make a folder read-only here (root without mount or chattr)")
  try:
    workdir = parent / "run"
    result = run(workdir)
    assert_clean_error(result, f"--workdir={workdir} cannot be written")
    assert not workdir.exists()
  finally:
    undo()


# --- short runs, console, finished workdir -----------------------------------------------


@pytest.mark.parametrize("steps, small", [(1, False), (30, True)])
def test_short_runs_with_the_default_warmup_work(tmp_path, steps, small):
  workdir = tmp_path / "run"
  # The default config's own warmup (30 steps): the run is all warmup. With
  # steps = warmup_steps = 30 optax's cosine had no decay steps left.
  if small:
    result = run(workdir, f"--config.train.steps={steps}", "--config.train.warmup_steps=30",
                 "--config.train.checkpoint_every=100", "--config.train.eval_every=100")
  else:
    command = [sys.executable, "-m", "moejax.main", "--config=configs/default.py",
               f"--workdir={workdir}", f"--config.train.steps={steps}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_metrics(workdir)
  assert records[-1]["step"] == steps and np.isfinite(records[-1]["eval/loss"])
  # Warmup of 30 steps: the learning rate at step s is 3e-3 * s / 30.
  np.testing.assert_allclose(records[-1]["train/learning_rate"], 3e-3 * (steps - 1) / 30,
                             rtol=1e-5)
  assert checkpoint_steps(workdir) == [steps]


def test_tensorboard_console_and_finished_workdir(trained, tmp_path):
  """TensorBoard after a resume, the console without a terminal, a finished run."""
  tensorboard = pathlib.Path(sys.executable).parent / "tensorboard"
  assert tensorboard.exists() or shutil.which("tensorboard"), "no tensorboard command"
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  workdir = copy_of(trained, tmp_path)
  # A run killed after its step-4 checkpoint: metrics of steps 6, 8 exist.
  shutil.rmtree(workdir / "checkpoints" / "8")
  result = run(workdir, "--config.train.steps=6", "--config.train.log_every=3")
  assert result.returncode == 0, result.stderr[-3000:]
  accumulator = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  accumulator.Reload()
  steps = [event.step for event in accumulator.Scalars("train/loss")]
  assert steps == [2, 4, 6]
  assert [r["step"] for r in read_metrics(workdir)] == [2, 4, 6]

  # The console without a terminal: a line per log step and evaluation, a summary.
  lines = result.stdout.splitlines()
  assert "Resumed from step 4" in result.stdout
  assert any(line.startswith("step 6/6  train/loss ") and "tok/s" in line and "left" in line
             for line in lines), result.stdout
  assert "step 6/6  eval/loss " in result.stdout
  assert any(line.startswith("finished at step 6: train/loss ") and "eval/loss" in line
             and "tokens trained" in line for line in lines), result.stdout
  assert f"outputs in {workdir}" in result.stdout
  # No orbax/absl INFO chatter (absl INFO lines start with "I" + date).
  assert not [line for line in (result.stdout + result.stderr).splitlines()
              if line[:1] == "I" and line[1:5].isdigit()], result.stderr[-3000:]

  # A finished workdir: says so and writes nothing (no new TensorBoard file).
  before = snapshot(workdir)
  again = run(workdir, "--config.train.steps=6", "--config.train.log_every=3")
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"{workdir} is complete at step 6" in again.stdout
  assert snapshot(workdir) == before


def test_unexpected_error_finishes_the_pending_save(tmp_path, monkeypatch):
  from moejax.train import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from moejax import train as trainer  # pylint: disable=g-import-not-at-top
  from test_train import small_config  # pylint: disable=g-import-not-at-top
  evaluate = evaluator_lib.Evaluator.run
  calls = []

  def failing_evaluate(*args):
    calls.append(1)
    if len(calls) == 1:  # the first evaluation, at step 6, after the step-4 save began
      raise RuntimeError("injected failure")
    return evaluate(*args)

  monkeypatch.setattr(evaluator_lib.Evaluator, "run", failing_evaluate)
  with pytest.raises(RuntimeError, match="injected failure"):
    trainer.train_and_evaluate(small_config(), str(tmp_path))
  assert checkpoint_steps(tmp_path) == [4] and no_temporary_folders(tmp_path)
  assert not (tmp_path / "run.lock").exists()
  record = trainer.train_and_evaluate(small_config(), str(tmp_path))  # resumes from 4
  assert record["train/loss"] > 0 and checkpoint_steps(tmp_path) == [4, 8, 12]


def test_terminal_progress_bar_keeps_library_log_lines_apart(tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  import pty  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  import termios  # pylint: disable=g-import-not-at-top
  controller, terminal = pty.openpty()
  # A 40 x 120 terminal (a new pty has 0 columns, and tqdm then draws nothing).
  fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
  # --verbosity=0 turns orbax's INFO lines on: they must print above the bar.
  proc = subprocess.Popen(cli(tmp_path / "run", "--verbosity=0"), cwd=REPO, stdin=terminal,
                          stdout=terminal, stderr=terminal, close_fds=True)
  os.close(terminal)
  chunks = []
  while True:
    try:
      chunk = os.read(controller, 65536)
    except OSError:  # the terminal closed: the run ended
      break
    if not chunk:
      break
    chunks.append(chunk)
  os.close(controller)
  assert proc.wait(timeout=TIMEOUT) == 0
  output = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
  # What the terminal shows of each line: the text after its last carriage return.
  lines = [line.rsplit("\r", 1)[-1] for line in output.split("\n")]
  assert any("checkpoint_manager.py" in line for line in lines)  # INFO was on
  assert "12/12 [" in output, output[-2000:]  # the bar was drawn
  assert any(line.startswith("finished at step 12") for line in lines)
  broken = [line for line in lines if "%|" in line and ".py:" in line]
  assert not broken, broken[:3]
