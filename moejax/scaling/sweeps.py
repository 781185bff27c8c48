"""Pieces shared by the sweep files in configs/sweeps/.

A sweep file picks its model sizes per scale; the scale lookup, its error and
the schedule a point's step count implies are written here once.
"""

from typing import Any, Mapping

# Model and batch sizes per scale for sweeps that vary only MoE keys
# (configs/sweeps/experts.py, capacity.py): `tiny` finishes on 2 CPU cores.
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4,
             "model.moe.expert_hidden": 128, "train.seq_len": 64, "train.batch_size": 16,
             "train.steps": 300, "train.log_every": 25},
    "small": {"model.d_model": 256, "model.num_layers": 6, "model.num_heads": 8,
              "model.moe.expert_hidden": 1024, "train.seq_len": 256, "train.batch_size": 64,
              "train.steps": 8000, "train.log_every": 100},
    "medium": {"model.d_model": 512, "model.num_layers": 12, "model.num_heads": 8,
               "model.moe.expert_hidden": 2048, "train.seq_len": 512,
               "train.batch_size": 128, "train.steps": 20000, "train.log_every": 100},
}


def scale_setup(scales: Mapping[str, Any], scale: str) -> Any:
  """`scales[scale]`; an unknown scale raises ValueError listing the valid ones."""
  if scale not in scales:
    raise ValueError(f"unknown scale {scale!r}; valid scales: {sorted(scales)}")
  return scales[scale]


def schedule(steps: int) -> dict[str, int]:
  """Overrides for a point of `steps` steps: 10% warmup, one evaluation at
  the end, a checkpoint at least every 1000 steps."""
  return {"train.steps": steps, "train.warmup_steps": steps // 10,
          "train.eval_every": steps, "train.checkpoint_every": min(steps, 1000)}
