r"""Compares training runs: loss curves with seed bands, and a final-loss table.

    python -m experiments.compare_runs DIR [DIR ...] --out=OUT
    python -m experiments.compare_runs '/tmp/study/points/*' --out=OUT

Each DIR is a run's workdir (it holds metrics.jsonl and config.json), a sweep
or study workdir (its points/*), a study results folder (its runs/*), or a
glob of any of these. Runs whose configs differ only in `seed` (and in keys
that do not change training: logging, checkpoint and evaluation intervals,
mesh, peak FLOP/s, data paths) are one configuration, drawn as its mean curve
with a band of one standard deviation across seeds; configurations are
labelled by the keys in which they differ, or by their folder name where that
names each configuration alone (a sweep's points over seeds).

Writes:
  OUT/compare.png          train and eval loss against steps, tokens and training
                           FLOPs (tokens x train_flops_per_token of summary.json);
  OUT/final_eval_loss.md   final eval loss, mean ± std per configuration, with
  OUT/final_eval_loss.csv  the number of seeds (and final train loss);
and prints the Markdown table.

A run whose metrics.jsonl holds a line that is not a JSON record with an
integer step (garbage, or a line cut short by a kill) is named on stderr by
file and line number and left out of the curves and averages; a run with an
empty or missing metrics.jsonl is named too. Both stay in the table: the
`seeds` column counts the runs averaged, and `note` names the runs left out
and why. Garbage in a config.json or summary.json is one error naming the file.
"""

import csv
import fnmatch
import glob
import json
import os
import sys
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
import matplotlib
from matplotlib import pyplot as plt
import numpy as np

from moejax import run as run_lib
from moejax.train import resume

# Keys that do not change what is trained (besides the seed).
IGNORED_KEYS = tuple(key for key in resume.RESUMABLE_KEYS if key != "config.train.steps") + (
    "config.seed", "config.data.data_dir", "config.data.manual_dir")
CURVES = (("train/loss", "train loss"), ("eval/loss", "eval loss"))
METRICS = "metrics.jsonl"
_SHOWN_BAD_LINES = 5  # per file on stderr; the rest are counted


def read_metrics(path: str) -> tuple[list[dict], list[tuple[int, str]]]:
  """(records, [(line number, why)] of the lines that are not records) of a
  metrics.jsonl; blank lines hold nothing and are skipped."""
  records, bad = [], []
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        cut = "" if line.endswith("\n") else ", cut short (the last line, no newline)"
        bad.append((number, f"not JSON ({e.msg}{cut})"))
        continue
      if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
        bad.append((number, "not a record with an integer \"step\""))
        continue
      records.append(record)
  return records, bad


class Run:
  """One run directory: its flattened config, FLOPs per token and records."""

  def __init__(self, path: str):
    self.path = path
    config = run_lib.read_json(os.path.join(path, "config.json"))
    if not isinstance(config, dict):
      raise ValueError(f"{os.path.join(path, 'config.json')} does not hold a config (a "
                       f"JSON object)")
    self.config = resume._flatten(config)  # pylint: disable=protected-access
    summary = os.path.join(path, "summary.json")
    summary = run_lib.read_json(summary) if os.path.exists(summary) else {}
    self.flops_per_token = summary.get("train_flops_per_token") if isinstance(
        summary, dict) else None
    self.records, self.bad_lines = [], []
    self.excluded: Optional[str] = None  # why the run is not averaged
    metrics = os.path.join(path, METRICS)
    if not os.path.exists(metrics):
      self.excluded = f"no {METRICS}"
    else:
      self.records, self.bad_lines = read_metrics(metrics)
      if self.bad_lines:
        self.excluded = f"{len(self.bad_lines)} unparsable line(s) in {METRICS}"
      elif not self.records:
        self.excluded = f"{METRICS} is empty"
    self.seed = self.config.get("config.seed")
    train = lambda key: self.config.get(f"config.train.{key}")  # noqa: E731
    self.tokens_per_step = (train("batch_size") or 0) * (train("seq_len") or 0)

  @property
  def name(self) -> str:
    return os.path.basename(self.path)

  def warnings(self) -> list[str]:
    """What stderr says about this run: each bad line (a few), then why it is
    left out; nothing for a usable run."""
    metrics = os.path.join(self.path, METRICS)
    lines = [f"warning: {metrics} line {number}: {why}"
             for number, why in self.bad_lines[:_SHOWN_BAD_LINES]]
    if len(self.bad_lines) > _SHOWN_BAD_LINES:
      lines.append(f"warning: {metrics}: {len(self.bad_lines) - _SHOWN_BAD_LINES} more "
                   f"unparsable lines")
    if self.excluded:
      lines.append(f"warning: {self.path}: {self.excluded}; left out of the curves and "
                   f"averages (listed in the table's note)")
    return lines

  @property
  def key(self) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in self.config.items()
                        if not any(fnmatch.fnmatchcase(k, p) for p in IGNORED_KEYS)))

  def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[name]) for r in self.records if name in r]
    if not pairs:
      return np.zeros(0, int), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps), np.asarray(values, np.float64)


def find_runs(patterns: Sequence[str]) -> list[str]:
  """Run directories named by the arguments (see the module docstring)."""
  found = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) or ([pattern] if os.path.isdir(pattern) else [])
    if not matches:
      raise ValueError(f"{pattern}: no such directory")
    for path in matches:
      if _is_run(path):
        found.append(path)
        continue
      inner = [p for sub in ("points", "runs")
               for p in sorted(glob.glob(os.path.join(path, sub, "*"))) if _is_run(p)]
      if not inner and os.path.isdir(path) and len(matches) == 1:
        raise ValueError(f"{path} is not a run directory (no metrics.jsonl or config.json), "
                         f"nor a sweep, study or results folder with runs under points/ or "
                         f"runs/")
      found.extend(inner)
  missing = [p for p in found if not os.path.exists(os.path.join(p, "config.json"))]
  if missing:
    raise ValueError(f"{missing[0]} has no config.json (a run writes it when it starts)")
  if not found:
    raise ValueError(f"no runs found in {list(patterns)}")
  return list(dict.fromkeys(os.path.normpath(p) for p in found))


def _is_run(path: str) -> bool:
  """A run's folder: it holds metrics.jsonl, or config.json (a run that wrote
  no metrics yet is still listed)."""
  return any(os.path.exists(os.path.join(path, name)) for name in (METRICS, "config.json"))


def group_runs(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
  """[(label, runs)] of configurations in first-seen order; a label names
  the keys (without `config.`) whose values differ between configurations,
  or, where every configuration's runs share one folder name that no other
  configuration uses (a sweep's points over seeds: `seed*/points/<name>`),
  that name."""
  groups: dict[tuple, list[Run]] = {}
  for run in runs:
    groups.setdefault(run.key, []).append(run)
  folders = [{os.path.basename(os.path.normpath(run.path)) for run in members}
             for members in groups.values()]
  if len(groups) > 1 and all(len(names) == 1 for names in folders) and len(
      set.union(*folders)) == len(groups):
    return [(names.pop(), members) for names, members in zip(folders, groups.values())]
  configs = [dict(key) for key in groups]
  names = dict.fromkeys(name for config in configs for name in config)
  differing = [name for name in names if len({c.get(name) for c in configs}) > 1]
  short = _short_names(differing)
  labelled = []
  for values, members in zip(configs, groups.values()):
    parts = [f"{short[k]}={json.loads(values[k]) if k in values else '-'}"
             for k in differing]
    labelled.append((", ".join(parts) or "all runs", members))
  return labelled


def _short_names(keys: Sequence[str]) -> dict[str, str]:
  """Each dotted key by its shortest unique tail ("config.model.moe.top_k" -> "top_k")."""
  short = {}
  for key in keys:
    parts = key.removeprefix("config.").split(".")
    for n in range(1, len(parts) + 1):
      tail = ".".join(parts[-n:])
      if sum(other.endswith("." + tail) or other == tail for other in keys) == 1:
        break
    short[key] = tail
  return short


def mean_curve(members: Sequence[Run], name: str, x_of) -> Optional[tuple]:
  """(x, mean, std, n) at the steps every usable member logged `name` at."""
  members = [run for run in members if run.excluded is None]
  if not members:
    return None
  series = [run.series(name) for run in members]
  series = [s for s in series if s[0].size]
  if not series:
    return None
  common = set(series[0][0].tolist())
  for steps, _ in series[1:]:
    common &= set(steps.tolist())
  steps = np.array(sorted(common))
  if not steps.size:
    return None
  values = np.stack([vals[np.searchsorted(s, steps)] for s, vals in series])
  return x_of(members[0], steps), values.mean(0), sample_std(values), len(series)


def sample_std(values: np.ndarray) -> np.ndarray:
  """The standard deviation over axis 0 (seeds) of every ± and every band, here
  and in the studies (experiments.studies.common): the sample std (ddof=1), 0
  for one seed."""
  values = np.asarray(values, np.float64)
  if values.shape[0] < 2:
    return np.zeros(values.shape[1:])
  return values.std(0, ddof=1)


_AXES = (("step", lambda run, steps: steps),
         ("tokens", lambda run, steps: steps * run.tokens_per_step),
         ("training FLOPs", lambda run, steps: steps * run.tokens_per_step
          * (run.flops_per_token or np.nan)))


def plot(groups, path: str) -> None:
  fig, axes = plt.subplots(len(CURVES), len(_AXES), figsize=(15, 8.5), squeeze=False)
  colors = plt.cm.tab10(np.arange(len(groups)) % 10)
  for row, (name, title) in enumerate(CURVES):
    for col, (xlabel, x_of) in enumerate(_AXES):
      ax = axes[row, col]
      for (label, members), color in zip(groups, colors):
        curve = mean_curve(members, name, x_of)
        if curve is None:
          continue
        x, mean, std, n = curve
        if x.size <= 3:  # an evaluation at the end only: a point with an error bar
          ax.errorbar(x, mean, yerr=std, fmt="o", color=color, capsize=3, ms=4,
                      label=f"{label} (n={n})")
          continue
        ax.plot(x, mean, color=color, lw=1.3, label=f"{label} (n={n})")
        if n > 1:
          ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(f"{title} (nats/token)")
      if xlabel != "step":
        ax.set_xscale("log")
      ax.grid(True, alpha=0.3)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  columns = 2 if len(labels) > 3 else max(1, len(labels))
  fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
  fig.suptitle("mean over seeds; band and error bars: ±1 std across seeds")
  fig.tight_layout(rect=(0, 0.02 + 0.03 * (-(-len(labels) // columns)), 1, 0.97))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def final_table(groups) -> list[dict[str, Any]]:
  """Per configuration: final eval and train loss, mean and std over seeds."""
  rows = []
  for label, members in groups:
    used = [run for run in members if run.excluded is None]
    row = {"config": label, "seeds": len(used),
           "seed_values": " ".join(str(run.seed) for run in used)}
    for name, column in (("eval/loss", "eval_loss"), ("train/loss", "train_loss")):
      finals = [vals[-1] for _, vals in (run.series(name) for run in used) if vals.size]
      finals = np.asarray(finals, np.float64)
      row[f"{column}_mean"] = float(finals.mean()) if finals.size else None
      row[f"{column}_std"] = float(sample_std(finals)) if finals.size else None
      row[f"{column}_n"] = int(finals.size)
    row["note"] = "; ".join(f"{run.name}: {run.excluded}, not averaged"
                            for run in members if run.excluded)
    rows.append(row)
  return rows


def _pm(mean, std) -> str:
  return "—" if mean is None else f"{mean:.4f} ± {std:.4f}"


def markdown(rows) -> str:
  lines = ["| configuration | seeds | final eval loss | final train loss | note |",
           "| --- | --- | --- | --- | --- |"]
  for row in rows:
    lines.append(f"| {row['config']} | {row['eval_loss_n']} | "
                 f"{_pm(row['eval_loss_mean'], row['eval_loss_std'])} | "
                 f"{_pm(row['train_loss_mean'], row['train_loss_std'])} | "
                 f"{row['note']} |")
  return "\n".join(lines) + "\n"


def compare(patterns: Sequence[str], out: str) -> list[dict[str, Any]]:
  """Finds, groups, plots and tabulates; returns the table rows."""
  runs = [Run(path) for path in find_runs(patterns)]
  for run in runs:
    for line in run.warnings():
      print(line, file=sys.stderr)
  groups = group_runs(runs)
  os.makedirs(out, exist_ok=True)
  plot(groups, os.path.join(out, "compare.png"))
  rows = final_table(groups)
  with open(os.path.join(out, "final_eval_loss.md"), "w") as f:
    f.write(markdown(rows))
  with open(os.path.join(out, "final_eval_loss.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return rows


def main(argv, out_flag):
  matplotlib.use("Agg")  # here, not at import: a notebook importing this keeps its backend
  if len(argv) < 2:
    print("error: name at least one run, sweep or results directory (or a glob)",
          file=sys.stderr)
    sys.exit(2)
  if not out_flag.value:
    print("error: --out is required", file=sys.stderr)
    sys.exit(2)
  try:
    rows = compare(argv[1:], out_flag.value)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(markdown(rows), end="")
  print(f"wrote {os.path.join(out_flag.value, 'compare.png')}, final_eval_loss.md, "
        f"final_eval_loss.csv")


if __name__ == "__main__":
  # Defined here, not at import: other tools importing this module have an --out too.
  _OUT = flags.DEFINE_string("out", None, "Output folder (created if missing).")
  app.run(lambda argv: main(argv, _OUT))
