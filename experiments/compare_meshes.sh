#!/bin/bash
# The first 20 steps of configs/default.py (its 300-step schedule unchanged)
# on 1 device, on 8 host devices (data=2, expert=4), on 2 processes x 2 host
# devices (gloo on 127.0.0.1), and an 8-device run stopped after its step-10
# checkpoint and finished on 1 device. Prints, for each, the largest relative
# train/loss difference to the 1-device run and the first step whose
# train/dropped_fraction differs (a routing decision that flipped), as JSON.
#
#   bash experiments/compare_meshes.sh [OUT_DIR]     # from the repository root
#   EXTRA="--config.seed=1" bash experiments/compare_meshes.sh   # more flags
set -euo pipefail
OUT=${1:-/tmp/compare_meshes}
PY=${PYTHON:-python}
PORT=${PORT:-23457}
COMMON="--config=configs/default.py --config.train.steps=20 --config.train.schedule_steps=300 \
  --config.train.log_every=1 --config.train.eval_every=20 --config.train.checkpoint_every=10 \
  ${EXTRA:-}"
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
def records(name):
  with open(f"{out}/{name}/metrics.jsonl") as f:
    return {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}
one = records("one")
for name in ("eight", "two", "switch"):
  other = records(name)
  assert sorted(other) == sorted(one), (name, sorted(other))
  rel = max(abs(other[s]["train/loss"] - one[s]["train/loss"]) / abs(one[s]["train/loss"])
            for s in one)
  flip = next((s for s in sorted(one) if other[s]["train/dropped_fraction"]
               != one[s]["train/dropped_fraction"]), None)
  print(json.dumps({"run": name, "steps": len(one), "max_rel_diff_vs_1_device": rel,
                    "first_routing_flip_step": flip}))
PY
