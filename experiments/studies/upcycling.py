r"""Sparse upcycling vs continued dense training vs MoE from scratch (Komatsuzaki et al. 2023).

Claim (Sparse Upcycling, §4 and Fig. 2-3): starting an MoE from a dense
checkpoint (experts = copies of the dense MLP, router new) beats continuing
to train the dense model for the same extra compute, and beats an MoE trained
from scratch unless that gets a large budget (about 100%+ of the dense sunk
cost); the paper's upcycled models reach their gains with about 50% extra of
the dense sunk cost.

This study, on the built-in synthetic_mixture corpus with the study model
(2 layers, d_model 64), per seed:
  dense           the sunk cost: a dense model (router=dense, top_k=1, FFN hidden
                  = one expert) trained for SUNK steps;
then, for the same extra training FLOPs (moejax.scaling.accounting):
  dense_continued the dense model, continued (init.upcycle_from=dense: all
                  parameters copied, optimizer and schedule restarted);
  upcycled        top-2 of 8 experts, every expert a copy of the dense FFN,
                  router fresh, capacity 1.25, groups of one position;
  scratch         the same MoE from a random initialization.
The MoE arms cost more FLOPs per token (two experts per token), so they train
fewer steps: steps = EXTRA * dense FLOPs per token / MoE FLOPs per token.
Every run warms the learning rate up over its first 10% of steps and decays
it by cosine over its own steps (a continuation re-warms, as a new run does).

    python -m experiments.studies.upcycling --workdir=/tmp/upcycling_study [--scale=quick]

writes WORKDIR/points/<arm>_s<seed>/ (resumable: finished runs are skipped)
and WORKDIR/results/ (or experiments/results/upcycling for the full scale):
runs.csv (one row per run: name, config, seed, status, steps, extra_flops,
eval_loss, train_loss), summary.json (per arm the final eval loss, mean, std
and n over seeds, and the paired difference to dense_continued), and each
run's metrics.jsonl and config.json under runs/<name>/.
"""

import csv
import datetime
import os
import shutil
from typing import Any

from absl import app
import ml_collections

from experiments import sweep
from experiments.studies import common
from moejax.scaling import accounting
from moejax.train import config as config_lib
from moejax.train import metrics as metrics_lib
from moejax import model as model_lib
from moejax import train as train_lib
from moejax import run as run_lib

ARMS = ("dense_continued", "upcycled", "scratch")
_SCALES = {
    "full": dict(model=common.STUDY_MODEL, sunk=400, extra=400, log_every=10,
                 seeds=(0, 1, 2)),
    "quick": dict(model=common.QUICK_MODEL, sunk=10, extra=10, log_every=5, seeds=(0,)),
}
_MOE = {"model.moe.router": "topk", "model.moe.top_k": 2, "model.moe.num_experts": 8,
        "model.moe.group_by": "batch"}
_DENSE = {"model.moe.router": "dense", "model.moe.top_k": 1}


def _config(overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  # Validated when it trains (its upcycle_from may not exist yet).
  return sweep.apply_overrides(config_lib.default_config(), overrides)


def _flops_per_token(config) -> float:
  kwargs = model_lib.architecture(config, config.data.vocab_size)
  return accounting.train_flops_per_token(**kwargs, seq_len=config.train.seq_len)


def plan(workdir: str, scale: str) -> list[tuple[str, str, int, ml_collections.ConfigDict]]:
  """[(run name, arm, seed, config)] in training order (each seed's dense run
  before the arms that start from it)."""
  common.check_scale(scale)
  setup = _SCALES[scale]
  runs = []
  for seed in setup["seeds"]:
    base = {**setup["model"], "seed": seed}
    dense_name = f"dense_s{seed}"
    dense = _config({**base, **_DENSE, **common.schedule(setup["sunk"], setup["log_every"])})
    runs.append((dense_name, "dense", seed, dense))
    source = {"init.upcycle_from": common.point_dir(workdir, dense_name)}
    moe_steps = round(setup["extra"] * _flops_per_token(dense) / _flops_per_token(
        _config({**base, **_MOE})))
    for arm, overrides, steps in (
        ("dense_continued", {**_DENSE, **source}, setup["extra"]),
        ("upcycled", {**_MOE, **source}, moe_steps),
        ("scratch", _MOE, moe_steps)):
      config = _config({**base, **overrides, **common.schedule(steps, setup["log_every"])})
      runs.append((f"{arm}_s{seed}", arm, seed, config))
  return runs


def run_study(workdir: str, scale: str, out: str) -> dict[str, Any]:
  """Trains what is not finished, then writes and returns the summary."""
  common.announce_scale(scale)
  runs = plan(workdir, scale)
  rows = []
  for name, arm, seed, config in runs:
    path = common.point_dir(workdir, name)
    print(f"== {name}: {config.train.steps} steps", flush=True)
    train_lib.train_and_evaluate(config, path)
    records = metrics_lib.read_records(os.path.join(path, "metrics.jsonl"))
    flops = _flops_per_token(config) * config.train.batch_size * config.train.seq_len
    rows.append({"name": name, "config": arm, "seed": seed, "status": "finished",
                 "steps": config.train.steps, "extra_flops": 0 if arm == "dense"
                 else flops * config.train.steps,
                 "eval_loss": common.final(records, "eval/loss"),
                 "train_loss": common.late_mean(records, "train/loss")})
    os.makedirs(os.path.join(out, "runs", name), exist_ok=True)
    for kept in ("metrics.jsonl", "config.json"):
      shutil.copy(os.path.join(path, kept), os.path.join(out, "runs", name))
  with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  by_seed = {(r["config"], r["seed"]): r["eval_loss"] for r in rows}
  seeds = sorted({r["seed"] for r in rows})
  configs = {}
  for arm in ("dense",) + ARMS:
    losses = [by_seed[(arm, s)] for s in seeds]
    configs[arm] = {"eval_loss": common.mean_std(losses),
                    "steps": next(r["steps"] for r in rows if r["config"] == arm),
                    "extra_flops": next(r["extra_flops"] for r in rows if r["config"] == arm)}
    if arm != "dense":
      configs[arm]["minus_dense_continued"] = common.mean_std(
          [by_seed[(arm, s)] - by_seed[("dense_continued", s)] for s in seeds])
  summary = {"scale": scale, "date": datetime.date.today().isoformat(), "seeds": seeds,
             "sunk_steps": _SCALES[scale]["sunk"], "configs": configs}
  run_lib.write_json(os.path.join(out, "summary.json"), summary, indent=1)
  return summary


def main(argv):
  common.standalone_main(argv, "upcycling", run_study, lambda summary: summary["configs"])


if __name__ == "__main__":
  common.define_flags()  # before app.run parses the command line
  app.run(main)
