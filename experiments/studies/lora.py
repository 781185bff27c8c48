r"""LoRA on an MoE: adapt the router, the experts, or both? (moejax.train.lora)

A base MoE (the study model: 2 layers, d_model 64, top-2 of 8 experts,
capacity 1.25, groups of one position) trains on domains 0, 1, 2 of the
built-in synthetic_mixture corpus (4 Markov sources; domain 3 is never
seen). Each arm then fine-tunes it with LoRA (rank 4, alpha 16) on domain 3
only, for the same steps:
  router          adapters on the router kernels only
  experts         one adapter per routed expert (wi and wo)
  router_experts  both
Per run it records the trainable (adapter) parameters, the final held-out
loss on domain 3, the loss on each old domain (forgetting), and how routing
shifts: per layer, the expert load of domain-3 tokens (first choices) and the
total-variation distance of that load from the base's, and the expert-domain
mutual information over all four domains (bits). The base itself is row
`base` (no fine-tuning).

    python -m experiments.studies.lora --workdir=/tmp/lora_study [--scale=quick]

writes WORKDIR/points/<name>/ (resumable: finished runs are skipped) and
WORKDIR/results/ (or experiments/results/lora for the full scale):
runs.csv (one row per run), summary.json (per arm: mean, std and n over
seeds of each number, and per-layer loads), and each run's metrics.jsonl,
config.json and finetuned_from.json under runs/<name>/.
"""

import datetime
import os
import shutil
from typing import Any

from absl import app
import jax
import ml_collections
import numpy as np

from experiments import sweep
from experiments.studies import common
from moejax import data as data_lib
from moejax import parallel
from moejax.train import config as config_lib
from moejax.train import lora as lora_lib
from moejax.train import metrics as metrics_lib
from moejax.train import routing_report
from moejax import model as model_lib
from moejax import run as run_lib
from moejax import train as train_lib
from moejax.train import evaluator as evaluator_lib

ARMS = {"router": "router", "experts": "experts", "router_experts": "router,experts"}
OLD_DOMAINS, NEW_DOMAIN = "0,1,2", "3"
_SCALES = {
    "full": dict(model=common.STUDY_MODEL, base=400, tune=200, log_every=10,
                 seeds=(0, 1, 2), rank=4, eval_batches=8),
    "quick": dict(model=common.QUICK_MODEL, base=10, tune=6, log_every=5, seeds=(0,),
                  rank=2, eval_batches=1),
}
_MOE = {"model.moe.router": "topk", "model.moe.top_k": 2, "model.moe.num_experts": 8,
        "model.moe.group_by": "batch", "data.num_domains": 4}


def plan(workdir: str, scale: str) -> list[tuple[str, str, int, ml_collections.ConfigDict]]:
  """[(run name, arm, seed, config)] in training order (each seed's base
  before the arms that start from it)."""
  common.check_scale(scale)
  setup = _SCALES[scale]
  runs = []
  for seed in setup["seeds"]:
    shared = {**setup["model"], **_MOE, "seed": seed}
    base_name = f"base_s{seed}"
    runs.append((base_name, "base", seed, sweep.apply_overrides(
        config_lib.default_config(), {**shared, "data.domains": OLD_DOMAINS,
                                      **common.schedule(setup["base"], setup["log_every"])})))
    for arm, targets in ARMS.items():
      runs.append((f"{arm}_s{seed}", arm, seed, sweep.apply_overrides(
          config_lib.default_config(),
          {**shared, "data.domains": NEW_DOMAIN,
           "finetune.base": common.point_dir(workdir, base_name),
           "finetune.lora.rank": setup["rank"], "finetune.lora.targets": targets,
           **common.schedule(setup["tune"], setup["log_every"])})))
  return runs


def measure(path: str, config: ml_collections.ConfigDict, num_batches: int) -> dict[str, Any]:
  """The study's numbers for one finished run (see the module docstring): its
  newest checkpoint restored once, evaluated on held-out rows of each domain
  and of all of them."""
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.expert, config.mesh.model = 1, 1, 1
  mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
  num_domains = config.data.num_domains

  def batches(domains: str):
    data_config = config.data.copy_and_resolve_references()
    data_config.domains = domains
    dataset = data_lib.make_dataset(
        data_config, seq_len=config.train.seq_len, global_batch_size=config.train.batch_size,
        seed=config.seed)
    return [model_lib.global_batch(b, parallel.batch_sharding(mesh))
            for b in dataset.eval_batches(num_batches)]

  out: dict[str, Any] = {}
  with parallel.activate(mesh):
    _, graphdef, params = run_lib.Run(path).restore_params(config, config.data.vocab_size,
                                                           mesh)
    evaluator = evaluator_lib.Evaluator(graphdef, num_domains=num_domains)
    for domain in range(num_domains):
      out[f"loss_domain{domain}"] = evaluator.run(params, batches(str(domain)))["loss"]
    joint = evaluator.run(params, batches(""))["joint"]  # [layers, domains, E]
  new = int(NEW_DOMAIN)
  out["new_domain_load"] = [(j[new] / max(j[new].sum(), 1.0)).tolist() for j in joint]
  out["expert_domain_mi"] = [routing_report.mutual_information_bits(j) for j in joint]
  return out


def run_study(workdir: str, scale: str, out: str) -> dict[str, Any]:
  """Trains what is not finished, measures every run, writes and returns the summary."""
  common.announce_scale(scale)
  setup = _SCALES[scale]
  rows, loads = [], {}
  for name, arm, seed, config in plan(workdir, scale):
    path = common.point_dir(workdir, name)
    print(f"== {name}: {config.train.steps} steps", flush=True)
    train_lib.train_and_evaluate(config, path)
    numbers = measure(path, config, setup["eval_batches"])
    loads[name] = numbers.pop("new_domain_load")
    mi = numbers.pop("expert_domain_mi")
    record = lora_lib.read_record(path) or {}
    adapter_params = record.get("adapter_params", {})
    records = metrics_lib.read_records(os.path.join(path, "metrics.jsonl"))
    rows.append({"name": name, "config": arm, "seed": seed, "status": "finished",
                 "steps": config.train.steps,
                 "trainable_params": (sum(adapter_params.values()) if adapter_params else
                                      run_lib.read_json(os.path.join(
                                          path, "summary.json"))["params"]["total"]),
                 **{f"adapter_params_{k}": v for k, v in adapter_params.items()},
                 "loss_new_domain": numbers[f"loss_domain{NEW_DOMAIN}"],
                 "loss_old_domains": float(np.mean(
                     [numbers[f"loss_domain{d}"] for d in OLD_DOMAINS.split(",")])),
                 **numbers,
                 **{f"mi_layer{i}": v for i, v in enumerate(mi)},
                 "mi_mean": float(np.mean(mi)),
                 "final_train_loss": common.late_mean(records, "train/loss")})
    os.makedirs(os.path.join(out, "runs", name), exist_ok=True)
    for kept in ("metrics.jsonl", "config.json", lora_lib.RECORD_FILE):
      if os.path.exists(os.path.join(path, kept)):
        shutil.copy(os.path.join(path, kept), os.path.join(out, "runs", name))
  for row in rows:  # routing shift on the new domain against the seed's base
    base_loads = loads[f"base_s{row['seed']}"]
    for i, (load, reference) in enumerate(zip(loads[row["name"]], base_loads)):
      row[f"load_shift_layer{i}"] = 0.5 * float(np.abs(np.subtract(load, reference)).sum())
  common.write_rows(os.path.join(out, "runs.csv"), rows)
  numeric = [k for k in rows[0] if k not in ("name", "config", "seed", "status")
             and all(isinstance(r.get(k), (int, float)) for r in rows)]
  configs = {}
  for arm in ("base",) + tuple(ARMS):
    arm_rows = [r for r in rows if r["config"] == arm]
    configs[arm] = {k: common.mean_std([r[k] for r in arm_rows]) for k in numeric}
    configs[arm]["new_domain_load"] = np.mean(
        [loads[r["name"]] for r in arm_rows], axis=0).tolist()
  summary = {"scale": scale, "date": datetime.date.today().isoformat(),
             "seeds": list(setup["seeds"]), "base_steps": setup["base"],
             "tune_steps": setup["tune"], "rank": setup["rank"],
             "old_domains": OLD_DOMAINS, "new_domain": NEW_DOMAIN, "configs": configs}
  run_lib.write_json(os.path.join(out, "summary.json"), summary, indent=1)
  return summary


def _means(summary: dict[str, Any]) -> dict[str, Any]:
  return {arm: {k: v["mean"] for k, v in numbers.items() if isinstance(v, dict)}
          for arm, numbers in summary["configs"].items()}


def main(argv):
  common.standalone_main(argv, "lora", run_study, _means)


if __name__ == "__main__":
  common.define_flags()  # before app.run parses the command line
  app.run(main)
