"""Fine-grained MoE: granularity G crossed with model size and token budget.

Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts":
granularity G splits every expert into G experts of hidden H / G and routes
each token to G times as many of them, so active and total expert parameters
stay fixed while routing gets finer. Their law L(N, D, G) = c + (g / G^gamma
+ a) / N^alpha + b / D^beta (eq. 4) needs several N (model sizes) and D
(token budgets) per G: this sweep is the full grid G x size x budget.

    python -m experiments.sweep --sweep=configs/sweeps/granularity.py:tiny \
        --workdir=/tmp/granularity

`config.model.moe.granularity` multiplies num_experts and top_k and divides
expert_hidden (moejax/nn/moe_layer.py). Only the routers grow with G (D E G
weights per MoE layer), so total and active non-embedding parameters are equal
across G up to the router (at G = 8 < 3% of the total and < 8% of the active
non-embedding parameters here; tests/test_sweep.py checks both).
Routing is grouped by batch position: top-k (k = G > 1) with a finite capacity
would otherwise let tokens see later ones through routing (Wang et al. 2024,
§5.2) and the loss would not be a language-modelling loss.

Scales: "tiny" runs on 2 idle CPU cores in 7.8 minutes (16 points of 16-55 s
each, compilation included; README "Scaling-law sweeps" says what its fit can
and cannot show); "small" and "medium" are accelerator sizes.
"""

from moejax.scaling.sweeps import scale_setup, schedule

BASE_CONFIG = "configs/default.py"

GRANULARITIES = (1, 2, 4, 8)

# Per scale: model widths (expert_hidden = 2 d_model), training steps, and the
# settings every point shares. tokens per step = batch_size * seq_len.
_SCALES = {
    "tiny": dict(d_models=(64, 128), steps=(250, 500), num_experts=4, shared={
        "model.num_layers": 2, "model.num_heads": 4,
        "train.seq_len": 64, "train.batch_size": 16, "train.log_every": 25}),
    "small": dict(d_models=(256, 384), steps=(4000, 8000), num_experts=8, shared={
        "model.num_layers": 6, "model.num_heads": 8,
        "train.seq_len": 256, "train.batch_size": 64, "train.log_every": 100}),
    "medium": dict(d_models=(512, 768), steps=(10000, 20000), num_experts=8, shared={
        "model.num_layers": 12, "model.num_heads": 8,
        "train.seq_len": 512, "train.batch_size": 128, "train.log_every": 100}),
}


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  """[(name, overrides)] for G x d_model x steps at this scale."""
  setup = scale_setup(_SCALES, scale)
  points = []
  for d_model in setup["d_models"]:
    for steps in setup["steps"]:
      for granularity in GRANULARITIES:
        points.append((f"d{d_model}_s{steps}_g{granularity}", {
            **setup["shared"],
            "model.d_model": d_model,
            "model.moe.router": "topk",
            "model.moe.num_experts": setup["num_experts"],
            "model.moe.top_k": 1,
            "model.moe.expert_hidden": 2 * d_model,
            "model.moe.granularity": granularity,
            "model.moe.group_by": "batch",
            **schedule(steps),
        }))
  return points
