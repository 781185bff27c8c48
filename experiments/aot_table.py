r"""The README's "Compiled for hardware we don't have" table: `moejax.aot` over a grid.

    pip install -e '.[aot]'
    python -m experiments.aot_table --out=experiments/results/aot
    python -m experiments.aot_table --out=experiments/results/aot --only=lm1b --larger_batches=2

Each point (a config, a topology and its mesh) is compiled by `python -m
moejax.aot` in its own process; its JSON line (or its one-line "does not
fit" error) is appended to OUT/compiles.jsonl, and points already there are
skipped, so the command resumes. With --larger_batches=N a point that fits is
compiled again at 2x, 4x, ... the batch, up to N times, until one does not
fit: the table's "largest batch that fits" is the largest compiled batch that
fit (a lower bound when every try fit). Writes OUT/table.md and prints it.
Compiler figures and a roofline estimate, not measured step times.
"""

import json
import os
import re
import subprocess
import sys
import time

from absl import app
from absl import flags

# (label, config file, topology, --config overrides).
GRID = (
    ("default", "configs/default.py", "v5e-16", {"mesh.expert": 8}),
    ("default", "configs/default.py", "h100-8", {"mesh.expert": 8}),
    ("lm1b", "configs/lm1b.py", "v4-32", {"mesh.expert": 8}),
    ("lm1b", "configs/lm1b.py", "v5p-64", {"mesh.expert": 8}),
    ("lm1b", "configs/lm1b.py", "v5e-256", {"mesh.expert": 8}),
    ("lm1b", "configs/lm1b.py", "h100-8", {"mesh.expert": 8}),
    ("mixtral_8x7b", "configs/mixtral_8x7b.py", "v5p-64",
     {"mesh.fsdp": 4, "mesh.expert": 8}),
    ("mixtral_8x7b", "configs/mixtral_8x7b.py", "v5e-256",
     {"mesh.fsdp": 32, "mesh.expert": 8, "train.batch_size": 256}),
    # v5e-256 (16x16, no wraparound) has no ragged all-to-all: the padded exchange.
    ("mixtral_8x7b", "configs/mixtral_8x7b.py", "v5e-256",
     {"mesh.fsdp": 32, "mesh.expert": 8, "train.batch_size": 256,
      "model.moe.dropless_exchange": "padded"}),
    ("mixtral_8x7b", "configs/mixtral_8x7b.py", "h100-8",
     {"mesh.fsdp": 8, "train.batch_size": 8}),
    ("deepseek_v3", "configs/deepseek_v3.py", "v5p-64",
     {"mesh.fsdp": 4, "mesh.expert": 8, "train.batch_size": 64}),
    ("deepseek_v3", "configs/deepseek_v3.py", "v5p-512",
     {"mesh.fsdp": 4, "mesh.expert": 64}),
    ("deepseek_v3", "configs/deepseek_v3.py", "v5p-512",
     {"mesh.fsdp": 4, "mesh.expert": 64, "train.seq_len": 1024}),
)

_OUT = flags.DEFINE_string("out", "experiments/results/aot", "Folder of compiles.jsonl.")
_ONLY = flags.DEFINE_list("only", [], "Labels or topologies to compile (default: all).")
_LARGER = flags.DEFINE_integer("larger_batches", 0, "Doublings of the batch to try on "
                               "each point that fits.")


def point_key(label: str, topology: str, overrides: dict) -> str:
  return json.dumps([label, topology, sorted(overrides.items())])


def compile_point(config: str, topology: str, overrides: dict) -> dict:
  """One `moejax.aot` run: its JSON record, or {"error": its one line}."""
  args = [sys.executable, "-m", "moejax.aot", f"--config={config}", f"--topology={topology}"]
  args += [f"--config.{key}={value}" for key, value in overrides.items()]
  start = time.perf_counter()
  result = subprocess.run(args, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if result.returncode == 0:
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_seconds": seconds}
  lines = result.stderr.strip().splitlines() or ["(no message)"]
  return {"error": lines[-1].removeprefix("error: "), "wall_seconds": seconds}


def _done(path: str) -> dict:
  records = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        records[record["key"]] = record
  return records


def _gib(value) -> str:
  return "-" if value is None else f"{value / 2**30:.3g}"


def _short_error(error: str) -> str:
  """The reason of a failed point, without compiler source locations."""
  found = re.search(r"RET_CHECK failure \([^)]*\)\s*\S*\s*(.*)", error)
  if found:
    return "XLA refuses: " + found.group(1)
  return error.split(" on ")[0].removeprefix("the train step ")


def table(records: list[dict]) -> str:
  """Markdown: one row per grid point (the batch the grid names)."""
  rows = ["| config | topology | mesh (data·fsdp·expert·model) | batch | peak / HBM GiB "
          "per device | fits | XLA FLOPs / moejax | all-to-all · ragged · all-reduce · "
          "all-gather · reduce-scatter | est. step s | est. MFU | largest batch that fits "
          "| compile s |",
          "|---|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|"]
  by_point: dict = {}
  for record in records:
    others = tuple(sorted((k, v) for k, v in record["overrides"].items()
                          if k != "train.batch_size" and not k.startswith("mesh.")))
    by_point.setdefault((record["label"], record["topology"], others), []).append(record)
  for (label, topology, others), tries in by_point.items():
    # Settings beyond the mesh and the batch, e.g. "deepseek_v3 (seq_len=1024)".
    if others:
      label += " (" + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in others) + ")"
    # The grid's own batch first, then its doublings (larger batch overrides).
    tries = sorted(tries, key=lambda t: t["overrides"].get("train.batch_size", 0))
    first = tries[0]
    fit = [t for t in tries if "error" not in t]
    largest = max((t["batch_size"] for t in fit), default=None)
    if "error" in first:
      rows.append(f"| {label} | {topology} | {first['mesh_text']} | {first['batch']} | "
                  f"{_short_error(first['error'])} | no "
                  f"| | | | | - | {first['wall_seconds']:.0f} |")
      continue
    c = first["collectives"]
    ratio = ("-" if first["flops_per_device"] is None
             else f"{first['flops_per_device'] / first['model_flops_per_device']:.2f}")
    lower_bound = "≥ " if all("error" not in t and t["fits"] for t in tries) else ""
    mesh = "·".join(str(first["mesh"][a]) for a in ("data", "fsdp", "expert", "model"))
    rows.append(
        f"| {label} | {topology} | {mesh} | {first['batch_size']} | "
        f"{_gib(first['peak_memory_bytes'])} / {_gib(first['memory_capacity_bytes'])} | "
        f"{'yes' if first['fits'] else 'no'} | {ratio} | {c['all-to-all']} · "
        f"{c['ragged-all-to-all']} · {c['all-reduce']} · {c['all-gather']} · "
        f"{c['reduce-scatter']} | {first['estimated_step_seconds']:.3g} | "
        f"{first['estimated_mfu']:.2f} | {lower_bound}{largest} | "
        f"{first['compile_seconds'] + first['eval_compile_seconds']:.0f} |")
  return "\n".join(rows)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "compiles.jsonl")
  done = _done(path)
  for label, config, topology, overrides in GRID:
    if _ONLY.value and label not in _ONLY.value and topology not in _ONLY.value:
      continue
    batch = None
    for attempt in range(_LARGER.value + 1):
      point = dict(overrides)
      if attempt:
        point["train.batch_size"] = batch * 2
      key = point_key(label, topology, point)
      if key not in done:
        print(f"compiling {label} on {topology} {point} ...", file=sys.stderr, flush=True)
        record = compile_point(config, topology, point)
        record.update(key=key, label=label, topology=topology, overrides=point,
                      batch=point.get("train.batch_size", "config"),
                      mesh_text=" ".join(f"{k}={v}" for k, v in point.items()
                                         if k.startswith("mesh.")))
        with open(path, "a") as f:
          f.write(json.dumps(record) + "\n")
        done[key] = record
      record = done[key]
      if "error" in record or not record.get("fits"):
        break
      batch = record["batch_size"]
  text = table([record for record in done.values()])
  with open(os.path.join(_OUT.value, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
