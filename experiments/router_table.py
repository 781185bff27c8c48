r"""The router comparison table of a routers sweep (README "Compare routers").

    python -m experiments.sweep --sweep=configs/sweeps/routers.py:tiny \
        --workdir=/tmp/routers
    python -m experiments.router_table --workdir=/tmp/routers [--json]

One row per finished point of `workdir/points/`: final eval loss, MaxVio
(`train/max_violation`, the mean over the MoE layers of max load / mean load
- 1, Wang et al. 2024) at the last log step and its mean over the last
quarter of the logs, the dropped fraction at the last log step, and the
median tokens/s over the logs (throughput of the same process, so compare
ratios within one table, not across machines).
"""

import json
import os

from absl import app
from absl import flags



def _records(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def point_row(name: str, point_dir: str) -> dict:
  """The table row of one point's metrics.jsonl."""
  records = _records(os.path.join(point_dir, "metrics.jsonl"))
  train = [r for r in records if "train/loss" in r]
  evals = [r for r in records if "eval/loss" in r]
  last = train[-1]
  tail = train[-max(1, len(train) // 4):]
  speeds = sorted(r["perf/tokens_per_sec"] for r in train if "perf/tokens_per_sec" in r)
  violation = [r["train/max_violation"] for r in tail if "train/max_violation" in r]
  return {
      "router": name, "step": last["step"],
      "eval_loss": evals[-1]["eval/loss"] if evals else None,
      "max_violation": last.get("train/max_violation"),
      "max_violation_last_quarter": sum(violation) / len(violation) if violation else None,
      "dropped_fraction": last.get("train/dropped_fraction"),
      "tokens_per_sec": speeds[len(speeds) // 2] if speeds else None,
  }


def _fmt(value, digits=3) -> str:
  return "—" if value is None else f"{value:.{digits}f}"


def main(argv, workdir_flag, json_flag):
  del argv
  points = os.path.join(workdir_flag.value, "points")
  if not os.path.isdir(points):
    raise app.UsageError(f"{points} does not exist: run the sweep first")
  rows = [point_row(name, os.path.join(points, name)) for name in sorted(os.listdir(points))
          if os.path.exists(os.path.join(points, name, "done.json"))]
  if json_flag.value:
    for row in rows:
      print(json.dumps(row))
    return
  print("| router | eval loss | MaxVio (last) | MaxVio (last 25%) | dropped | tokens/s |")
  print("| --- | --- | --- | --- | --- | --- |")
  for row in rows:
    print(f"| {row['router']} | {_fmt(row['eval_loss'])} | {_fmt(row['max_violation'])} | "
          f"{_fmt(row['max_violation_last_quarter'])} | {_fmt(row['dropped_fraction'])} | "
          f"{_fmt(row['tokens_per_sec'], 0)} |")


if __name__ == "__main__":
  # Defined here, not at import: compare_routers imports this module and has
  # its own --workdir.
  _WORKDIR = flags.DEFINE_string("workdir", None, "sweep workdir (holds points/)")
  _JSON = flags.DEFINE_bool("json", False, "print one JSON object per row instead of Markdown")
  flags.mark_flag_as_required("workdir")
  app.run(lambda argv: main(argv, _WORKDIR, _JSON))
