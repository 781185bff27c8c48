"""What every study shares: seeds, the run through the sweep runner, the results folder.

A study's results folder (`experiments/results/<study>/` for the committed
full study) holds:
  runs.csv       one row per run: name, config (the run's name without its
                 seed), seed, status (finished / diverged), its overrides
                 (JSON), final train and eval loss, tokens, FLOPs per token,
                 wall seconds and the study's own columns;
  runs/<name>/   each run's config.json (every key), summary.json,
                 metrics.jsonl (the whole training curve) and, where the
                 study evaluates checkpoints, evaluations.json;
  summary.json   the study's numbers (per-config means, std and seed counts,
                 and the verdict's inputs), the scale, and what the study cost
                 (runs, tokens, wall time).
`experiments.compare_runs` reads `runs/*` directly.
"""

import csv
import datetime
import json
import os
import platform
import re
import shutil
import sys
import time
from types import ModuleType
from typing import Any, Callable, Iterable, Optional, Sequence

from absl import flags
from absl import logging
import numpy as np

from experiments import sweep
from experiments.compare_runs import sample_std
from moejax import evaluate as evaluate_lib
from moejax import run as run_lib
from moejax.train import metrics as metrics_lib
from moejax import train as train_lib

SCALES = ("full", "quick")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_ROOT = os.path.join(REPO_ROOT, "experiments", "results")
_SEED_SUFFIX = re.compile(r"_s(\d+)$")

# The model most full studies train (2 CPU cores: about 50k tokens/s, measured):
# 2 layers of width 64 on the built-in synthetic_mixture corpus, 2048 tokens a step.
STUDY_MODEL = {"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4,
               "model.moe.expert_hidden": 128, "train.seq_len": 64, "train.batch_size": 32,
               "train.eval_batches": 8}

# Small shared settings of the quick miniatures: one compile-dominated minute.
QUICK_MODEL = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
               "model.moe.expert_hidden": 64, "train.seq_len": 32, "train.batch_size": 8,
               "train.eval_batches": 1, "train.log_every": 5}


def seeded(configs: Iterable[tuple[str, dict]], seeds: Sequence[int]
           ) -> list[tuple[str, dict]]:
  """[(name, overrides)] -> one point per seed: ("<name>_s<seed>", {..., "seed": seed}).

  Seeds vary fastest, so a sweep split in shards spreads every config's seeds.
  """
  return [(f"{name}_s{seed}", {**overrides, "seed": seed})
          for name, overrides in configs for seed in seeds]


def config_name(run_name: str) -> str:
  """"topk_s1" -> "topk": the run's name without its seed suffix."""
  return _SEED_SUFFIX.sub("", run_name)


def schedule(steps: int, log_every: Optional[int] = None) -> dict[str, int]:
  """10% warmup, one evaluation and one checkpoint at the end."""
  out = {"train.steps": steps, "train.warmup_steps": max(steps // 10, 1),
         "train.eval_every": steps, "train.checkpoint_every": steps}
  if log_every:
    out["train.log_every"] = log_every
  return out


def check_scale(scale: str) -> None:
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}; valid scales: {list(SCALES)}")


# ----------------------------------------------------------------------------- records


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key` over the records that log it."""
  pairs = [(r["step"], r[key]) for r in records if key in r]
  if not pairs:
    return np.zeros(0, int), np.zeros(0)
  steps, values = zip(*pairs)
  return np.asarray(steps), np.asarray(values, np.float64)


def final(records: Sequence[dict], key: str) -> Optional[float]:
  """The newest logged value of `key` (None if never logged)."""
  _, values = series(records, key)
  return float(values[-1]) if values.size else None


def late_mean(records: Sequence[dict], key: str, fraction: float = 0.25) -> Optional[float]:
  """Mean of `key` over the last `fraction` of its logged values."""
  _, values = series(records, key)
  if not values.size:
    return None
  return float(np.mean(values[-max(1, int(round(values.size * fraction))):]))


def layer_keys(records: Sequence[dict], prefix: str, name: str) -> list[str]:
  """Per-layer keys `{prefix}/layer{i}/{name}` present in the records, by layer."""
  pattern = re.compile(rf"^{re.escape(prefix)}/layer(\d+)/{re.escape(name)}$")
  found = {int(m.group(1)): key for r in records for key in r
           if (m := pattern.match(key))}
  return [found[i] for i in sorted(found)]


def mean_std(values: Sequence[Optional[float]]) -> dict[str, Any]:
  """{"mean", "std" (`sample_std`), "n"} of the finite values."""
  values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
  if not values.size:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(np.mean(values)), "std": float(sample_std(values)),
          "n": int(values.size)}


def by_config(rows: Sequence[dict], column: str, finished_only: bool = True
              ) -> dict[str, dict[str, Any]]:
  """{config: mean_std of `column` over its seeds}, in first-seen order."""
  groups: dict[str, list] = {}
  for row in rows:
    if finished_only and row["status"] != "finished":
      groups.setdefault(row["config"], [])
      continue
    groups.setdefault(row["config"], []).append(row.get(column))
  return {name: mean_std(values) for name, values in groups.items()}


def row_columns(rows: Sequence[dict], keep: Callable[[str], bool]) -> list[str]:
  """The columns of `rows` that `keep` accepts, in the order they first appear."""
  return [c for c in dict.fromkeys(k for row in rows for k in row) if keep(c)]


def config_table(rows: Sequence[dict], columns: Iterable[str]) -> dict[str, dict[str, Any]]:
  """{config: {column: mean_std over its finished seeds}} for each column."""
  table: dict[str, dict[str, Any]] = {}
  for column in columns:
    for name, stats in by_config(rows, column).items():
      table.setdefault(name, {})[column] = stats
  return table


def seeded_sweep(configs: Callable[[str], list[tuple[str, dict]]],
                 scales: dict[str, dict], scale: str) -> list[tuple[str, dict]]:
  """A study's `get_sweep`: its configs at `scale`, one point per seed of the scale."""
  check_scale(scale)
  return seeded(configs(scale), scales[scale]["seeds"])


def paired_difference(rows: Sequence[dict], column: str, reference: str
                      ) -> dict[str, dict[str, Any]]:
  """{config: mean_std over seeds of (its `column` - the reference config's, same seed)}.

  Seeds change the synthetic corpus too (its sources), so seed-to-seed spread
  of a loss is mostly the data's; differences paired by seed remove it.
  """
  base = {row["seed"]: row.get(column) for row in rows
          if row["config"] == reference and row["status"] == "finished"}
  groups: dict[str, list] = {}
  for row in rows:
    value, ref = row.get(column), base.get(row["seed"])
    ok = row["status"] == "finished" and value is not None and ref is not None
    groups.setdefault(row["config"], []).append(value - ref if ok else None)
  return {name: mean_std(values) for name, values in groups.items()}


# ----------------------------------------------------------------------------- running


def point_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "points", name)


def run_status(workdir: str, name: str) -> str:
  """finished (done.json), diverged (failed.json) or missing."""
  directory = point_dir(workdir, name)
  if os.path.exists(os.path.join(directory, sweep.DONE)):
    return "finished"
  if os.path.exists(os.path.join(directory, sweep.FAILED)):
    return "diverged"
  return "missing"


def train(module: ModuleType, workdir: str, scale: str, shard: str = "0/1",
          extra: Optional[dict[str, Any]] = None) -> list[sweep.Point]:
  """Trains (or resumes) the study's points through the sweep runner.

  Runs that diverge are kept as such (`failed.json`); they are a result of
  some studies (z_loss), not an error.
  """
  check_scale(scale)
  points = sweep.load_sweep(f"{module.__file__}:{scale}", extra)
  try:
    sweep.run_sweep(points, workdir, sweep.parse_shard(shard))
  except train_lib.NonFiniteLossError as e:
    logging.warning("%s", e)
  return points


def collect(module: ModuleType, workdir: str, points: Sequence[sweep.Point], out: str,
            scale: str) -> dict[str, Any]:
  """Writes the results folder `out` from the trained points; returns summary.json's dict."""
  rows = []
  runs_dir = os.path.join(out, "runs")
  if os.path.isdir(runs_dir):
    shutil.rmtree(runs_dir)
  wall = 0.0
  for point in points:
    status = run_status(workdir, point.name)
    if status == "missing":
      raise ValueError(f"run {point.name} has not finished in {workdir}; run the study "
                       f"again (it resumes) before collecting")
    source = point_dir(workdir, point.name)
    records = metrics_lib.read_records(os.path.join(source, "metrics.jsonl"))
    summary = run_lib.read_json(os.path.join(source, "summary.json"))
    done = {}
    if status == "finished":
      done = run_lib.read_json(os.path.join(source, sweep.DONE))
    train_cfg = point.config.train
    row = {"name": point.name, "config": config_name(point.name), "seed": point.config.seed,
           "status": status, "overrides": json.dumps(point.overrides, sort_keys=True),
           "train_loss": final(records, "train/loss"),
           "eval_loss": final(records, "eval/loss") if status == "finished" else None,
           "last_step": records[-1]["step"] if records else 0,
           "tokens": train_cfg.steps * train_cfg.batch_size * train_cfg.seq_len,
           "flops_per_token": summary["train_flops_per_token"],
           "params_total_nonembed": summary["params"]["non_embedding"],
           "params_active_nonembed": (summary["params"]["active_per_token"]
                                      - summary["params"]["embedding"]),
           "entropy_floor": summary.get("data/entropy_floor"),
           "wall_seconds": done.get("wall_seconds")}
    evaluations = None
    evaluations_path = os.path.join(source, EVALUATIONS)
    if os.path.exists(evaluations_path):
      evaluations = run_lib.read_json(evaluations_path)
    row.update(module.row_metrics(records, point, evaluations))
    rows.append(row)
    wall += done.get("wall_seconds") or 0.0
    target = os.path.join(runs_dir, point.name)
    os.makedirs(target)
    for name in ("config.json", "summary.json", "metrics.jsonl", EVALUATIONS):
      if os.path.exists(os.path.join(source, name)):
        shutil.copy(os.path.join(source, name), os.path.join(target, name))
  write_rows(os.path.join(out, "runs.csv"), rows)
  summary = {"study": study_name(module), "scale": scale,
             "date": datetime.date.today().isoformat(),
             "cost": {"runs": len(rows), "tokens": int(sum(r["tokens"] for r in rows)),
                      "train_wall_seconds": round(wall, 1),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"},
             **module.summarize(rows, out)}
  run_lib.write_json(os.path.join(out, "summary.json"), summary, default=_json_default)
  return summary


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_rows(path: str, rows: Sequence[dict]) -> None:
  columns = list(dict.fromkeys(key for row in rows for key in row))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


EVALUATIONS = "evaluations.json"


def evaluate_points(workdir: str, points: Sequence[sweep.Point],
                    settings: dict[str, Callable[[sweep.Point], Optional[dict]]],
                    num_batches: Optional[int] = None) -> None:
  """Evaluates each finished point's checkpoint under named settings.

  `settings[name](point)` gives `moejax.evaluate.evaluate` keywords (or None to
  skip). Results go to the point's evaluations.json ({name: result}); settings
  already there are not recomputed, so an interrupted study resumes.
  """
  for name, make_kwargs in settings.items():
    def evaluate(point, directory, make_kwargs=make_kwargs):
      kwargs = make_kwargs(point)
      if kwargs is None:
        return None
      return evaluate_lib.evaluate(directory, num_batches=num_batches, **kwargs)
    measure_points(workdir, points, name, evaluate)


def measure_points(workdir: str, points: Sequence[sweep.Point], key: str,
                   measure: Callable[[sweep.Point, str], Any]) -> None:
  """Stores `measure(point, run directory)` under `key` in each finished
  point's evaluations.json, once (an interrupted study resumes where it
  stopped); a measure of None is not stored."""
  for point in points:
    if run_status(workdir, point.name) != "finished":
      continue
    directory = point_dir(workdir, point.name)
    path = os.path.join(directory, EVALUATIONS)
    results = run_lib.read_json(path) if os.path.exists(path) else {}
    if key in results:
      continue
    start = time.perf_counter()
    value = measure(point, directory)
    if value is None:
      continue
    results[key] = value
    logging.info("%s, %s (%.0f s): %s", point.name, key, time.perf_counter() - start,
                 f"loss {value['eval/loss']:.4f}" if "eval/loss" in value else value)
    run_lib.write_json(path, results)


def load_results(folder: str) -> tuple[list[dict], dict[str, Any]]:
  """(runs.csv rows with numbers parsed, summary.json) of a results folder."""
  with open(os.path.join(folder, "runs.csv"), newline="") as f:
    rows = [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
  return rows, run_lib.read_json(os.path.join(folder, "summary.json"))


def run_records(folder: str, name: str) -> list[dict]:
  """The metrics.jsonl records of one run of a results folder."""
  return metrics_lib.read_records(os.path.join(folder, "runs", name, "metrics.jsonl"))


def mean_series(folder: str, rows: Sequence[dict], config: str, key: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """(steps, mean, std, n) of metric `key` over the finished seeds of a config,
  at the steps all of them logged; std is `sample_std`, as in the tables."""
  names = [r["name"] for r in rows if r["config"] == config and r["status"] == "finished"]
  series_list = [series(run_records(folder, name), key) for name in names]
  series_list = [s for s in series_list if s[0].size]
  if not series_list:
    return np.zeros(0, int), np.zeros(0), np.zeros(0), 0
  steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in series_list)))
  values = np.stack([v[np.searchsorted(s, steps)] for s, v in series_list])
  return np.asarray(steps), values.mean(0), sample_std(values), len(series_list)


def _parse(text: str):
  if text == "":
    return None
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


# ----------------------------------------------------------------------------- CLI


QUICK_NOTICE = ("scale=quick: a miniature of the study (few configurations, few steps) that "
                "checks its pipeline end to end (train, evaluate, collect, plot). Its numbers "
                "are noise-level and cannot show the claim; the verdict rests on the committed "
                "full-scale results.")


def announce_scale(scale: str) -> None:
  """Says, in the output of a study run at scale=quick, what it can show."""
  if scale == "quick":
    print(QUICK_NOTICE, flush=True)


def run(module: ModuleType, workdir: str, scale: str = "full", out: Optional[str] = None,
        shard: str = "0/1", extra: Optional[dict[str, Any]] = None) -> Optional[dict]:
  """Train, post-process and collect a study; returns summary.json's dict
  (None when this shard is not the last one to finish)."""
  check_scale(scale)
  announce_scale(scale)
  points = train(module, workdir, scale, shard, extra)
  if any(run_status(workdir, p.name) == "missing" for p in points):
    logging.info("some runs are not finished (other shards or a preemption); collect "
                 "later by running the study again")
    return None
  if hasattr(module, "postprocess"):
    module.postprocess(workdir, points, scale)
  out = out or (os.path.join(RESULTS_ROOT, study_name(module))
                if scale == "full" else os.path.join(workdir, "results"))
  return collect(module, workdir, points, out, scale)


def study_name(module: ModuleType) -> str:
  """"bias_balancing" for experiments/studies/bias_balancing.py (also when run as __main__)."""
  return os.path.splitext(os.path.basename(module.__file__))[0]


_FLAGS: dict[str, Any] = {}


def define_flags() -> dict[str, Any]:
  """The study CLI's flags (defined once per process: the sweep runner loads
  the study file a second time)."""
  if not _FLAGS:
    _FLAGS.update(_define_flags())
  return _FLAGS


def _define_flags():
  # --workdir, --shard and --extra are the sweep runner's own flags.
  return {
      "workdir": sweep._WORKDIR,  # pylint: disable=protected-access
      "shard": sweep._SHARD,  # pylint: disable=protected-access
      "extra": sweep._EXTRA,  # pylint: disable=protected-access
      "scale": flags.DEFINE_enum("scale", "full", list(SCALES), "full: the committed "
                                 "study; quick: a miniature that runs in a minute."),
      "out": flags.DEFINE_string("out", None, "Results folder; default "
                                 "experiments/results/<study> (full) or WORKDIR/results."),
  }


def main(module: ModuleType, parsed: dict, argv: Sequence[str]) -> None:
  """The CLI of a study module: one message on bad input, never a traceback."""
  # orbax logs every save and restore at INFO; the trainer prints progress.
  evaluate_lib.check_workdir_cli(argv, parsed["workdir"].value, logging.WARNING)
  try:
    summary = run(module, parsed["workdir"].value, parsed["scale"].value,
                  parsed["out"].value, parsed["shard"].value,
                  sweep.parse_extra(parsed["extra"].value))
  except (ValueError, train_lib.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if summary is not None:
    print(json.dumps(summary, indent=2, default=_json_default))


def standalone_main(argv: Sequence[str], name: str,
                    run_study: Callable[[str, str, str], dict[str, Any]],
                    show: Callable[[dict[str, Any]], Any]) -> None:
  """main() of a study that trains its own runs (not through the sweep
  runner): --workdir, --scale, --out; the full scale writes
  experiments/results/<name>, a quick one WORKDIR/results. Prints
  `show(summary)` as JSON; a bad config or a diverged run is one message."""
  parsed = define_flags()  # --workdir, --scale, --out (shard/extra unused)
  evaluate_lib.check_workdir_cli(argv, parsed["workdir"].value, logging.WARNING)
  scale = parsed["scale"].value
  out = parsed["out"].value or (os.path.join(RESULTS_ROOT, name) if scale == "full"
                                else os.path.join(parsed["workdir"].value, "results"))
  os.makedirs(out, exist_ok=True)
  try:
    summary = run_study(parsed["workdir"].value, scale, out)
  except (ValueError, train_lib.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(show(summary), indent=1))
