"""What a run prints: a progress bar on a terminal, plain lines elsewhere.

On a terminal (stderr is a tty) a tqdm bar shows the step, train loss and
tokens/s, and evaluations, messages and the closing summary are printed above
it. Without one (SLURM, nohup, a notebook cell) every log step prints one line
(step, train loss, tokens/s, time left), every evaluation one line, and the run
ends with a summary. Only process 0 prints.
"""

import logging
import sys
import time
from typing import Optional

import tqdm


class _AboveTheBar(logging.Handler):
  """Writes log records with tqdm.write, so they print above the bar."""

  def __init__(self, original: Optional[logging.Handler]):
    super().__init__()
    self._original = original  # formats as before (absl's "I1201 file.py:12] ...")

  def emit(self, record: logging.LogRecord) -> None:
    try:
      text = self._original.format(record) if self._original else self.format(record)
      tqdm.tqdm.write(text, file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{seconds:02d}s"
  return f"{seconds}s"


class Console:
  """The run's output on process 0 (`enabled=False` elsewhere prints nothing)."""

  def __init__(self, *, enabled: bool = True, tty: Optional[bool] = None):
    self.enabled = enabled
    self.tty = sys.stderr.isatty() if tty is None else tty
    self._bar: Optional[tqdm.tqdm] = None
    self._root_handlers: Optional[list[logging.Handler]] = None
    self._total = 0
    self._started = time.time()

  def print(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stdout)
    else:
      print(text, flush=True)

  def start(self, *, start_step: int, total_steps: int) -> None:
    self._total = total_steps
    self._started = time.time()
    if self.enabled and self.tty:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True)
      # Library log lines (absl, orbax, jax) go above the bar, not through it.
      root = logging.getLogger()
      self._root_handlers = root.handlers[:]
      original = self._root_handlers[0] if self._root_handlers else None
      root.handlers = [_AboveTheBar(original)]

  def advance(self) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def log(self, step: int, record: dict, seconds_per_step: Optional[float]) -> None:
    """One training log step."""
    loss = record.get("train/loss")
    tokens_per_sec = record.get("perf/tokens_per_sec")
    if self._bar is not None:
      postfix = {"loss": f"{loss:.3f}"}
      if tokens_per_sec:
        postfix["tok_s"] = f"{tokens_per_sec:,.0f}"
      self._bar.set_postfix(postfix)
      return
    width = len(str(self._total))
    parts = [f"step {step:>{width}}/{self._total}", f"train/loss {loss:.4f}"]
    if tokens_per_sec:
      parts.append(f"{tokens_per_sec:,.0f} tok/s")
    if seconds_per_step is not None:
      parts.append(f"{format_duration(seconds_per_step * (self._total - step))} left")
    self.print("  ".join(parts))

  def eval(self, step: int, loss: float) -> None:
    width = len(str(self._total))
    self.print(f"step {step:>{width}}/{self._total}  eval/loss {loss:.4f}")

  def close(self) -> None:
    if self._root_handlers is not None:
      logging.getLogger().handlers = self._root_handlers
      self._root_handlers = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def summary(self, *, step: int, record: dict, tokens: int, workdir: str,
              outcome: str) -> None:
    """The closing lines of a run."""
    self.close()
    losses = [f"{name} {record[name]:.4f}" for name in ("train/loss", "eval/loss")
              if name in record]
    self.print(f"{outcome} at step {step}: {', '.join(losses) or 'no metrics logged'}; "
               f"{tokens:,} tokens trained in total; wall time "
               f"{format_duration(time.time() - self._started)}")
    self.print(f"outputs in {workdir}: metrics.jsonl, tensorboard/, summary.json, "
               f"config.json, checkpoints/")
