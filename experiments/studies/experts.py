r"""More experts at fixed compute (Switch Transformer Figure 4; Clark et al. 2022).

Claims:
  * Switch Transformer (Fedus et al. 2022, §3.1, Figure 4): at a fixed
    number of FLOPs per token, loss keeps falling as experts are added (2 to
    256 experts over T5-Base); Switch-Base with 64 experts reaches T5-Base's
    step-60k quality at a 7.5x speed-up in steps.
  * Clark et al. 2022: the gain is log-linear in the expert count and
    saturates (Ê with E_start = 1.85, E_max = 315 for S-BASE), and shrinks
    with model size.

Runs (study model, FFN hidden H = 128 per token everywhere, so every run has
the same active parameters and FLOPs per token): dense (one FFN of hidden H),
then switch (top-1) over E = 2, 4, 8, 16, 32 experts of hidden H, capacity
1.25, groups of one sequence (top-1 in position order is causal). Training
runs long enough (about 5M tokens) for MoE gains to appear at this size.
Clark et al.'s law at one model size reduces to log L = b_N log Ê + d_N; its
slope b_N is fitted over the MoE runs with a bootstrap interval.

    python -m experiments.studies.experts --workdir=/tmp/experts_study
"""

import sys
from typing import Any, Optional, Sequence

from absl import app
import numpy as np

from experiments.studies import common
from moejax.scaling import laws

BASE_CONFIG = "configs/default.py"

NUM_EXPERTS = (2, 4, 8, 16, 32)
_SCALES = {
    "full": dict(model=common.STUDY_MODEL, steps=2500, log_every=50, seeds=(0, 1),
                 experts=NUM_EXPERTS),
    "quick": dict(model=common.QUICK_MODEL, steps=12, log_every=4, seeds=(0,),
                  experts=(2, 8)),
}


def configs(scale: str) -> list[tuple[str, dict]]:
  setup = _SCALES[scale]
  shared = {**setup["model"], **common.schedule(setup["steps"], setup["log_every"]),
            "model.moe.top_k": 1, "model.moe.group_by": "sequence",
            "train.eval_every": setup["steps"] // 5}
  points = [("dense", {**shared, "model.moe.router": "dense", "model.moe.num_experts": 1})]
  for experts in setup["experts"]:
    points.append((f"e{experts}", {**shared, "model.moe.router": "switch",
                                   "model.moe.num_experts": experts}))
  return points


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  return common.seeded_sweep(configs, _SCALES, scale)


def row_metrics(records: Sequence[dict], point, evaluations: Optional[dict]
                ) -> dict[str, Any]:
  del evaluations
  moe = point.config.model.moe
  experts = 1 if moe.router == "dense" else moe.num_experts
  return {"num_experts": experts,
          "dropped_late": common.late_mean(records, "train/dropped_fraction"),
          "max_violation_late": common.late_mean(records, "train/max_violation")}


def fit_log_slope(experts, losses, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
  """log L = slope log Ê + intercept over runs at one N, with a bootstrap 95%
  interval on the slope (Ê: Clark et al.'s saturating count at S-BASE's
  E_start, E_max)."""
  e_hat = np.log(laws.clark_e_hat(np.asarray(experts, np.float64)))
  log_l = np.log(np.asarray(losses, np.float64))
  if np.unique(e_hat).size < 2:
    raise ValueError("needs at least 2 distinct expert counts")
  slope, intercept = np.polyfit(e_hat, log_l, 1)
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    index = rng.integers(0, e_hat.size, e_hat.size)
    if np.unique(e_hat[index]).size >= 2:
      samples.append(np.polyfit(e_hat[index], log_l[index], 1)[0])
  ci = np.percentile(samples, [2.5, 97.5]).tolist() if samples else None
  return {"slope": float(slope), "slope_ci95": ci, "intercept": float(intercept),
          "formula": "log L = slope log Ê + intercept", "e_start": laws.CLARK_E_START,
          "e_max": laws.CLARK_E_MAX, "num_points": int(e_hat.size)}


def summarize(rows: Sequence[dict], out: str) -> dict[str, Any]:
  del out
  table = common.config_table(rows, ("eval_loss", "params_active_nonembed",
                                     "params_total_nonembed", "flops_per_token", "dropped_late"))
  for name, stats in common.paired_difference(rows, "eval_loss", "dense").items():
    table[name]["eval_loss_minus_dense"] = stats
  moe = [r for r in rows if r["num_experts"] > 1 and r["status"] == "finished"]
  try:
    fit = fit_log_slope([r["num_experts"] for r in moe], [r["eval_loss"] for r in moe])
  except ValueError as e:
    fit = {"error": str(e)}
  return {"configs": table, "clark_slope_fit": fit}


def main(argv):
  common.main(sys.modules[__name__], common.define_flags(), argv)


if __name__ == "__main__":
  common.define_flags()  # before app.run parses the command line
  app.run(main)
