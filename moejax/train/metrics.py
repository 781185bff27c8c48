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


class MetricWriter:
  """Appends scalars to `workdir/metrics.jsonl` and TensorBoard events."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    """Opens the writers.

    Args:
      workdir: the run directory.
      enabled: False on processes other than 0 (writes nothing).
      resume_step: the step the run restarts from. Lines of `metrics.jsonl`
        with a larger step were logged after the checkpoint by a run that was
        killed; the resumed run recomputes them identically, so they are
        dropped rather than duplicated.
    """
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if resume_step and os.path.exists(self.path):
      self._truncate_after(resume_step)
    # tensorboardX writes standard event files without importing TensorFlow.
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self._tb = tensorboardX.SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    with open(self.path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError):
        continue  # a line cut short by a kill
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    """Writes one record; returns it as Python floats."""
    record = {name: _scalar(value) for name, value in scalars.items()}
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), **record}) + "\n")
      for name, value in record.items():
        self._tb.add_scalar(name, value, global_step=int(step))
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
