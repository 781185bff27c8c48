"""Metric output: `metrics.jsonl`, TensorBoard events, and MFU accounting.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step
(`step` plus `train/...`, `eval/...`, `perf/...` keys); the same scalars go to
TensorBoard event files in the workdir.
"""

import json
import os
from typing import Any, Mapping, Optional

import jax

# Peak dense FLOP/s per device used for `perf/mfu`, by backend and device kind
# (bfloat16 matmul peak for accelerators, vendor data sheets). Override with
# config.train.peak_flops_per_device. The CPU figure is nominal: one JAX CPU
# device is the whole host; 1e11 is ~2 cores x 3 GHz x 16 float32 FMA lanes.
PEAK_FLOPS = {
    ("cpu", ""): 1e11,
    ("gpu", "h100"): 989e12,
    ("gpu", "h200"): 989e12,
    ("gpu", "a100"): 312e12,
    ("gpu", ""): 312e12,
    ("tpu", "v4"): 275e12,
    ("tpu", "v5 lite"): 197e12,
    ("tpu", "v5e"): 197e12,
    ("tpu", "v5p"): 459e12,
    ("tpu", "v6"): 918e12,
    ("tpu", ""): 275e12,
}


def peak_flops_per_device(override: Optional[float] = None) -> float:
  """The peak used for MFU: `override` if given, else `PEAK_FLOPS`."""
  if override:
    return float(override)
  backend = jax.default_backend()
  kind = jax.devices()[0].device_kind.lower()
  matches = [(len(k), flops) for (b, k), flops in PEAK_FLOPS.items()
             if b == backend and k in kind]
  if not matches:
    return PEAK_FLOPS.get((backend, ""), 1e11)
  return max(matches)[1]


def _scalar(value: Any) -> float:
  return float(jax.device_get(value))


def read_records(path: str) -> list[dict]:
  """The records of a `metrics.jsonl` (a line cut short by a kill is skipped)."""
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        records.append(record)
  return records


def last_values(path: str) -> dict[str, float]:
  """Each metric's newest value in a `metrics.jsonl` (what a finished run returns)."""
  values = {}
  for record in read_records(path):
    values.update({k: v for k, v in record.items() if k != "step"})
  return values


class MetricWriter:
  """Appends scalars to `workdir/metrics.jsonl` and TensorBoard events.

  `metrics.jsonl` is the record; the TensorBoard events mirror it. When a run
  starts (or resumes) at step s, the lines of `metrics.jsonl` logged after s
  (by a run that was killed, diverged or was restarted from scratch) are
  dropped, since the resumed run recomputes them, and the TensorBoard events
  are rewritten from the lines kept, so neither holds a step after s.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    """Opens the writers.

    Args:
      workdir: the run directory.
      enabled: False on processes other than 0 (writes nothing).
      resume_step: the step the run starts from (0 for a fresh start).
    """
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self._tb = None
    if not enabled:
      return
    kept = self._truncate_after(resume_step)
    # tensorboardX writes standard event files without importing TensorFlow.
    import tensorboardX  # pylint: disable=g-import-not-at-top
    if os.path.isdir(self.tensorboard_dir):
      for name in os.listdir(self.tensorboard_dir):
        if name.startswith("events.out.tfevents."):
          os.remove(os.path.join(self.tensorboard_dir, name))
    self._tb = tensorboardX.SummaryWriter(logdir=self.tensorboard_dir)
    for record in kept:
      self._add_to_tensorboard(record["step"], record)
    self._tb.flush()

  def _truncate_after(self, step: int) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    kept = [r for r in read_records(self.path) if r["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)
    return kept

  def _add_to_tensorboard(self, step: int, record: Mapping[str, Any]) -> None:
    for name, value in record.items():
      if name != "step":
        self._tb.add_scalar(name, value, global_step=int(step))

  def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    """Writes one record; returns it as Python floats."""
    record = {name: _scalar(value) for name, value in scalars.items()}
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), **record}) + "\n")
      self._add_to_tensorboard(step, record)
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
