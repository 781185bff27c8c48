r"""python -m moejax.trace record|analyze (see `moejax.trace`).

    python -m moejax.trace record --workdir=DIR --out=TRACE [--num_batches=N]
        [--split=eval|train] [--dtype=float32|bfloat16]
    python -m moejax.trace analyze TRACE [TRACE2] --out=DIR

`record` writes a trace folder and prints a one-line summary; `analyze`
writes DIR/report.json (`moejax.trace.analysis`) and figures (load.png,
concentration.png, coactivation.png, per_layer.png) and prints the report's
per-layer headline numbers. Bad input is one "error: ..." line (status 1;
status 2 for a malformed command line).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from moejax import run as run_lib
from moejax import trace as trace_lib
from moejax.trace import analysis
from moejax.trace import recorder
from moejax.train import checkpoints

_USAGE = ("usage: python -m moejax.trace record --workdir=DIR --out=TRACE [--num_batches=N] "
          "[--split=eval|train]\n       python -m moejax.trace analyze TRACE [TRACE2] "
          "--out=DIR")


def _define_flags():
  return {
      "workdir": flags.DEFINE_string("workdir", None, "record: the run directory."),
      "out": flags.DEFINE_string("out", None, "record: the new trace folder; analyze: the "
                                 "report's folder."),
      "num_batches": flags.DEFINE_integer("num_batches", None, "record: batches (default: "
                                          "the run's train.eval_batches)."),
      "split": flags.DEFINE_enum("split", "eval", ["eval", "train"], "record: the run's "
                                 "eval batches or its first training batches."),
      "dtype": flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "record: the "
                                 "compute dtype (default: as trained)."),
  }


def _usage_error(message: str) -> None:
  print(f"error: {message}\n{_USAGE}", file=sys.stderr)
  sys.exit(2)


def _record(args, cli) -> str:
  if args:
    _usage_error(f"record takes no positional arguments, got {args}")
  if not cli["workdir"].value or not cli["out"].value:
    _usage_error("record needs --workdir and --out")
  trace = recorder.record(cli["workdir"].value, cli["out"].value,
                           num_batches=cli["num_batches"].value, split=cli["split"].value,
                           dtype=cli["dtype"].value)
  return (f"recorded {int(trace.mask.sum())} tokens x {len(trace.layers)} MoE layers "
          f"(step {trace.meta['step']}, eval/loss {trace.meta['eval/loss']:.6f}) "
          f"to {trace.path}")


def _analyze(args, cli) -> str:
  if not 1 <= len(args) <= 2:
    _usage_error(f"analyze takes one or two trace folders, got {len(args)}")
  if not cli["out"].value:
    _usage_error("analyze needs --out")
  out = cli["out"].value
  traces = [trace_lib.load(path) for path in args]
  report = analysis.analyze(*traces)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file, not a folder")
  os.makedirs(out, exist_ok=True)
  run_lib.write_json(os.path.join(out, "report.json"), report)
  figures = analysis.write_figures(report, out)
  lines = []
  for index, layer in report["layers"].items():
    line = (f"layer {index}: max/mean load {layer['load_max_over_mean']:.2f}, zipf alpha "
            f"{layer['zipf_alpha']:.2f}, id purity {layer['id_purity']:.2f}")
    if "predictability" in layer:
      line += f", predictability {layer['predictability']:.2f}"
    if "stability" in report:
      line += f", changed {report['stability']['layers'][index]['changed_any']:.3f}"
    lines.append(line)
  if "stability" in report:
    lines.append(f"tokens changed in any layer: {report['stability']['changed_any_layer']:.3f}")
  lines.append(f"wrote {os.path.join(out, 'report.json')} and {len(figures)} figures")
  return "\n".join(lines)


def main(argv, cli) -> None:
  if len(argv) < 2 or argv[1] not in ("record", "analyze"):
    _usage_error("give a command: record or analyze")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  command, args = argv[1], argv[2:]
  try:
    message = (_record if command == "record" else _analyze)(args, cli)
  except (ValueError, checkpoints.IncompatibleCheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(message)


if __name__ == "__main__":
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI))
