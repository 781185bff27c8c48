#!/bin/bash
# The same 20 steps of configs/default.py on 1 device, on 8 host devices
# (data=2, expert=4), on 2 processes x 2 host devices (gloo on 127.0.0.1), and
# an 8-device run stopped after its step-10 checkpoint and finished on 1
# device. Prints the largest relative train/loss difference to the 1-device
# run for each (JSON lines).
#
#   bash experiments/compare_meshes.sh [OUT_DIR]     # from the repository root
set -euo pipefail
OUT=${1:-/tmp/compare_meshes}
PY=${PYTHON:-python}
PORT=${PORT:-23457}
COMMON="--config=configs/default.py --config.train.steps=20 --config.train.log_every=1 \
  --config.train.eval_every=20 --config.train.checkpoint_every=10 --config.train.warmup_steps=5"
rm -rf "$OUT" && mkdir -p "$OUT"
devices() { echo "--xla_force_host_platform_device_count=$1"; }

XLA_FLAGS=$(devices 1) $PY -m moejax.main $COMMON --workdir="$OUT/one" > "$OUT/one.log" 2>&1
XLA_FLAGS=$(devices 8) $PY -m moejax.main $COMMON --workdir="$OUT/eight" \
  --config.mesh.data=2 --config.mesh.expert=4 > "$OUT/eight.log" 2>&1
for i in 0 1; do
  XLA_FLAGS=$(devices 2) $PY -m moejax.main $COMMON --workdir="$OUT/two" \
    --coordinator_address=127.0.0.1:$PORT --num_processes=2 --process_id=$i \
    --config.mesh.expert=2 > "$OUT/two_$i.log" 2>&1 &
done
wait
XLA_FLAGS=$(devices 8) $PY -m moejax.main $COMMON --workdir="$OUT/switch" \
  --config.mesh.data=2 --config.mesh.expert=4 > "$OUT/switch8.log" 2>&1
rm -rf "$OUT/switch/checkpoints/20"
XLA_FLAGS=$(devices 1) $PY -m moejax.main $COMMON --workdir="$OUT/switch" > "$OUT/switch1.log" 2>&1

$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def losses(name):
  with open(f"{out}/{name}/metrics.jsonl") as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
one = losses("one")
for name in ("eight", "two", "switch"):
  other = losses(name)
  assert sorted(other) == sorted(one), (name, sorted(other))
  rel = max(abs(other[s] - one[s]) / abs(one[s]) for s in one)
  print(json.dumps({"run": name, "steps": len(one), "max_rel_diff_vs_1_device": rel}))
PY
