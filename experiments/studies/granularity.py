r"""Fine-grained and shared experts at fixed active and total parameters.

Claims:
  * DeepSeekMoE (Dai et al. 2024, §4.4 and Figure 3): splitting each expert
    into finer ones (and routing to proportionally more) and isolating a
    shared expert both improve quality at the same active and total
    parameters; GShard 0+2/16 -> 1+1/15 -> 1+3/31 -> 1+7/63 (shared + routed
    of total) improves step by step (Pile loss of the 2B models in Table 1:
    GShard 1.867, DeepSeekMoE 1.808).
  * Krajewski et al. 2024 (Table 1): loss falls with granularity G as
    g / G^gamma (g = 2.1, gamma = 0.58 in their units) at fixed N and D.

Runs (study model, 8 experts of hidden H = 128, top-2, capacity 1.25, groups
of one position: causal): granularity G in 1, 2, 4, 8 gives 8 G experts of
hidden H / G with top-2G routing; `shared` variants give one always-active
expert of hidden H / G and route 2G - 1 of 8G - 1 (DeepSeekMoE's
construction), so every run has the same active (2 H) and total (8 H) expert
hidden units; only the routers (D x experts) grow with G. The granularity term
L(G) = l_inf + g / G^gamma is fitted to each variant's runs
(`moejax.scaling.laws.fit_granularity_term`, bootstrap 95% intervals, with the
fit's warnings).

    python -m experiments.studies.granularity --workdir=/tmp/granularity_study
"""

import sys
from typing import Any, Optional, Sequence

from absl import app

from experiments.studies import common
from moejax.scaling import laws

BASE_CONFIG = "configs/default.py"

GRANULARITIES = (1, 2, 4, 8)
NUM_EXPERTS, TOP_K = 8, 2
BOOTSTRAP = 200
_SCALES = {
    "full": dict(model=common.STUDY_MODEL, steps=1000, log_every=20, seeds=(0, 1, 2),
                 granularities=GRANULARITIES),
    "quick": dict(model=common.QUICK_MODEL, steps=12, log_every=4, seeds=(0,),
                  granularities=(1, 2, 4)),
}


def configs(scale: str) -> list[tuple[str, dict]]:
  setup = _SCALES[scale]
  hidden = setup["model"]["model.moe.expert_hidden"]
  shared = {**setup["model"], **common.schedule(setup["steps"], setup["log_every"]),
            "model.moe.router": "topk", "model.moe.group_by": "batch"}
  points = []
  for granularity in setup["granularities"]:
    fine = {"model.moe.num_experts": NUM_EXPERTS * granularity,
            "model.moe.top_k": TOP_K * granularity,
            "model.moe.expert_hidden": hidden // granularity}
    points.append((f"g{granularity}", {**shared, **fine}))
    points.append((f"g{granularity}_shared", {
        **shared, **fine, "model.moe.num_experts": NUM_EXPERTS * granularity - 1,
        "model.moe.top_k": TOP_K * granularity - 1, "model.moe.num_shared_experts": 1}))
  return points


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  return common.seeded_sweep(configs, _SCALES, scale)


def row_metrics(records: Sequence[dict], point, evaluations: Optional[dict]
                ) -> dict[str, Any]:
  del evaluations
  moe = point.config.model.moe
  experts = moe.num_experts + moe.num_shared_experts  # 8 G in both variants
  return {"granularity": experts // NUM_EXPERTS,
          "shared_experts": moe.num_shared_experts,
          "routed": f"{moe.top_k}/{moe.num_experts}",
          "dropped_late": common.late_mean(records, "train/dropped_fraction"),
          "max_violation_late": common.late_mean(records, "train/max_violation")}


def summarize(rows: Sequence[dict], out: str) -> dict[str, Any]:
  del out
  table = common.config_table(rows, ("eval_loss", "params_active_nonembed",
                                     "params_total_nonembed", "dropped_late"))
  for name, stats in common.paired_difference(rows, "eval_loss", "g1").items():
    table[name]["eval_loss_minus_g1"] = stats
  floor = min((r["entropy_floor"] for r in rows if r.get("entropy_floor")), default=None)
  fits = {}
  for variant, shared in (("routed_only", 0), ("shared", 1)):
    runs = [r for r in rows if r["shared_experts"] == shared and r["status"] == "finished"]
    try:
      fit = laws.fit_granularity_term([r["granularity"] for r in runs],
                                      [r["eval_loss"] for r in runs],
                                      bootstrap=BOOTSTRAP, seed=0)
      fit["warnings"] = laws.diagnose(fit, floor)
    except ValueError as e:
      fit = {"error": str(e)}
    fits[variant] = fit
  return {"configs": table, "fits": fits, "entropy_floor": floor}


def main(argv):
  common.main(sys.modules[__name__], common.define_flags(), argv)


if __name__ == "__main__":
  common.define_flags()  # before app.run parses the command line
  app.run(main)
