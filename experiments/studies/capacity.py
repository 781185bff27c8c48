r"""Training and evaluation capacity factors, and dropless (Switch Table 1; ST-MoE).

Claims:
  * Switch Transformer (Fedus et al. 2022, Table 1): at a fixed number of
    steps, quality improves with the training capacity factor (fewer dropped
    tokens) while each step costs more; capacity 1.0-1.25 is the sweet spot.
  * ST-MoE (Zoph et al. 2022, Table 8 / §B): evaluating at a higher capacity
    factor than trained with recovers some of the quality lost to drops.
  * Dropless routing (MegaBlocks, Gale et al. 2022) removes the trade-off.

Runs: switch (top-1) over 8 experts, routing groups of one sequence (top-1 in
position order is causal), training capacity factor 0.5, 1.0, 1.25, 2.0 and
dropless (capacity 0, grouped-matmul dispatch). Each finished checkpoint is
then evaluated by `moejax.evaluate` at evaluation capacity 1.0, 2.0 and
dropless on the same held-out batches: eval loss and dropped fraction per
setting. The padded training FLOPs of each factor are
`flops_capacity_padding` (`moejax.scaling.accounting`).

    python -m experiments.studies.capacity --workdir=/tmp/capacity_study
"""

import sys
from typing import Any, Optional, Sequence

from absl import app

from experiments.studies import common
from moejax.scaling import accounting

BASE_CONFIG = "configs/default.py"

TRAIN_FACTORS = (0.5, 1.0, 1.25, 2.0)
EVAL_SETTINGS = {"eval1.0": {"eval_capacity_factor": 1.0},
                 "eval2.0": {"eval_capacity_factor": 2.0},
                 "dropless": {"dropless": True}}
_SCALES = {
    "full": dict(model=common.STUDY_MODEL, steps=600, log_every=20, seeds=(0, 1, 2),
                 factors=TRAIN_FACTORS, eval_batches=16),
    "quick": dict(model=common.QUICK_MODEL, steps=15, log_every=5, seeds=(0, 1),
                  factors=(0.5,), eval_batches=1),
}


def configs(scale: str) -> list[tuple[str, dict]]:
  """[(config name, overrides)]: "cf<f>" per training factor, then "dropless"."""
  setup = _SCALES[scale]
  shared = {**setup["model"], **common.schedule(setup["steps"], setup["log_every"]),
            "model.moe.router": "switch", "model.moe.top_k": 1, "model.moe.num_experts": 8,
            "model.moe.group_by": "sequence"}
  points = [(f"cf{factor}", {**shared, "model.moe.capacity_factor": factor,
                             "model.moe.dispatch": "gather"})
            for factor in setup["factors"]]
  points.append(("dropless", {**shared, "model.moe.capacity_factor": 0.0,
                              "model.moe.dispatch": "dropless"}))
  return points


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  return common.seeded_sweep(configs, _SCALES, scale)


def postprocess(workdir: str, points, scale: str) -> None:
  """Evaluates every checkpoint at each of EVAL_SETTINGS."""
  settings = {name: (lambda point, kwargs=kwargs: kwargs)
              for name, kwargs in EVAL_SETTINGS.items()}
  common.evaluate_points(workdir, points, settings, _SCALES[scale]["eval_batches"])


def row_metrics(records: Sequence[dict], point, evaluations: Optional[dict]
                ) -> dict[str, Any]:
  moe = point.config.model.moe
  counts = accounting.counts_from_config(point.config)
  row = {"train_capacity_factor": moe.capacity_factor,
         "train_dropped_late": common.late_mean(records, "train/dropped_fraction"),
         "flops_capacity_padding": counts["flops_capacity_padding"],
         "tokens_per_sec": common.late_mean(records, "perf/tokens_per_sec", 0.5)}
  for name in EVAL_SETTINGS:
    result = (evaluations or {}).get(name, {})
    row[f"eval_loss_{name}"] = result.get("eval/loss")
    row[f"eval_dropped_{name}"] = result.get("eval/dropped_fraction")
  return row


def summarize(rows: Sequence[dict], out: str) -> dict[str, Any]:
  del out
  columns = ["eval_loss", "train_dropped_late", "tokens_per_sec", "flops_capacity_padding"]
  columns += [f"eval_loss_{name}" for name in EVAL_SETTINGS]
  columns += [f"eval_dropped_{name}" for name in EVAL_SETTINGS]
  table = common.config_table(rows, columns)
  return {"configs": table, "eval_settings": list(EVAL_SETTINGS)}


def main(argv):
  common.main(sys.modules[__name__], common.define_flags(), argv)


if __name__ == "__main__":
  common.define_flags()  # before app.run parses the command line
  app.run(main)
