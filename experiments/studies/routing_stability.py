r"""How stable is routing: across checkpoints, precisions and device counts,
and what replaying it does to the loss gap.

Claim (R3, "Stabilizing MoE Reinforcement Learning by Aligning Training and
Inference Routers", arXiv 2510.11370): the same model on the same tokens
routes differently in two engines (about 10% of router decisions, and 94% of
tokens differ in at least one layer, between a bfloat16 rollout engine and
the training engine on Qwen3-30B-A3B); replaying the rollout's routing in
training removes that mismatch and the training-inference loss gap it causes.

Runs: 4 layers of width 64, top-2 of 8 experts, capacity factor 1.25, routing
groups of the tokens at one position, on the built-in synthetic_mixture
corpus, recording a routing trace of the eval batches every 100 steps
(`train.trace_every`). For each run, on its final checkpoint (`postprocess`):
  checkpoints  the fraction of eval tokens whose experts differ between each
               earlier checkpoint's trace and the final one;
  bfloat16     the same checkpoint computing in bfloat16 (`--dtype`): tokens
               whose experts differ from float32, per layer and in any layer,
               and the eval-loss gap to float32;
  replay       bfloat16 with float32's routing replayed (`evaluate --replay`):
               the gap left once routing agrees;
  8 devices    the trace recorded on 8 (host) devices against 1.

    python -m experiments.studies.routing_stability --workdir=/tmp/stability_study
"""

import os
import subprocess
import sys
from typing import Any, Optional, Sequence

from absl import app

from experiments.studies import common
from moejax import evaluate as evaluate_lib
from moejax import trace as trace_lib
from moejax.trace import analysis
from moejax.trace import recorder

BASE_CONFIG = "configs/default.py"

KEY = "stability"  # this study's entry in each run's evaluations.json
_SCALES = {
    "full": dict(model={**common.STUDY_MODEL, "model.num_layers": 4}, steps=600,
                 log_every=10, trace_every=100, seeds=(0, 1, 2), devices=8),
    "quick": dict(model={**common.QUICK_MODEL, "model.num_layers": 2}, steps=10,
                  log_every=5, trace_every=5, seeds=(0,), devices=2),
}


def configs(scale: str) -> list[tuple[str, dict]]:
  setup = _SCALES[scale]
  return [("topk", {**setup["model"], **common.schedule(setup["steps"], setup["log_every"]),
                    "model.moe.router": "topk", "model.moe.top_k": 2,
                    "model.moe.num_experts": 8, "model.moe.group_by": "batch",
                    "train.trace_every": setup["trace_every"]})]


def get_sweep(scale: str) -> list[tuple[str, dict]]:
  return common.seeded_sweep(configs, _SCALES, scale)


def _changed(a: trace_lib.Trace, b: trace_lib.Trace) -> dict[str, Any]:
  stability = analysis.stability(a, b)
  return {"any_layer": stability["changed_any_layer"],
          "per_layer": {k: v["changed_any"] for k, v in stability["layers"].items()},
          "first_expert": {k: v["changed_first"] for k, v in stability["layers"].items()}}


def _record_on_devices(directory: str, out: str, devices: int) -> trace_lib.Trace:
  """The trace of `directory` recorded by a process with `devices` host devices."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  done = subprocess.run([sys.executable, "-m", "moejax.trace", "record",
                         f"--workdir={directory}", f"--out={out}"], env=env,
                        capture_output=True, text=True, check=False, cwd=common.REPO_ROOT)
  if done.returncode:
    raise ValueError(f"recording on {devices} devices failed: {done.stderr[-2000:]}")
  return trace_lib.load(out)


def _measure(directory: str, devices: int) -> dict[str, Any]:
  traces = os.path.join(directory, "traces")
  steps = sorted(int(name.split("_")[1]) for name in os.listdir(traces))
  final = trace_lib.load(os.path.join(traces, f"step_{steps[-1]}"))
  out = {"checkpoints": {str(step): _changed(trace_lib.load(
      os.path.join(traces, f"step_{step}")), final)["any_layer"] for step in steps[:-1]}}
  half = recorder.record(directory, None, dtype="bfloat16")
  out["bfloat16"] = {**_changed(final, half), "eval_loss_float32": final.meta["eval/loss"],
                     "eval_loss_bfloat16": half.meta["eval/loss"]}
  replayed = evaluate_lib.evaluate(directory, replay=final.path, dtype="bfloat16")
  out["bfloat16"]["eval_loss_bfloat16_replayed"] = replayed["eval/loss"]
  many = _record_on_devices(directory, os.path.join(directory, f"trace_{devices}dev"),
                            devices)
  out["devices"] = {"count": devices, **_changed(final, many),
                    "eval_loss": many.meta["eval/loss"]}
  return out


def postprocess(workdir: str, points, scale: str) -> None:
  """`_measure` each finished run once (kept in its evaluations.json)."""
  devices = _SCALES[scale]["devices"]
  common.measure_points(workdir, points, KEY, lambda _, directory: _measure(directory, devices))


def row_metrics(records: Sequence[dict], point, evaluations: Optional[dict]
                ) -> dict[str, Any]:
  del records, point
  measured = (evaluations or {}).get(KEY)
  if not measured:
    return {}
  half, many = measured["bfloat16"], measured["devices"]
  row = {f"changed_since_step{step}": value
         for step, value in measured["checkpoints"].items()}
  row.update({
      "changed_bfloat16": half["any_layer"],
      "changed_bfloat16_first_expert": max(half["first_expert"].values()),
      "loss_gap_bfloat16": half["eval_loss_bfloat16"] - half["eval_loss_float32"],
      "loss_gap_bfloat16_replayed": (half["eval_loss_bfloat16_replayed"]
                                     - half["eval_loss_float32"]),
      "changed_devices": many["any_layer"],
      "loss_gap_devices": many["eval_loss"] - half["eval_loss_float32"]})
  for layer, value in half["per_layer"].items():
    row[f"changed_bfloat16_layer{layer}"] = value
  return row


def summarize(rows: Sequence[dict], out: str) -> dict[str, Any]:
  del out
  columns = common.row_columns(
      rows, lambda c: c == "eval_loss" or c.startswith(("changed_", "loss_gap_")))
  return {"configs": common.config_table(rows, columns)}


def main(argv):
  common.main(sys.modules[__name__], common.define_flags(), argv)


if __name__ == "__main__":
  common.define_flags()  # before app.run parses the command line
  app.run(main)
