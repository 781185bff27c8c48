r"""Forward+backward time of `MoELayer` per dispatcher, next to a dense FFN.

    python -m experiments.bench_layer                      # the full grid
    python -m experiments.bench_layer --num_experts=64 --top_k=2 --dispatch=gather

Prints one JSON object per line: a result per (dispatch, E, k) and a final
summary. The yardstick is a dense FFN with the same active FLOPs (hidden
k * expert_hidden), timed in the same process; `ratio_to_dense` is the MoE
median time over the dense median time. Times are medians of --repeats runs
after one compile-and-warm-up call.
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx

from moejax.nn import MoELayer

_DISPATCH = flags.DEFINE_list("dispatch", ["gather", "dropless", "einsum"], "Dispatchers.")
_EXPERTS = flags.DEFINE_list("num_experts", ["8", "64", "256"], "Expert counts E.")
_TOP_K = flags.DEFINE_list("top_k", ["1", "2"], "Choices per token k.")
_CAPACITY = flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor (gather, einsum).")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width D.")
_HIDDEN = flags.DEFINE_integer("expert_hidden", 512, "Expert hidden width H.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per batch.")
_LENGTH = flags.DEFINE_integer("length", 1024, "Tokens per sequence (= routing group).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per configuration.")
_EINSUM_MAX_EXPERTS = flags.DEFINE_integer(
    "einsum_max_experts", 64, "Skip einsum above this E (its cost is O(T*E*C*D)).")


def _time_layer(layer: MoELayer, x: jax.Array, repeats: int) -> float:
  """Median seconds of one jitted forward+backward (grads of params and x)."""
  graphdef, params = nnx.split(layer)
  cotangent = jax.random.normal(jax.random.key(7), x.shape, x.dtype)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      y, aux = nnx.merge(graphdef, params)(x)
      return jnp.sum(y * cotangent) + aux["weighted_loss"]
    return jax.grad(loss, argnums=(0, 1))(params, x)

  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  x = jax.random.normal(jax.random.key(0), (_BATCH.value, _LENGTH.value, _D_MODEL.value))
  common = dict(d_model=_D_MODEL.value, expert_hidden=_HIDDEN.value)
  dense_seconds = {}
  results = []
  for top_k in map(int, _TOP_K.value):
    dense = MoELayer(num_experts=1, top_k=top_k, router="dense", rngs=nnx.Rngs(0), **common)
    dense_seconds[top_k] = _time_layer(dense, x, _REPEATS.value)
    print(json.dumps({"layer": "dense", "top_k": top_k,
                      "hidden": top_k * _HIDDEN.value,
                      "seconds": round(dense_seconds[top_k], 5)}), flush=True)
    for dispatch in _DISPATCH.value:
      for num_experts in map(int, _EXPERTS.value):
        if dispatch == "einsum" and num_experts > _EINSUM_MAX_EXPERTS.value:
          continue
        capacity_factor = 0.0 if dispatch == "dropless" else _CAPACITY.value
        layer = MoELayer(num_experts=num_experts, top_k=top_k, router="topk",
                         capacity_factor=capacity_factor, dispatch=dispatch,
                         rngs=nnx.Rngs(0), **common)
        seconds = _time_layer(layer, x, _REPEATS.value)
        result = {"layer": "moe", "dispatch": dispatch, "num_experts": num_experts,
                  "top_k": top_k, "capacity_factor": capacity_factor,
                  "seconds": round(seconds, 5),
                  "ratio_to_dense": round(seconds / dense_seconds[top_k], 3)}
        results.append(result)
        print(json.dumps(result), flush=True)

  summary = {"summary": True, "backend": jax.default_backend(),
             "tokens": _BATCH.value * _LENGTH.value, "d_model": _D_MODEL.value,
             "expert_hidden": _HIDDEN.value, "jax": jax.__version__}
  by_key = {(r["dispatch"], r["num_experts"], r["top_k"]): r["seconds"] for r in results}
  for (dispatch, num_experts, top_k), seconds in sorted(by_key.items()):
    base = by_key.get((dispatch, min(map(int, _EXPERTS.value)), top_k))
    if base and num_experts != min(map(int, _EXPERTS.value)):
      summary[f"{dispatch}_k{top_k}_E{num_experts}_over_smallest_E"] = round(seconds / base, 3)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  app.run(main)
