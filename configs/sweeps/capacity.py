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

from moejax.scaling.sweeps import SCALES, scale_setup, schedule

BASE_CONFIG = "configs/default.py"

CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0)
EVAL_CAPACITY_FACTORS = (1.0, 2.0)


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  """[(name, overrides)]: "cf0.5_eval1.0" ... "cf2.0_eval2.0", then "dropless"."""
  setup = scale_setup(SCALES, scale)
  shared = {**setup, **schedule(setup["train.steps"]), "model.moe.router": "switch",
            "model.moe.num_experts": 8, "model.moe.top_k": 1,
            # Groups of one sequence, as measured (top-1 in position order is
            # causal with either grouping).
            "model.moe.group_by": "sequence"}
  points = [(f"cf{factor}_eval{eval_factor}",
             {**shared, "model.moe.capacity_factor": factor,
              "model.moe.eval_capacity_factor": eval_factor, "model.moe.dispatch": "gather"})
            for factor in CAPACITY_FACTORS for eval_factor in EVAL_CAPACITY_FACTORS]
  points.append(("dropless", {**shared, "model.moe.capacity_factor": 0.0,
                              "model.moe.dispatch": "dropless"}))
  return points
