r"""Expert choice against top-2, and how much of its gain is the causality leak.

Claims:
  * Expert choice (Zhou et al. 2022, abstract and §4, Figure 2a): EC-CF2 (each
    expert takes capacity_factor * S / E tokens, 2 experts per token on
    average) "improves training convergence time by more than 2x" over GShard
    top-2, reaching its perplexity in less than half the steps.
  * Wang et al. 2024 (§5.2, Appendix D.2): expert choice over a sequence lets a
    decoder see the future (whether token t gets an expert depends on later
    tokens' scores); shrinking routing chunks from 8192 to 512 tokens gave an
    "abnormal loss drop (about 10%)", i.e. part of the gain is leaked
    information, not better routing.

Runs (8 experts, expert hidden H, 2 experts per token on average everywhere):
  topk          top-2 token choice, capacity 1.25, groups of the tokens at one
                position (causal);
  ec_sequence   expert choice, capacity factor 2, groups of one sequence (the
                Expert Choice paper's setting: leaks the future);
  ec_batch      expert choice, capacity factor 2, groups of the tokens at one
                position (causal in time).
Each checkpoint is evaluated (`moejax.evaluate`) as trained and with the
future scrambled: every row's tokens from position L/2 on are replaced by
another row's, and the loss is counted on positions < L/2 only. A causal model
scores exactly the same both ways; `future_leak` = scrambled - real is what the
model draws from tokens it should not see. `ec_sequence` is also evaluated
with causal groups (`group_by=batch`): its loss without the leak.

    python -m experiments.studies.expert_choice --workdir=/tmp/ec_study
"""

import sys
from typing import Any, Optional, Sequence

from absl import app

from experiments.studies import common

BASE_CONFIG = "configs/default.py"

_SCALES = {
    "full": dict(model=common.STUDY_MODEL, steps=600, log_every=20, seeds=(0, 1, 2),
                 eval_batches=16),
    "quick": dict(model=common.QUICK_MODEL, steps=15, log_every=5, seeds=(0, 1),
                  eval_batches=1),
}


def configs(scale: str) -> list[tuple[str, dict]]:
  setup = _SCALES[scale]
  shared = {**setup["model"], **common.schedule(setup["steps"], setup["log_every"]),
            "model.moe.num_experts": 8, "model.moe.top_k": 2}
  points = [("topk", {**shared, "model.moe.router": "topk", "model.moe.group_by": "batch"}),
            ("ec_sequence", {**shared, "model.moe.router": "expert_choice",
                             "model.moe.capacity_factor": 2.0,
                             "model.moe.group_by": "sequence"})]
  if scale == "full":
    points.append(("ec_batch", {**shared, "model.moe.router": "expert_choice",
                                "model.moe.capacity_factor": 2.0,
                                "model.moe.group_by": "batch"}))
  return points


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  return common.seeded_sweep(configs, _SCALES, scale)


def postprocess(workdir: str, points, scale: str) -> None:
  def scrambled(point):
    return {"scramble_after": point.config.train.seq_len // 2}

  def causal_groups(point):
    if point.config.model.moe.group_by != "sequence":
      return None
    return {"group_by": "batch"}

  common.evaluate_points(workdir, points, {"scrambled": scrambled,
                                           "causal_groups": causal_groups},
                         _SCALES[scale]["eval_batches"])


def row_metrics(records: Sequence[dict], point, evaluations: Optional[dict]
                ) -> dict[str, Any]:
  evaluations = evaluations or {}
  scrambled = evaluations.get("scrambled", {})
  causal = evaluations.get("causal_groups", {})
  return {"router": point.config.model.moe.router,
          "group_by": point.config.model.moe.group_by,
          "eval_loss_16batches": scrambled.get("eval/loss"),
          "loss_first_half": scrambled.get("eval/loss_before"),
          "loss_first_half_scrambled": scrambled.get("eval/loss_before_scrambled"),
          "future_leak": scrambled.get("eval/future_leak"),
          "eval_loss_causal_groups": causal.get("eval/loss"),
          "unrouted_late": common.late_mean(records, "train/unrouted_fraction")}


def summarize(rows: Sequence[dict], out: str) -> dict[str, Any]:
  del out
  columns = ("eval_loss", "eval_loss_16batches", "loss_first_half",
             "loss_first_half_scrambled", "future_leak", "eval_loss_causal_groups",
             "unrouted_late")
  table = common.config_table(rows, columns)
  for column in ("eval_loss_16batches", "loss_first_half"):
    for name, stats in common.paired_difference(rows, column, "topk").items():
      table[name][f"{column}_minus_topk"] = stats
  # The leaky model routed causally, against the model trained causally (same seed).
  batch = {r["seed"]: r for r in rows if r["config"] == "ec_batch" and r["status"] == "finished"}
  diffs = [r["eval_loss_causal_groups"] - batch[r["seed"]]["eval_loss_16batches"]
           for r in rows if r["config"] == "ec_sequence" and r["seed"] in batch
           and r.get("eval_loss_causal_groups") is not None]
  if "ec_sequence" in table:
    table["ec_sequence"]["causal_groups_minus_ec_batch"] = common.mean_std(diffs)
  return {"configs": table}


def main(argv):
  common.main(sys.modules[__name__], common.define_flags(), argv)


if __name__ == "__main__":
  common.define_flags()  # before app.run parses the command line
  app.run(main)
