r"""Hash routing in the first MoE layers (DeepSeek-V4) against learned routing
and against dense first layers.

Claim (DeepSeek-V4, 2026, model card and `inference/model.py`): the first
three MoE layers of DeepSeek-V4 route by a fixed token-id table (`tid2eid`)
instead of a learned router, keeping a learned gate only to weigh the chosen
experts; the model reaches its quality with them. The premise is that early
layers' routing is a function of the token id anyway (Hash Layers, Roller et
al. 2021, found a fixed hash competitive with learned routing), so fixing it
costs no quality and gives perfectly predictable, load-balanced early layers.
The alternative for the same early layers is DeepSeek-V3's: dense FFNs.

Runs: 4 layers of width 64 (the study model, twice as deep), top-2 of 8
experts of hidden 128, capacity factor 1.25, routing groups of the tokens at
one position (causal), on the built-in synthetic_mixture corpus:
  learned  every layer routed by the learned top-2 router;
  hash2    `first_hash_layers=2`: layers 0-1 route by token-id hash (each
           its own map), weighted by their learned gates; layers 2-3 learned;
  dense2   `first_dense_layers=2`: layers 0-1 dense FFNs of hidden
           top_k * expert_hidden (the same active parameters per token).
Measured per run: final eval loss, MaxVio per layer late in training, and
from a routing trace of the final checkpoint (`moejax.trace`): each MoE
layer's id purity (how often a token goes to its id's usual expert: 1.0 for a
hash layer) and cross-layer predictability.

    python -m experiments.studies.hash_layers --workdir=/tmp/hash_study
"""

import sys
from typing import Any, Optional, Sequence

from absl import app

from experiments.studies import common
from moejax.trace import analysis
from moejax.trace import recorder

BASE_CONFIG = "configs/default.py"

TRACE_KEY = "trace"  # the routing-trace summary in each run's evaluations.json
_SCALES = {
    "full": dict(model={**common.STUDY_MODEL, "model.num_layers": 4}, steps=600,
                 log_every=10, seeds=(0, 1, 2), hash_layers=2),
    "quick": dict(model={**common.QUICK_MODEL, "model.num_layers": 2}, steps=10,
                  log_every=5, seeds=(0,), hash_layers=1),
}


def configs(scale: str) -> list[tuple[str, dict]]:
  """[(config name, overrides)] without seeds: learned, hash<N>, dense<N>."""
  setup = _SCALES[scale]
  shared = {**setup["model"], **common.schedule(setup["steps"], setup["log_every"]),
            "model.moe.router": "topk", "model.moe.top_k": 2, "model.moe.num_experts": 8,
            "model.moe.group_by": "batch"}
  n = setup["hash_layers"]
  return [("learned", shared),
          (f"hash{n}", {**shared, "model.first_hash_layers": n}),
          (f"dense{n}", {**shared, "model.first_dense_layers": n})]


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  return common.seeded_sweep(configs, _SCALES, scale)


def _trace_summary(point, directory: str) -> dict[str, Any]:
  """Per MoE layer: the analysis of the run's routing on its eval batches."""
  del point
  report = analysis.analyze(recorder.record(directory, None))
  return {layer: {name: values.get(name) for name in (
      "id_purity", "predictability", "load_max_over_mean", "specialization_bits")}
          for layer, values in report["layers"].items()}


def postprocess(workdir: str, points, scale: str) -> None:
  """Records each finished run's routing and keeps its per-layer analysis in
  its evaluations.json."""
  del scale
  common.measure_points(workdir, points, TRACE_KEY, _trace_summary)


def row_metrics(records: Sequence[dict], point, evaluations: Optional[dict]
                ) -> dict[str, Any]:
  row = {"first_hash_layers": point.config.model.get("first_hash_layers", 0),
         "first_dense_layers": point.config.model.first_dense_layers,
         "max_violation_late": common.late_mean(records, "train/max_violation"),
         "dropped_late": common.late_mean(records, "train/dropped_fraction")}
  for key in common.layer_keys(records, "train", "max_violation"):
    row[f"{key.split('/')[1]}_max_violation_late"] = common.late_mean(records, key)
  for layer, values in ((evaluations or {}).get(TRACE_KEY) or {}).items():
    for name, value in values.items():
      row[f"layer{layer}_{name}"] = value
  return row


def summarize(rows: Sequence[dict], out: str) -> dict[str, Any]:
  del out
  columns = common.row_columns(rows, lambda c: c == "eval_loss" or c.endswith(
      ("_late", "_id_purity", "_predictability")))
  table = common.config_table(rows, columns)
  for name, stats in common.paired_difference(rows, "eval_loss", "learned").items():
    table[name]["eval_loss_minus_learned"] = stats
  return {"configs": table}


def main(argv):
  common.main(sys.modules[__name__], common.define_flags(), argv)


if __name__ == "__main__":
  common.define_flags()  # before app.run parses the command line
  app.run(main)
