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

from moejax.scaling.sweeps import SCALES, scale_setup, schedule

BASE_CONFIG = "configs/default.py"

NUM_EXPERTS = (2, 4, 8, 16, 32)


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  """[(name, overrides)]: "dense", then "e2" ... "e32" (switch, top-1)."""
  setup = scale_setup(SCALES, scale)
  # Groups of one sequence, as measured (top-1 in position order is causal).
  shared = {**setup, **schedule(setup["train.steps"]), "model.moe.top_k": 1,
            "model.moe.group_by": "sequence"}
  points = [("dense", {**shared, "model.moe.router": "dense", "model.moe.num_experts": 1})]
  for num_experts in NUM_EXPERTS:
    points.append((f"e{num_experts}", {**shared, "model.moe.router": "switch",
                                       "model.moe.num_experts": num_experts}))
  return points
