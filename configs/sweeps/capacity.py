"""Training and evaluation capacity factors of switch (top-1) routing, and dropless.

Switch Transformer (Fedus et al. 2021, §2.2 and Table 1) trades dropped
tokens (capacity_factor < ~1.25) against padded expert compute (larger
factors); dropless routing (MegaBlocks, Gale et al. 2022) removes the
trade-off: capacity_factor = 0 with the grouped-matmul dispatch.

    python -m experiments.sweep --sweep=configs/sweeps/capacity.py:tiny \
        --workdir=/tmp/capacity

Each training factor is crossed with the evaluation factors
`EVAL_CAPACITY_FACTORS` (`model.moe.eval_capacity_factor`, used when the
layer runs deterministically, i.e. in evaluation; V-MoE, Riquelme et al.
2021, §4.1, evaluates at other factors than it trains with). The padded
training FLOPs of each factor are
`flops_capacity_padding` in `moejax.scaling.accounting.counts_from_config`.
Top-1 with position priority is causal, so per-sequence groups are kept.
"""

BASE_CONFIG = "configs/default.py"

CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0)
EVAL_CAPACITY_FACTORS = (1.0, 2.0)

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
  """[(name, overrides)]: "cf0.5_eval1.0" ... "cf2.0_eval2.0", then "dropless"."""
  if scale not in _SCALES:
    raise ValueError(f"unknown scale {scale!r}; valid scales: {sorted(_SCALES)}")
  steps = _SCALES[scale]["train.steps"]
  shared = {**_SCALES[scale], "model.moe.router": "switch", "model.moe.num_experts": 8,
            "model.moe.top_k": 1, "train.warmup_steps": steps // 10,
            "train.eval_every": steps, "train.checkpoint_every": min(steps, 1000)}
  points = [(f"cf{factor}_eval{eval_factor}",
             {**shared, "model.moe.capacity_factor": factor,
              "model.moe.eval_capacity_factor": eval_factor, "model.moe.dispatch": "gather"})
            for factor in CAPACITY_FACTORS for eval_factor in EVAL_CAPACITY_FACTORS]
  points.append(("dropless", {**shared, "model.moe.capacity_factor": 0.0,
                              "model.moe.dispatch": "dropless"}))
  return points
