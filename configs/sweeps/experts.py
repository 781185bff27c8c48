"""Number of experts at fixed active parameters: dense, then E = 2 ... 32.

Clark et al. 2022, "Unified Scaling Laws for Routed Language Models": with
top-1 routing and a fixed expert width every point costs the same FLOPs per
token while total parameters grow with E; their law
log L = a log N + b log E_hat + c log N log E_hat + d (eq. 7) is fitted on
exactly this axis. The dense baseline is an FFN of the expert's width (the
E = 1 point).

    python -m experiments.sweep --sweep=configs/sweeps/experts.py:tiny \
        --workdir=/tmp/experts

Top-1 token choice with position priority is causal in a decoder, so the
default per-sequence routing groups are kept.
"""

BASE_CONFIG = "configs/default.py"

NUM_EXPERTS = (2, 4, 8, 16, 32)

_SCALES = {
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


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  """[(name, overrides)]: "dense", then "e2" ... "e32" (switch, top-1)."""
  if scale not in _SCALES:
    raise ValueError(f"unknown scale {scale!r}; valid scales: {sorted(_SCALES)}")
  steps = _SCALES[scale]["train.steps"]
  shared = {**_SCALES[scale], "model.moe.top_k": 1, "train.warmup_steps": steps // 10,
            "train.eval_every": steps, "train.checkpoint_every": min(steps, 1000)}
  points = [("dense", {**shared, "model.moe.router": "dense", "model.moe.num_experts": 1})]
  for num_experts in NUM_EXPERTS:
    points.append((f"e{num_experts}", {**shared, "model.moe.router": "switch",
                                       "model.moe.num_experts": num_experts}))
  return points
