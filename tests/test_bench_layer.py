"""experiments.bench_layer: the README's table, and the warnings of a loaded machine."""

import json
import subprocess
import sys

from experiments import bench_layer

import host_devices  # tests/host_devices.py


def _result(dispatch, experts, top_k, ratio):
  return {"layer": "moe", "dispatch": dispatch, "num_experts": experts, "top_k": top_k,
          "ratio_to_dense": ratio}


def test_table_and_load_warnings():
  results = [_result("gather", 8, 1, 1.29), _result("gather", 256, 1, 3.33),
             _result("dropless", 8, 2, 0.66)]
  assert bench_layer.table(results) == (
      "| dispatch | k | E=8 | E=256 | E=256 / E=8 |\n"
      "| --- | --- | --- | --- | --- |\n"
      "| gather | 1 | 1.29x | 3.33x | 2.58 |\n"
      "| dropless | 2 | 0.66x | — | — |\n")
  warnings = bench_layer.load_warnings(results, [("dense k=1", 0.05), ("gather E=8 k=1", 0.4)])
  assert warnings == ["gather E=8 k=1: repeats spread (interquartile range) 40% of their "
                      "median (> 20%)",
                      "dropless E=8 k=2: ratio_to_dense 0.66 < 1 for a strictly larger "
                      "computation"]
  assert bench_layer.load_warnings(results[:2], [("dense k=1", 0.05)]) == []


def test_a_small_run_prints_json_then_the_table():
  done = subprocess.run(
      [sys.executable, "-m", "experiments.bench_layer", "--dispatch=gather",
       "--num_experts=2,4", "--top_k=1", "--batch=1", "--length=32", "--d_model=16",
       "--expert_hidden=16", "--repeats=3"], capture_output=True, text=True, timeout=300,
      cwd=host_devices.REPO, env=host_devices.subprocess_env(1))
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.strip().splitlines()
  summary = json.loads(lines[3])
  assert summary["summary"] and isinstance(summary["load_warnings"], list)
  assert summary["max_repeat_spread"] >= 0
  assert lines[5] == "| dispatch | k | E=2 | E=4 | E=4 / E=2 |"
  assert lines[7].startswith("| gather | 1 | ")
  assert len(summary["load_warnings"]) == done.stderr.count("WARNING (machine loaded?")
