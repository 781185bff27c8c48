r"""Every router at matched active compute, on several corpora, over seeds: one command.

    python -m experiments.compare_routers --workdir=/tmp/compare_routers \
        [--corpora=tiny_shakespeare,python_stdlib,synthetic_mixture] [--seeds=3] \
        [--scale=tiny] [--shakespeare_dir=../shared/data/tiny_shakespeare] \
        [--routers=dense,topk,...] [--extra=key=value ...]

For each seed, and within it each corpus, the points of
`configs/sweeps/routers.py:<scale>` (dense and every router at the active
compute of top-2, with the settings each needs: expert choice and Soft MoE at
capacity factor 2, DeepSeek-V3's gate on groups that 8 experts allow; the
module's docstring says why each setting) train through `experiments.sweep`
with the corpus's data overrides (`CORPORA` of that module) and
`config.seed` = the seed, into `workdir/<corpus>/seed<k>/points/<router>`.
Seeds are the outer loop, so a run cut short has every corpus at the seeds it
finished. The command is resumable like a sweep: finished points are
skipped, an interrupted point resumes from its checkpoint.

Then, from every finished point:
  * the router table (`router_table.point_row` of each point, mean ± sample
    std over seeds, `compare_runs.sample_std`): per corpus and router the
    final eval loss, MaxVio over the last quarter of the logs, the dropped
    fraction and the median tokens/s. Printed as Markdown, written to
    `workdir/router_table.md` and `workdir/router_table.json`;
  * `compare_runs` per corpus: `workdir/<corpus>/compare/` holds the loss
    curves of every router with a band of one std across seeds, and the
    final-loss table.

Exit status: 0 when every point finished; 130 after Ctrl-C and 0 after
SIGTERM (the point's checkpoint saved, the tables written from what
finished); 1 for an invalid setting or points that diverged.
"""

import dataclasses
import json
import os
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments import compare_runs
from experiments import router_table
from experiments import sweep as sweep_lib
from moejax import run as run_lib
from moejax import train as train_lib

_ROUTERS = "configs/sweeps/routers.py"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED_DIR = os.path.join(os.path.dirname(_REPO), "shared", "data", "tiny_shakespeare")
_COLUMNS = (("eval_loss", "eval loss"), ("max_violation_last_quarter", "MaxVio (last 25%)"),
            ("dropped_fraction", "dropped"), ("tokens_per_sec", "tokens/s"))
# The corpus table's columns: the above, with the paired difference to dense second.
_TABLE_COLUMNS = (_COLUMNS[0], ("vs_dense", "eval loss − dense (paired)"), *_COLUMNS[1:])

# --workdir and --extra are the sweep runner's own flags (sweep.py defines them at import).
_WORKDIR = sweep_lib._WORKDIR  # pylint: disable=protected-access
_EXTRA = sweep_lib._EXTRA  # pylint: disable=protected-access
_CORPORA = flags.DEFINE_list("corpora", ["tiny_shakespeare", "python_stdlib",
                                         "synthetic_mixture"], "corpora of routers.py CORPORA")
_SEEDS = flags.DEFINE_integer("seeds", 3, "seeds 0..n-1 per corpus and router")
_SCALE = flags.DEFINE_string("scale", "tiny", "scale of configs/sweeps/routers.py")
_SHAKESPEARE = flags.DEFINE_string("shakespeare_dir", _SHARED_DIR,
                                   "folder holding tiny_shakespeare's input.txt")
_ROUTER_NAMES = flags.DEFINE_list("routers", None, "only these points of the sweep "
                                  "(default: all)")


def corpus_overrides(corpus: str, shakespeare_dir: Optional[str]) -> dict:
  corpora = sweep_lib.load_module(_ROUTERS, "routers_sweep").CORPORA
  if corpus not in corpora:
    raise ValueError(f"--corpora: unknown corpus {corpus!r}; valid: {sorted(corpora)}")
  overrides = dict(corpora[corpus])
  if corpus == "tiny_shakespeare":
    if not shakespeare_dir or not os.path.isdir(shakespeare_dir):
      raise ValueError(f"--shakespeare_dir={shakespeare_dir!r} does not exist: tiny_shakespeare "
                       "is read from the folder holding its input.txt")
    overrides["data.manual_dir"] = os.path.abspath(shakespeare_dir)
  return overrides


@dataclasses.dataclass(frozen=True)
class Options:
  corpora: Sequence[str]
  seeds: int = 3
  scale: str = "tiny"
  shakespeare_dir: Optional[str] = _SHARED_DIR
  routers: Optional[Sequence[str]] = None    # None: every point of the sweep
  extra: dict = dataclasses.field(default_factory=dict)


def plan(options: Options) -> list[tuple[str, int, list]]:
  """[(corpus, seed, points)], every point validated before anything trains."""
  if options.seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {options.seeds}")
  sweeps = []
  for seed in range(options.seeds):
    for corpus in options.corpora:
      extra = {**corpus_overrides(corpus, options.shakespeare_dir), "seed": seed,
               **options.extra}
      points = sweep_lib.load_sweep(f"{_ROUTERS}:{options.scale}", extra)
      names = [point.name for point in points]
      unknown = sorted(set(options.routers or ()) - set(names))
      if unknown:
        raise ValueError(f"--routers: {unknown} are not points of {_ROUTERS}; valid: {names}")
      sweeps.append((corpus, seed, [p for p in points
                                    if options.routers is None or p.name in options.routers]))
  return sweeps


def _finished(sweep_dir: str, name: str) -> bool:
  point = os.path.join(sweep_dir, "points", name)
  return any(os.path.exists(os.path.join(point, end)) for end in (sweep_lib.DONE,
                                                                    sweep_lib.FAILED))


def _seed_dirs(workdir: str, corpus: str) -> list[str]:
  folder = os.path.join(workdir, corpus)
  names = sorted(n for n in os.listdir(folder) if n.startswith("seed")) if os.path.isdir(
      folder) else []
  return [os.path.join(folder, name) for name in names]


def table(workdir: str, corpora: Sequence[str]) -> list[dict]:
  """Per corpus and router (the sweep's order): mean and std over finished
  seeds, and the eval loss minus dense's paired by seed (`vs_dense`: over the
  seeds where both finished)."""
  rows = []
  for corpus in corpora:
    per_router: dict[str, dict[str, dict]] = {}  # router -> seed folder -> row
    for seed_dir in _seed_dirs(workdir, corpus):
      points = os.path.join(seed_dir, "points")
      for name in os.listdir(points) if os.path.isdir(points) else []:
        done = os.path.join(points, name, sweep_lib.DONE)
        if os.path.exists(done):
          row = router_table.point_row(name, os.path.join(points, name))
          row["index"] = run_lib.read_json(done)["index"]
          per_router.setdefault(name, {})[seed_dir] = row
    dense = per_router.get("dense", {})
    for name, by_seed in sorted(per_router.items(),
                                key=lambda item: next(iter(item[1].values()))["index"]):
      seeds = list(by_seed.values())
      row = {"corpus": corpus, "router": name, "seeds": len(seeds)}
      for key, _ in _COLUMNS:
        row.update(_mean_std(key, [s[key] for s in seeds]))
      if name != "dense":
        row.update(_mean_std("vs_dense", [r["eval_loss"] - dense[d]["eval_loss"]
                                          for d, r in by_seed.items() if d in dense]))
        row["vs_dense_seeds"] = sum(d in dense for d in by_seed)
      rows.append(row)
  return rows


def _mean_std(key: str, values: Sequence[Optional[float]]) -> dict:
  values = np.array([v for v in values if v is not None], np.float64)
  return {key: float(values.mean()) if values.size else None,
          f"{key}_std": float(compare_runs.sample_std(values)) if values.size else None}


def _cell(row: dict, key: str) -> str:
  """mean ± std over seeds; the mean alone for one seed."""
  if row.get(key) is None:
    return "—"
  digits = 0 if key == "tokens_per_sec" else 3
  seeds = row["vs_dense_seeds"] if key == "vs_dense" else row["seeds"]
  spread = f" ± {row[f'{key}_std']:.{digits}f}" if seeds > 1 else ""
  sign = "+" if key == "vs_dense" else ""
  return f"{row[key]:{sign}.{digits}f}{spread}"


def loss_table(rows: Sequence[dict]) -> str:
  """Routers x corpora: final eval loss, mean ± std over seeds (Markdown)."""
  corpora = list(dict.fromkeys(row["corpus"] for row in rows))
  by_key = {(row["corpus"], row["router"]): row for row in rows}
  lines = ["| router | " + " | ".join(corpora) + " |", "| --- |" + " --- |" * len(corpora)]
  for router in dict.fromkeys(row["router"] for row in rows):
    cells = [_cell(by_key[(c, router)], "eval_loss") if (c, router) in by_key else "—"
             for c in corpora]
    lines.append(f"| {router} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def corpus_table(rows: Sequence[dict], corpus: str) -> str:
  """One corpus: every column of `_TABLE_COLUMNS`, mean ± std over seeds (Markdown)."""
  lines = ["| router | seeds | " + " | ".join(title for _, title in _TABLE_COLUMNS) + " |",
           "| --- | --- |" + " --- |" * len(_TABLE_COLUMNS)]
  for row in rows:
    if row["corpus"] == corpus:
      lines.append(f"| {row['router']} | {row['seeds']} | "
                   + " | ".join(_cell(row, key) for key, _ in _TABLE_COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def markdown(rows: Sequence[dict]) -> str:
  """The eval-loss table, then each corpus's table."""
  parts = ["Final eval loss (nats per token; per byte on the byte-level corpora), "
           "mean ± std over seeds:\n\n" + loss_table(rows)]
  for corpus in dict.fromkeys(row["corpus"] for row in rows):
    parts.append(f"{corpus}:\n\n" + corpus_table(rows, corpus))
  return "\n".join(parts)


def write_tables(workdir: str, corpora: Sequence[str]) -> str:
  rows = table(workdir, corpora)
  text = markdown(rows)
  for name, content in (("router_table.md", text),
                        ("router_table.json", json.dumps(rows, indent=1) + "\n")):
    with open(os.path.join(workdir, name + ".tmp"), "w") as f:
      f.write(content)
    os.replace(os.path.join(workdir, name + ".tmp"), os.path.join(workdir, name))
  for corpus in corpora:
    runs = [d for d in _seed_dirs(workdir, corpus) if os.path.isdir(os.path.join(d, "points"))]
    if runs:
      compare_runs.compare(runs, os.path.join(workdir, corpus, "compare"))
  return text


def run(workdir: str, options: Options) -> str:
  """Trains what is unfinished, then writes and returns the tables (Markdown)."""
  sweeps = plan(options)
  failed = []
  try:
    for number, (corpus, seed, points) in enumerate(sweeps, 1):
      logging.info("[sweep %d/%d] %s, seed %d: %d routers", number, len(sweeps), corpus,
                   seed, len(points))
      folder = os.path.join(workdir, corpus, f"seed{seed}")
      try:
        sweep_lib.run_sweep(points, folder)
      except train_lib.NonFiniteLossError as e:
        failed.append(f"{corpus} seed {seed}: {e}")
      if not all(_finished(folder, point.name) for point in points):
        logging.warning("stopped by a signal in %s; rerun the command to resume", folder)
        break
  finally:
    text = write_tables(workdir, options.corpora)
  if failed:
    raise train_lib.NonFiniteLossError("; ".join(failed))
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")

  def body():
    os.makedirs(_WORKDIR.value, exist_ok=True)
    options = Options(corpora=_CORPORA.value, seeds=_SEEDS.value, scale=_SCALE.value,
                      shakespeare_dir=_SHAKESPEARE.value, routers=_ROUTER_NAMES.value,
                      extra=sweep_lib.parse_extra(_EXTRA.value))
    return run(_WORKDIR.value, options)

  print(sweep_lib.run_cli(body))


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
