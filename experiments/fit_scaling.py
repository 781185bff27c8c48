r"""Fits an MoE scaling law to a sweep's results.csv and plots it over the runs.

    python -m experiments.fit_scaling --results=DIR/results.csv --law=krajewski --out=OUT
    python -m experiments.fit_scaling --results=DIR/results.csv --law=clark --out=OUT \
        --clark_fit_saturation

Writes OUT/fit_<law>.json (`moejax.scaling.laws` fit dict plus the inputs used)
and PNGs with the fitted law drawn over the points:
  <law>_loss_vs_flops.png        loss vs training FLOPs (flops_per_token *
                                 tokens_seen), one colour per granularity (krajewski)
                                 or expert count (clark), one line per model size.
  krajewski_loss_vs_granularity.png   loss vs G, one line per N (at that N's largest D).
  clark_loss_vs_experts.png      loss vs E, one line per N.

Columns used: N = params_active_nonembed, D = tokens_seen, G = granularity,
E = num_experts (0 or 1 both mean dense, read as E = 1), L = --loss. Runs whose
N differ by under 10% (e.g. only by router parameters) share one line.

A fit is only as good as the points allow: `moejax.scaling.laws.diagnose`
flags coefficients at an optimizer bound, 95% intervals that span orders of
magnitude or contain 0, and (Krajewski) an irreducible loss c below the data's
entropy floor (the `entropy_floor` column a sweep writes for synthetic data, or
--entropy_floor). The flags are logged, listed under "warnings" in the JSON and
printed on every figure, with the coefficients and the entropy floor.
"""

import csv
import json
import os
import sys
from typing import Any, Mapping, Optional

from absl import app
from absl import flags
from absl import logging
import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from moejax.scaling import laws  # pylint: disable=g-import-not-at-top
from moejax import run as run_lib

_RESULTS = flags.DEFINE_string("results", None, "Path of the sweep's results.csv.")
_LAW = flags.DEFINE_enum("law", laws.KRAJEWSKI, [laws.KRAJEWSKI, laws.CLARK], "Law to fit.")
_OUT = flags.DEFINE_string("out", None, "Output directory (created if missing).")
_LOSS = flags.DEFINE_enum("loss", "eval_loss", ["eval_loss", "train_loss"], "Loss column L.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples for the 95% CIs.")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_E_START = flags.DEFINE_float("clark_e_start", laws.CLARK_E_START, "Fixed E_start (clark).")
_E_MAX = flags.DEFINE_float("clark_e_max", laws.CLARK_E_MAX, "Fixed E_max (clark).")
_FIT_SATURATION = flags.DEFINE_bool(
    "clark_fit_saturation", False, "Fit E_start and E_max instead of fixing them (clark).")
_ENTROPY_FLOOR = flags.DEFINE_float(
    "entropy_floor", None, "Entropy of the data (nats/token), drawn on the plots and checked "
    "against c; default: the results' entropy_floor column, where present.")

CLARK_FREE_PARAMS = ("a", "b", "c", "d")  # fitted whatever E_start / E_max do
NUMERIC_COLUMNS = ("num_experts", "top_k", "granularity", "params_total_nonembed",
                   "params_active_nonembed", "flops_per_token", "tokens_seen", "train_loss",
                   "eval_loss", "wall_seconds")
REQUIRED_COLUMNS = {
    laws.KRAJEWSKI: ("params_active_nonembed", "tokens_seen", "granularity",
                     "flops_per_token"),
    laws.CLARK: ("params_active_nonembed", "num_experts", "flops_per_token", "tokens_seen"),
}
_LOSS_LABELS = {"eval_loss": "eval loss (nats/token)", "train_loss": "train loss (nats/token)"}
_TITLES = {laws.KRAJEWSKI: "Krajewski et al. 2024: L(N, D, G)",
           laws.CLARK: "Clark et al. 2022: L(N, E)"}


def read_results(path: str, law: str, loss: str) -> dict[str, np.ndarray]:
  """Reads the columns `law` needs (and `name`) from a results CSV.

  Args:
    path: results.csv written by a sweep.
    law: "krajewski" or "clark".
    loss: loss column to use as L.

  Returns:
    {column: <float>[P] array} for the needed numeric columns plus "name" (str).

  Raises:
    ValueError: missing file columns, no rows, or a non-numeric needed value.
  """
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    rows = list(reader)
  needed = REQUIRED_COLUMNS[law] + (loss,)
  missing = [column for column in needed if column not in header]
  if missing:
    raise ValueError(f"{path}: missing columns {missing} needed by law={law}, loss={loss}; "
                     f"header is {header}")
  if not rows:
    raise ValueError(f"{path}: no result rows")
  columns: dict[str, Any] = {"name": np.array([row.get("name", str(i))
                                               for i, row in enumerate(rows)])}
  for column in needed:
    values = []
    for i, row in enumerate(rows):
      try:
        values.append(float(row[column]))
      except (TypeError, ValueError):
        raise ValueError(f"{path}: row {i + 2} ({row.get('name', '?')}): {column}="
                         f"{row[column]!r} is not a number") from None
    columns[column] = np.array(values)
  if "num_experts" in columns:
    columns["num_experts"] = np.maximum(columns["num_experts"], 1.0)  # 0 = dense = E 1
  return columns


def read_entropy_floor(path: str) -> Optional[float]:
  """The smallest `entropy_floor` of a results CSV (None: no such column or values)."""
  with open(path, newline="") as f:
    values = []
    for row in csv.DictReader(f):
      try:
        values.append(float(row.get("entropy_floor") or "nan"))
      except ValueError:
        continue
  values = [v for v in values if np.isfinite(v)]
  return min(values) if values else None


def fit(columns: Mapping[str, np.ndarray], law: str, loss: str, *, bootstrap: int, seed: int,
        e_start=laws.CLARK_E_START, e_max=laws.CLARK_E_MAX) -> dict[str, Any]:
  """Fits `law` to the columns of `read_results`; e_start/e_max None = fitted."""
  if law == laws.KRAJEWSKI:
    return laws.fit_krajewski(columns["params_active_nonembed"], columns["tokens_seen"],
                              columns["granularity"], columns[loss], bootstrap=bootstrap,
                              seed=seed)
  return laws.fit_clark(columns["params_active_nonembed"], columns["num_experts"],
                        columns[loss], e_start=e_start, e_max=e_max, bootstrap=bootstrap,
                        seed=seed)


def size_groups(n_active: np.ndarray, rtol: float = 0.1) -> np.ndarray:
  """<int>[P] group index of each run; sizes within `rtol` of the previous share one."""
  order = np.argsort(n_active)
  groups = np.empty(n_active.size, int)
  group, previous = 0, None
  for i in order:
    if previous is not None and n_active[i] > previous * (1 + rtol):
      group += 1
    groups[i], previous = group, n_active[i]
  return groups


def _predict(law: str, coefficients, n, d, g, e):
  if law == laws.KRAJEWSKI:
    return laws.krajewski_loss(coefficients, n, d, g)
  return laws.clark_loss(coefficients, n, e)


def _annotate(ax, result: Mapping[str, Any]) -> None:
  """The entropy floor as a line, the coefficients and the fit's warnings as text."""
  floor = result.get("entropy_floor")
  if floor is not None:
    ax.axhline(floor, color="gray", ls="--", lw=1, label=f"entropy floor {floor:.3g}")
  parts = [f"{name}={entry['value']:.3g}" for name, entry in result["coefficients"].items()]
  lines = [", ".join(parts[i:i + 4]) for i in range(0, len(parts), 4)]
  lines.append(f"rmse(log L)={result['rmse_log']:.3g}, {result['num_points']} runs")
  warnings = result.get("warnings") or []
  if warnings:
    flagged = sorted({w["coefficient"] for w in warnings if w["coefficient"]})
    lines.append(f"WARNING: {len(warnings)} fit warnings ({', '.join(flagged)}): see JSON")
  ax.text(0.01, 0.01, "\n".join(lines), transform=ax.transAxes, fontsize=7, va="bottom",
          family="monospace", color="darkred" if warnings else "black",
          bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))


def _finish(ax, title: str, xlabel: str, ylabel: str, path: str):
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  ax.figure.tight_layout()
  ax.figure.savefig(path, dpi=120)
  plt.close(ax.figure)


def plot_loss_vs_flops(columns, law, loss, result, path):
  """Loss vs training FLOPs with the law as lines.

  Krajewski: a line per (variant, size) along D. Clark has no D (nor has a sweep
  at a single D): one line per variant through the law at each size's FLOPs.
  """
  coefficients = laws.coefficient_values(result)
  key = columns["granularity"] if law == laws.KRAJEWSKI else columns["num_experts"]
  key_name = "G" if law == laws.KRAJEWSKI else "E"
  n, d = columns["params_active_nonembed"], columns["tokens_seen"]
  flops = columns["flops_per_token"] * d
  sizes = size_groups(n)
  d_grid = np.geomspace(d.min(), d.max(), 50)
  colors = plt.cm.viridis(np.linspace(0, 0.9, np.unique(key).size))
  _, ax = plt.subplots(figsize=(7, 5))
  along_sizes = law == laws.CLARK or d.min() == d.max()
  for value, color in zip(np.unique(key), colors):
    variant = key == value
    ax.scatter(flops[variant], columns[loss][variant], color=color, s=18,
               label=f"{key_name}={value:g}", zorder=3)
    if along_sizes:
      runs = [variant & (sizes == size) for size in np.unique(sizes[variant])]
      n_runs = np.array([np.exp(np.mean(np.log(n[run]))) for run in runs])
      x = np.array([np.exp(np.mean(np.log(flops[run]))) for run in runs])
      d_runs = np.array([np.exp(np.mean(np.log(d[run]))) for run in runs])
      ones = np.ones_like(n_runs)
      pred = _predict(law, coefficients, n_runs, d_runs, value * ones, value * ones)
      ax.plot(x[np.argsort(x)], pred[np.argsort(x)], color=color, lw=1, alpha=0.7,
              label=f"fit, {key_name}={value:g}")
      continue
    for size in np.unique(sizes[variant]):
      run = variant & (sizes == size)
      n_size = np.exp(np.mean(np.log(n[run])))
      flops_per_token = np.median(columns["flops_per_token"][run])
      ones = np.ones_like(d_grid)
      pred = _predict(law, coefficients, n_size * ones, d_grid, value * ones, value * ones)
      ax.plot(flops_per_token * d_grid, pred, color=color, lw=1, alpha=0.7,
              label=f"fit, {key_name}={value:g}, N={n_size:.2g}")
  ax.set_xscale("log")
  _annotate(ax, result)
  _finish(ax, f"{_TITLES[law]}, fit (lines) over runs (points)", "training FLOPs",
          _LOSS_LABELS[loss], path)


def plot_loss_vs_granularity(columns, loss, result, path):
  """Krajewski: loss vs G, one line per model size at that size's largest D."""
  coefficients = laws.coefficient_values(result)
  n, d, g = columns["params_active_nonembed"], columns["tokens_seen"], columns["granularity"]
  sizes = size_groups(n)
  g_grid = np.geomspace(g.min(), g.max(), 50)
  colors = plt.cm.plasma(np.linspace(0, 0.85, np.unique(sizes).size))
  _, ax = plt.subplots(figsize=(7, 5))
  for size, color in zip(np.unique(sizes), colors):
    in_size = sizes == size
    d_size = d[in_size].max()
    run = in_size & np.isclose(d, d_size, rtol=0.1)
    n_size = np.exp(np.mean(np.log(n[run])))
    ax.scatter(g[run], columns[loss][run], color=color, s=18, zorder=3)
    pred = laws.krajewski_loss(coefficients, n_size, d_size, g_grid)
    ax.plot(g_grid, pred, color=color, lw=1.2, label=f"fit, N={n_size:.2g}, D={d_size:.2g}")
  ax.set_xscale("log", base=2)
  _annotate(ax, result)
  _finish(ax, f"{_TITLES[laws.KRAJEWSKI]}, loss vs granularity", "granularity G",
          _LOSS_LABELS[loss], path)


def plot_loss_vs_experts(columns, loss, result, path):
  """Clark: loss vs E, one line per model size."""
  coefficients = laws.coefficient_values(result)
  n, e = columns["params_active_nonembed"], columns["num_experts"]
  sizes = size_groups(n)
  e_grid = np.geomspace(1, max(e.max(), 2), 60)
  colors = plt.cm.plasma(np.linspace(0, 0.85, np.unique(sizes).size))
  _, ax = plt.subplots(figsize=(7, 5))
  for size, color in zip(np.unique(sizes), colors):
    run = sizes == size
    n_size = np.exp(np.mean(np.log(n[run])))
    ax.scatter(e[run], columns[loss][run], color=color, s=18, zorder=3)
    ax.plot(e_grid, laws.clark_loss(coefficients, n_size, e_grid), color=color, lw=1.2,
            label=f"fit, N={n_size:.2g}")
  ax.set_xscale("log", base=2)
  _annotate(ax, result)
  _finish(ax, f"{_TITLES[laws.CLARK]}, loss vs experts", "experts E", _LOSS_LABELS[loss],
          path)


def run(results: str, law: str, out: str, loss: str = "eval_loss", *, bootstrap: int = 200,
        seed: int = 0, e_start=laws.CLARK_E_START, e_max=laws.CLARK_E_MAX,
        entropy_floor: Optional[float] = None) -> dict[str, Any]:
  """Reads, fits, writes OUT/fit_<law>.json and the plots; returns the JSON dict.

  Raises ValueError with one message for a missing or unusable results file,
  too few runs for the law, or a swept key with a single value.
  """
  if not os.path.isfile(results):
    raise ValueError(f"--results={results}: no such file")
  try:  # before the fit, so a bad --out never throws a fit away
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out={out} cannot be created: {e.strerror}") from None
  if not os.access(out, os.W_OK):
    raise ValueError(f"--out={out} is not writable")
  columns = read_results(results, law, loss)
  needed = len(laws.KRAJEWSKI_PARAMS if law == laws.KRAJEWSKI else CLARK_FREE_PARAMS) + 1
  if law == laws.CLARK:
    needed += (e_start is None) + (e_max is None)
  if columns["name"].size < needed:
    raise ValueError(f"{results} has {columns['name'].size} runs; law={law} fits "
                     f"{needed - 1} coefficients and needs at least {needed} runs (a "
                     f"--shard of a sweep holds part of it: fit the results.csv written "
                     f"once every shard has finished)")
  result = fit(columns, law, loss, bootstrap=bootstrap, seed=seed, e_start=e_start,
               e_max=e_max)
  floor = entropy_floor if entropy_floor is not None else read_entropy_floor(results)
  result.update(results=os.path.abspath(results), loss_column=loss,
                runs=columns["name"].tolist(), entropy_floor=floor,
                warnings=laws.diagnose(result, floor))
  for warning in result["warnings"]:
    logging.warning("fit warning: %s", warning["message"])
  run_lib.write_json(os.path.join(out, f"fit_{law}.json"), result)
  plot_loss_vs_flops(columns, law, loss, result, os.path.join(out, f"{law}_loss_vs_flops.png"))
  if law == laws.KRAJEWSKI:
    plot_loss_vs_granularity(columns, loss, result,
                             os.path.join(out, "krajewski_loss_vs_granularity.png"))
  else:
    plot_loss_vs_experts(columns, loss, result, os.path.join(out, "clark_loss_vs_experts.png"))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  saturation = (None, None) if _FIT_SATURATION.value else (_E_START.value, _E_MAX.value)
  try:
    result = run(_RESULTS.value, _LAW.value, _OUT.value, _LOSS.value,
                 bootstrap=_BOOTSTRAP.value, seed=_SEED.value, e_start=saturation[0],
                 e_max=saturation[1], entropy_floor=_ENTROPY_FLOOR.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for name, entry in result["coefficients"].items():
    logging.info("%s = %.4g, 95%% CI %s", name, entry["value"], entry["ci95"])
  for warning in result["warnings"]:
    print(f"warning: {warning['message']}", file=sys.stderr)
  print(json.dumps({"law": result["law"], "rmse_log": result["rmse_log"],
                    "num_points": result["num_points"],
                    "warnings": [w["kind"] + (f" ({w['coefficient']})" if w["coefficient"]
                                              else "") for w in result["warnings"]]}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["results", "out"])
  app.run(main)
