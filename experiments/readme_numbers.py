r"""Regenerates the README's numbers of the main job, shakespeare and generation.

    python -m experiments.readme_numbers --workdir=/tmp/readme_numbers \
        [--shakespeare_dir=../shared/data/tiny_shakespeare] [--out=FILE] [--check]

Runs each README command below in `workdir/<name>` as a subprocess of this
interpreter (the commands exactly as the README gives them, but for the
workdir), timing it and recording its peak memory and the machine's load:
the 1-minute load average before it starts and the CPU time the machine
spent outside the command while it ran, so a time measured on a busy machine
says so ("idle": false). A command whose run is already recorded in
`workdir/timings.json` is not run again (delete the entry, or the folder, to
re-measure). Then it prints every README number these runs give, each with
the file, key and step it comes from, and the sentences of the README that
state them (`render`); `--out` writes the numbers as JSON
(experiments/results/readme_numbers.json is this script's output at the
commit that wrote it) and `--check` exits 1 unless README.md contains every
rendered sentence. tests/test_readme.py checks the README against the
committed JSON, so a number changed in one place and not the other fails.

The numbers of the tables elsewhere in the README come from their own
scripts, listed in `SOURCES` (printed too).
"""

import json
import os
import subprocess
import sys
import time
from typing import Optional

from absl import app
from absl import flags

from experiments import compare_runs

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_README = os.path.join(_REPO, "README.md")
_SHARED_DIR = os.path.join(os.path.dirname(_REPO), "shared", "data", "tiny_shakespeare")
# CPU time of other processes per second of the command's wall time below which
# the machine counts as idle while it ran (the load average lags by a minute).
_IDLE_LOAD = 0.3


# name -> argv after the interpreter; {w}: the command's workdir, {runs}: the
# parent folder, {shakespeare_dir}: the manual dir.
COMMANDS = {
    "main": ["-m", "moejax.main", "--config=configs/default.py", "--workdir={w}"],
    "main_rerun": ["-m", "moejax.main", "--config=configs/default.py",
                   "--workdir={runs}/main"],
    "shakespeare": ["-m", "moejax.main", "--config=configs/shakespeare.py", "--workdir={w}",
                    "--config.data.manual_dir={shakespeare_dir}"],
    "shakespeare_rerun": ["-m", "moejax.main", "--config=configs/shakespeare.py",
                          "--workdir={runs}/shakespeare",
                          "--config.data.manual_dir={shakespeare_dir}"],
    "generate": ["-m", "moejax.generate", "--workdir={runs}/shakespeare", "--prompt=ROMEO:",
                 "--prompt=JULIET:", "--temperature=0.8", "--top_k=40", "--seed=0",
                 "--out={runs}/generate.json"],
}

SOURCES = {
    "Compare routers": "python -m experiments.compare_routers; its tables and every point's "
                       "metrics: experiments/results/routers/",
    "Performance": "python -m experiments.bench_layer; python -m experiments.bench_train",
    "Reproductions": "each notebook in colabs/ (its study in experiments/studies/, results "
                     "in experiments/results/<study>/)",
    "Test": "bash .ci/run on a fresh clone (its pytest summary line)",
}


def _cpu_busy_seconds() -> float:
  """Machine-wide CPU seconds spent not idle (/proc/stat), or 0 where absent."""
  try:
    with open("/proc/stat") as f:
      fields = [float(v) for v in f.readline().split()[1:]]
  except OSError:
    return 0.0
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
  return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def run_command(name: str, argv: list[str]) -> dict:
  """Runs one command; its wall time, peak memory and the machine's load."""
  print(f"[readme_numbers] {name}: {' '.join(argv)}", flush=True)
  load = os.getloadavg()[0]
  busy = _cpu_busy_seconds()
  start = time.time()
  process = subprocess.Popen([sys.executable, *argv], cwd=_REPO)
  _, status, usage = os.wait4(process.pid, 0)
  wall = time.time() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{name} failed (exit {os.waitstatus_to_exitcode(status)}): "
                     f"{' '.join(argv)}")
  command_cpu = usage.ru_utime + usage.ru_stime
  others = max(0.0, _cpu_busy_seconds() - busy - command_cpu) / max(wall, 1e-9)
  return {"argv": argv, "wall_seconds": round(wall, 1),
          "peak_rss_mb": round(usage.ru_maxrss / 1024), "load_before": round(load, 2),
          "other_cpu_load": round(others, 2), "cpus": os.cpu_count(),
          "idle": others < _IDLE_LOAD}


def run_all(workdir: str, shakespeare_dir: str) -> dict:
  path = os.path.join(workdir, "timings.json")
  timings = {}
  if os.path.exists(path):
    with open(path) as f:
      timings = json.load(f)
  for name, template in COMMANDS.items():
    if name in timings:
      continue
    argv = [arg.format(w=os.path.join(workdir, name), runs=workdir,
                       shakespeare_dir=shakespeare_dir) for arg in template]
    timings[name] = run_command(name, argv)
    with open(path + ".tmp", "w") as f:
      json.dump(timings, f, indent=1)
    os.replace(path + ".tmp", path)
  return timings


def _records(run_dir: str) -> list[dict]:
  """metrics.jsonl's records (compare_runs' reader); a damaged line is an error."""
  path = os.path.join(run_dir, "metrics.jsonl")
  records, bad = compare_runs.read_metrics(path)
  if bad:
    raise ValueError(f"{path}: line {bad[0][0]} is {bad[0][1]}")
  return records


def _series(records: list[dict], key: str) -> list[tuple[int, float]]:
  return [(r["step"], r[key]) for r in records if key in r]


def run_numbers(run_dir: str) -> dict:
  """The numbers the README quotes of one run, with where they come from."""
  records = _records(run_dir)
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  last = [r for r in records if "train/loss" in r][-1]
  numbers = {
      "source": os.path.join(run_dir, "metrics.jsonl"),
      "eval_steps": [s for s, _ in _series(records, "eval/loss")],
      "eval_loss": [v for _, v in _series(records, "eval/loss")],
      "final_step": last["step"], "final_train_loss": last["train/loss"],
      "final_train_max_violation": last.get("train/max_violation"),
      "eval_max_violation": [v for _, v in _series(records, "eval/max_violation")],
      "eval_expert_domain_mi": [v for _, v in _series(records, "eval/expert_domain_mi")],
      "summary": os.path.join(run_dir, "summary.json"),
  }
  data = summary.get("data", {})
  for key in ("entropy_floor", "unigram_entropy"):
    if data.get(key) is not None:
      numbers[key] = data[key]
  return numbers


def collect(workdir: str, timings: dict) -> dict:
  generated = os.path.join(workdir, "generate.json")
  with open(generated) as f:
    samples = json.load(f)["samples"]
  return {"timings": timings,
          "main": run_numbers(os.path.join(workdir, "main")),
          "shakespeare": run_numbers(os.path.join(workdir, "shakespeare")),
          "generate": {"source": generated, "samples": samples}}


def _arrow(values, digits) -> str:
  return " -> ".join(f"{v:.{digits}f}" for v in values)


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} minutes"


def _cores(timing: dict) -> str:
  return f"{timing['cpus']} {'idle ' if timing['idle'] else 'busy (not idle) '}CPU cores"


def render(numbers: dict) -> dict[str, str]:
  """The README's sentences (exact substrings) that state these numbers."""
  main, shakespeare, timings = numbers["main"], numbers["shakespeare"], numbers["timings"]
  steps = "/".join(str(s) for s in main["eval_steps"])
  main_time = timings["main"]
  sentences = {
      "main_losses": (f"`eval/loss` {_arrow(main['eval_loss'], 4)} at steps {steps}, final "
                      f"`train/loss` {main['final_train_loss']:.4f}"),
      "main_floor": (f"entropy floor of {main['entropy_floor']:.2f} and a unigram entropy "
                     f"of {main['unigram_entropy']:.2f}"),
      "main_mi": (f"`eval/expert_domain_mi` {_arrow(main['eval_expert_domain_mi'], 2)} bits"),
      "main_maxvio": (f"MaxVio {main['final_train_max_violation']:.2f} at step "
                      f"{main['final_step']} (`train/max_violation`)"),
      "main_time": (f"{main['final_step']} steps took {_minutes(main_time['wall_seconds'])} "
                    f"on {_cores(main_time)}"),
      "rerun": (f"{timings['main_rerun']['wall_seconds']:.0f} s and "
                f"{timings['main_rerun']['peak_rss_mb']} MB"),
      "shakespeare": (
          f"measured on {_cores(timings['shakespeare'])}: {shakespeare['final_step']} steps in "
          f"{_minutes(timings['shakespeare']['wall_seconds'])}, `eval/loss` "
          f"{_arrow(shakespeare['eval_loss'], 4)} nats per byte at steps "
          + "/".join(str(s) for s in shakespeare["eval_steps"])),
      "shakespeare_unigram": f"unigram entropy of the text is {shakespeare['unigram_entropy']:.2f}",
      "generate_time": (f"({timings['generate']['wall_seconds']:.0f} s for 2 x 200 tokens "
                        "including loading and compiling"),
  }
  continuation = numbers["generate"]["samples"][0]["continuation"]
  sentences["generate_sample"] = "ROMEO:" + "\n".join(continuation.split("\n")[:8])
  return sentences


def _words(text: str) -> str:
  return " ".join(text.split())


def unstated(readme: str, sentences: dict[str, str]) -> list[str]:
  """The names of the sentences README does not contain (line breaks and runs
  of spaces count as one space, so the README may wrap them)."""
  words = _words(readme)
  return [name for name, text in sentences.items() if _words(text) not in words]


def main(argv, parsed: dict):
  del argv
  workdir = os.path.abspath(parsed["workdir"].value)
  os.makedirs(workdir, exist_ok=True)
  timings = run_all(workdir, os.path.abspath(parsed["shakespeare_dir"].value))
  numbers = collect(workdir, timings)
  for name, timing in timings.items():
    print(f"{name}: {timing['wall_seconds']} s, peak {timing['peak_rss_mb']} MB, load before "
          f"{timing['load_before']}, other CPU load {timing['other_cpu_load']}"
          + ("" if timing["idle"] else "  (NOT IDLE: re-measure on an idle machine)"))
  for run in ("main", "shakespeare"):
    print(f"{run}: from {numbers[run]['source']} (steps {numbers[run]['eval_steps']}) and "
          f"{numbers[run]['summary']}")
  print(f"generate: from {numbers['generate']['source']}")
  sentences = render(numbers)
  with open(_README) as f:
    readme = f.read()
  missing = unstated(readme, sentences)
  for name, text in sentences.items():
    print(f"  {'ok  ' if name not in missing else 'DIFF'} {name}: {text!r}")
  for section, source in SOURCES.items():
    print(f"README '{section}': {source}")
  if parsed["out"].value:
    with open(parsed["out"].value, "w") as f:
      json.dump(numbers, f, indent=1)
      f.write("\n")
  if parsed["check"].value and missing:
    print(f"README.md does not state: {missing}")
    return 1
  return 0


if __name__ == "__main__":
  # Defined here, not at import: tests import this module beside experiments.sweep.
  _PARSED = {
      "workdir": flags.DEFINE_string("workdir", None, "folder of the runs (resumed, never "
                                     "deleted)"),
      "shakespeare_dir": flags.DEFINE_string("shakespeare_dir", _SHARED_DIR, "folder holding "
                                             "tiny_shakespeare's input.txt"),
      "out": flags.DEFINE_string("out", None, "write the numbers as JSON here"),
      "check": flags.DEFINE_bool("check", False, "exit 1 unless README.md states every number"),
  }
  flags.mark_flag_as_required("workdir")
  app.run(lambda argv: sys.exit(main(argv, _PARSED)))
