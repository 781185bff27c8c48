r"""Runs a sweep: the named points of a configs/sweeps/ module, one after another.

    python -m experiments.sweep --sweep=configs/sweeps/granularity.py:tiny \
        --workdir=/tmp/granularity [--shard=0/4] [--extra=train.steps=50 ...]

A sweep module defines `BASE_CONFIG` (a config file, path relative to the
repository root or the current directory) and `get_sweep(scale)` returning
`[(name, overrides)]`, overrides being dotted keys relative to `config`
(`{"model.moe.num_experts": 8}`). Every point's config (base, then the
point's overrides, then --extra) is validated, model included, before
anything trains. Point i trains in `workdir/points/<name>` through
`moejax.train.train_and_evaluate` in this process (compiled functions are cached
per shape); `--shard=i/n` runs the i-th of n interleaved slices
(`shard_assignment`: every slice covers the sweep's range of each swept key),
so n machines can share one workdir.

A point is finished when `points/<name>/done.json` exists (written after its
last step, holding its results row); finished points are skipped, so running
the same command again resumes the sweep, and an unfinished point resumes
from its own checkpoints. After the run `workdir/results.csv` is rewritten
from every finished point in the workdir (all shards'): one row per point,
the override keys (--extra included) as columns, then `RESULT_COLUMNS`;
wall_seconds is the time of the invocation that finished the point (compile
included; an interrupted point's earlier invocations are not added).

Exit status: 0 when every point of the shard finished, or when SIGTERM
stopped a point (its checkpoint is saved; the sweep ends there, later signals
are ignored until exit); 130 after Ctrl-C (likewise, the point's checkpoint
saved); 1 for an invalid sweep, or points that diverged.
"""

import ast
import collections
import csv
import dataclasses
import importlib.util
import json
import os
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from moejax.nn import NonCausalRoutingWarning
from moejax.scaling import accounting
from moejax.train import config as config_lib
from moejax.train import signals
from moejax import model as model_lib
from moejax import run as run_lib
from moejax import train as train_lib

RESULT_COLUMNS = ("num_experts", "top_k", "granularity", "params_total_nonembed",
                  "params_active_nonembed", "flops_per_token", "flops_capacity_padding",
                  "tokens_seen", "train_loss", "eval_loss", "entropy_floor", "wall_seconds")
DONE = "done.json"
FAILED = "failed.json"  # a point whose loss diverged: a result, not retried
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its index in the sweep, name, overrides and config."""
  index: int
  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict


def _resolve(path: str) -> str:
  """A path as given, or relative to the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  return os.path.join(_REPO_ROOT, path)


def load_module(path: str, name: str):
  path = _resolve(path)
  if not os.path.exists(path):
    raise ValueError(f"no such file: {path}")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as `ml_collections.config_flags` loads it."""
  return load_module(path, "sweep_base_config").get_config()


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys (relative to `config`) set.

  Raises ValueError naming the key if it does not exist or the value has the
  wrong type (ml_collections keeps each key's type, as on the command line).
  """
  config = ml_collections.ConfigDict(config.to_dict())  # deep copy, unlocked
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ValueError(f"unknown config key config.{key}; see the README config table")
      node = node[part]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      raise ValueError(f"unknown config key config.{key}; see the README config table")
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.{key}={value!r}: {e}") from e
  return config


def parse_extra(items: Sequence[str]) -> dict[str, Any]:
  """["train.steps=50", "model.moe.router=topk"] -> {key: value}; values are
  Python literals where they parse as one (50, 0.5, True, None), else strings."""
  extra = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--extra must be key=value, got {item!r}")
    try:
      extra[key.removeprefix("config.")] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      extra[key.removeprefix("config.")] = text
  return extra


def parse_shard(text: str) -> tuple[int, int]:
  """"i/n" -> (i, n) with 0 <= i < n."""
  try:
    index, count = (int(part) for part in text.split("/"))
  except ValueError:
    raise ValueError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
  if not 0 <= index < count:
    raise ValueError(f"--shard={text}: need 0 <= i < n")
  return index, count


def shard_assignment(points: Sequence[Point], count: int) -> list[int]:
  """The shard of each point when a sweep is split `count` ways.

  Points are dealt in rounds of `count` in sweep order (shard sizes differ by
  at most one); within a round each point goes to the free shard that already
  holds the fewest of its (key, value) overrides. A grid swept as
  size x budget x G therefore gives every shard small and large points of
  every G, instead of shard 0 holding only G = 1 (as `index % count` did).
  Deterministic: every machine of a job array computes the same split.
  """
  held = [collections.Counter() for _ in range(count)]
  shards = []
  for start in range(0, len(points), count):
    free = list(range(count))
    for point in points[start:start + count]:
      pairs = [(key, json.dumps(value, sort_keys=True, default=str))
               for key, value in point.overrides.items()]
      best = min(free, key=lambda shard: (sum(held[shard][pair] for pair in pairs), shard))
      free.remove(best)
      held[best].update(pairs)
      shards.append(best)
  return shards


def load_sweep(spec: str, extra: Optional[dict[str, Any]] = None) -> list[Point]:
  """The validated points of "path/to/sweep.py:scale".

  Raises ValueError (naming the point and the key) if any point's config is
  invalid, before anything is trained.
  """
  path, sep, scale = spec.rpartition(":")
  if not sep or not path:
    raise ValueError(f"--sweep must be path/to/sweep.py:scale, got {spec!r}")
  module = load_module(path, "sweep_definition")
  base = load_config_file(module.BASE_CONFIG)
  points = []
  for index, (name, overrides) in enumerate(module.get_sweep(scale)):
    if not name or os.sep in name or name.startswith("."):
      raise ValueError(f"point name {name!r} is not a directory name")
    if any(point.name == name for point in points):
      raise ValueError(f"two points are called {name!r}")
    overrides = {**overrides, **(extra or {})}  # --extra is part of the point
    try:
      config = apply_overrides(base, overrides)
      config_lib.validate_config(config)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonCausalRoutingWarning)
        model_lib.check(config, accounting.config_vocab_size(config))
    except ValueError as e:
      raise ValueError(f"sweep point {index} ({name}): {e}") from e
    points.append(Point(index, name, dict(overrides), config))
  return points


def _last_records(metrics_path: str) -> tuple[int, dict[str, float]]:
  """(last logged step, the latest value of every key) of a metrics.jsonl."""
  step, latest = 0, {}
  with open(metrics_path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{metrics_path} line {number} is not JSON ({e.msg}); the point's "
                         f"results are not collected") from None
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError(f"{metrics_path} line {number} is not a record with an integer "
                         f"step; the point's results are not collected")
      step = max(step, record["step"])
      latest.update(record)
  return step, latest


def results_row(point: Point, point_dir: str, wall_seconds: float) -> dict[str, Any]:
  """The results row of a finished point, from its summary.json and metrics.jsonl."""
  summary = run_lib.read_json(os.path.join(point_dir, "summary.json"))
  _, latest = _last_records(os.path.join(point_dir, "metrics.jsonl"))
  params = summary["params"]
  counts = accounting.counts_from_config(point.config)
  train = point.config.train
  return {"index": point.index, "name": point.name, "overrides": point.overrides,
          "num_experts": counts["num_experts"], "top_k": counts["top_k"],
          "granularity": counts["granularity"],
          "params_total_nonembed": params["non_embedding"],
          "params_active_nonembed": params["active_per_token"] - params["embedding"],
          "flops_per_token": summary["train_flops_per_token"],
          "flops_capacity_padding": counts["flops_capacity_padding"],
          "tokens_seen": train.steps * train.batch_size * train.seq_len,
          "train_loss": latest.get("train/loss"), "eval_loss": latest.get("eval/loss"),
          "entropy_floor": summary.get("data/entropy_floor"),
          "wall_seconds": round(wall_seconds, 1)}


def write_results(workdir: str) -> str:
  """(Re)writes workdir/results.csv from every points/*/done.json; its path."""
  points_dir = os.path.join(workdir, "points")
  rows = []
  for name in sorted(os.listdir(points_dir)) if os.path.isdir(points_dir) else []:
    done = os.path.join(points_dir, name, DONE)
    if os.path.exists(done):
      rows.append(run_lib.read_json(done))
  rows.sort(key=lambda row: row["index"])
  keys = list(dict.fromkeys(key for row in rows for key in row["overrides"]))
  path = os.path.join(workdir, "results.csv")
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["name", *keys, *RESULT_COLUMNS])
    for row in rows:
      writer.writerow([row["name"], *(row["overrides"].get(key, "") for key in keys),
                       *(_csv_value(row.get(column)) for column in RESULT_COLUMNS)])
  os.replace(path + ".tmp", path)
  return path


def _csv_value(value):
  return "" if value is None else value


def run_sweep(points: Sequence[Point], workdir: str, shard: tuple[int, int] = (0, 1),
              train_fn: Optional[Callable[[ml_collections.ConfigDict, str], Any]] = None
              ) -> str:
  """Trains this shard's unfinished points; returns the path of results.csv.

  `train_fn(config, point_dir)` defaults to `moejax.train.train_and_evaluate`. A
  point whose run stops before its last step (SIGTERM) ends the sweep without
  a done.json; a point whose loss diverges is logged, gets a failed.json (so a
  rerun skips it: divergence is deterministic) and the sweep goes on; the
  error naming the diverged points is raised at the end.
  """
  train_fn = train_fn or train_lib.train_and_evaluate
  index, count = shard
  mine = [point for point, shard in zip(points, shard_assignment(points, count))
          if shard == index]
  failed = []
  for number, point in enumerate(mine, 1):
    point_dir = os.path.join(workdir, "points", point.name)
    done = os.path.join(point_dir, DONE)
    if os.path.exists(done):
      if run_lib.read_json(done).get("overrides") != json.loads(
          json.dumps(point.overrides)):
        raise ValueError(f"{done} was written by a point {point.name!r} with other "
                         "overrides; use a new --workdir")
      logging.info("[%d/%d] %s: finished, skipping", number, len(mine), point.name)
      continue
    if os.path.exists(os.path.join(point_dir, FAILED)):
      logging.info("[%d/%d] %s: diverged earlier (%s), skipping", number, len(mine),
                   point.name, FAILED)
      failed.append(point.name)
      continue
    counts = accounting.counts_from_config(point.config)
    logging.info("[%d/%d] %s: %s non-embedding parameters (%s active), %.3g training "
                 "FLOPs per token, %d steps", number, len(mine), point.name,
                 f"{counts['params_total_nonembed']:,}",
                 f"{round(counts['params_active_nonembed']):,}",
                 counts["flops_per_token"], point.config.train.steps)
    start = time.perf_counter()
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonCausalRoutingWarning)
        train_fn(point.config, point_dir)
    except train_lib.NonFiniteLossError as e:
      logging.error("[%d/%d] %s failed: %s", number, len(mine), point.name, e)
      failed.append(point.name)
      run_lib.write_json(os.path.join(point_dir, FAILED),
                         {"name": point.name, "overrides": point.overrides, "error": str(e)})
      continue
    wall = time.perf_counter() - start
    step, _ = _last_records(os.path.join(point_dir, "metrics.jsonl"))
    if step < point.config.train.steps:
      logging.warning("%s stopped at step %d of %d (preempted); rerun to resume",
                      point.name, step, point.config.train.steps)
      break
    row = results_row(point, point_dir, wall)
    run_lib.write_json(done, row)
    logging.info("[%d/%d] %s: train/loss %.4f, eval/loss %.4f in %.0f s", number,
                 len(mine), point.name, row["train_loss"], row["eval_loss"], wall)
  path = write_results(workdir)
  if failed:
    raise train_lib.NonFiniteLossError(f"points with a non-finite loss: {failed}")
  return path


def run_cli(body: Callable[[], Any]) -> Any:
  """`body()` of a command that trains points: bad input or diverged points are
  one message and exit status 1, Ctrl-C exit status 130 (the point's
  checkpoint saved). After a point's stop checkpoint, a second SIGTERM must
  not kill the command (exit 143) on its way to exit status 0."""
  signals.hold_until_exit()
  try:
    return body()
  except train_lib.Interrupted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(train_lib.SIGINT_EXIT_STATUS)
  except (ValueError, train_lib.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


_SWEEP = flags.DEFINE_string("sweep", None, "path/to/sweep.py:scale")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: points/<name>/, "
                               "results.csv.")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: run the i-th of n interleaved slices "
                             "of the points (each covers every swept key's range).")
_EXTRA = flags.DEFINE_multi_string("extra", [], "key=value override (dotted key relative "
                                   "to config) applied to every point, after its own.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")

  def body():
    points = load_sweep(_SWEEP.value, parse_extra(_EXTRA.value))
    shard = parse_shard(_SHARD.value)
    logging.info("Sweep %s: %d points, shard %d/%d", _SWEEP.value, len(points), *shard)
    return run_sweep(points, _WORKDIR.value, shard)

  logging.info("Results: %s", run_cli(body))


if __name__ == "__main__":
  flags.mark_flags_as_required(["sweep", "workdir"])
  app.run(main)
