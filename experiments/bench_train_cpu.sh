#!/usr/bin/env bash
# The README's CPU table of experiments/bench_train.py: one JSON line per
# setting in experiments/results/bench_train_cpu.jsonl (~10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/bench_train_cpu.jsonl
: > "$OUT"
run() {
  local name="$1"; shift
  local line
  line=$(python -m experiments.bench_train --config=configs/default.py --steps=10 --warmup=2 "$@" 2>/dev/null | tail -1)
  echo "{\"setting\": \"$name\", \"flags\": \"$*\", \"result\": $line}" >> "$OUT"
}
run "default"
run "scan" --config.model.scan_layers=true
run "scan+remat=save_matmuls" --config.model.scan_layers=true --config.model.remat=save_matmuls
run "scan+remat=full" --config.model.scan_layers=true --config.model.remat=full
run "remat=full" --config.model.remat=full
run "bf16 compute+params+moments" --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 --config.train.moment_dtype=bfloat16
run "dropless" --config.model.moe.capacity_factor=0 --config.model.moe.dispatch=dropless
run "dense (router=dense)" --config.model.moe.router=dense
run "32 layers" --config.model.num_layers=32 --steps=3 --warmup=1
run "32 layers+scan" --config.model.num_layers=32 --config.model.scan_layers=true --steps=3 --warmup=1
cat "$OUT"
