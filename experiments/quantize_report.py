r"""Eval loss and expert memory of a checkpoint under per-expert weight quantization.

    python -m experiments.quantize_report --workdir=DIR [--num_batches=N]
        [--settings=int8,int4,int8_shared,int4_shared] [--out=FILE]

Evaluates the newest checkpoint of DIR (`moejax.evaluate`, routing as
trained) in float and with its routed experts' kernels quantized by qwix in
each setting (`moejax.quantize`: "int8"/"int4" with one scale per expert and
output channel; "_shared" with one scale per output channel for all experts
of a layer), and prints one JSON object:

  float             {"eval/loss", "expert_param_bytes"}
  settings          per setting: "eval/loss", "delta" (quantized - float),
                    "relative_change" (delta / float loss), "expert_param_bytes"
                    (qvalues at 8 or 4 bits + float32 scales), "memory_ratio"
                    (against float)
  weight_stats      per routed-expert kernel (parameter path): min, max, std and
                    absmax of every expert, and absmax_max_over_median (how far
                    the largest expert's range exceeds the typical one: what a
                    shared scale has to cover)

Bad input (no checkpoint, an unknown setting) is one line naming it.
--out=FILE writes the JSON there instead of printing it.
"""

from typing import Any, Sequence

from absl import app
from absl import flags

from moejax import evaluate as evaluate_lib
from moejax import parallel
from moejax import quantize as quantize_lib
from moejax import model as model_lib
from moejax import run as run_lib


def weight_stats(workdir: str) -> dict[str, Any]:
  """`quantize.expert_weight_stats` of the newest checkpoint of `workdir`."""
  run = run_lib.Run(workdir)
  _, config = run.newest()
  dataset = run.dataset(config)
  mesh = model_lib.reader_mesh(config, config.train.batch_size)
  with parallel.activate(mesh):
    _, _, params = run.restore_params(config, dataset.vocab_size, mesh)
  return quantize_lib.expert_weight_stats(params)


def report(workdir: str, *, settings: Sequence[str], num_batches=None) -> dict[str, Any]:
  for setting in settings:
    quantize_lib.check_setting(setting)
  base = evaluate_lib.evaluate(workdir, num_batches=num_batches)
  if not base["expert_param_bytes"]:
    raise ValueError(f"{workdir}: the model has no routed experts to quantize")
  out = {"workdir": base["workdir"], "step": base["step"], "num_batches": base["num_batches"],
         "tokens": base["tokens"], "router": base["router"],
         "float": {"eval/loss": base["eval/loss"],
                   "expert_param_bytes": base["expert_param_bytes"]},
         "settings": {}}
  for setting in settings:
    result = evaluate_lib.evaluate(workdir, num_batches=num_batches, quantize=setting)
    delta = result["eval/loss"] - base["eval/loss"]
    out["settings"][setting] = {
        "eval/loss": result["eval/loss"], "delta": delta,
        "relative_change": delta / base["eval/loss"],
        "expert_param_bytes": result["expert_param_bytes"],
        "memory_ratio": result["expert_param_bytes"] / base["expert_param_bytes"]}
  out["weight_stats"] = weight_stats(workdir)
  return out


def main(argv, cli: dict[str, Any]):
  evaluate_lib.json_cli(argv, cli, lambda: report(
      cli["workdir"].value, settings=cli["settings"].value,
      num_batches=cli["num_batches"].value))


if __name__ == "__main__":
  _CLI = {
      "workdir": flags.DEFINE_string("workdir", None, "Run directory with checkpoints/."),
      "settings": flags.DEFINE_list("settings", list(quantize_lib.SETTINGS),
                                    "Quantization settings (moejax.quantize.SETTINGS)."),
      "num_batches": flags.DEFINE_integer("num_batches", None, "Eval batches (default: "
                                          "the run's eval_batches)."),
      "out": flags.DEFINE_string("out", None, "Write the JSON here (default: print it)."),
  }
  app.run(lambda argv: main(argv, _CLI))
