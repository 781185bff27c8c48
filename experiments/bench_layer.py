r"""Forward+backward time of `MoELayer` per dispatcher, next to a dense FFN.

    python -m experiments.bench_layer                      # the full grid
    python -m experiments.bench_layer --num_experts=64 --top_k=2 --dispatch=gather
    python -m experiments.bench_layer --breakdown --num_experts=8,64,256 --top_k=2
    python -m experiments.bench_layer --dispatch=dropless --grouped_matmul=xla,tokamax

Prints one JSON object per line: a result per (dispatch, E, k) (dropless: per
grouped matmul too, its resolved name in "grouped_matmul") and a final
summary; then the README's table of ratios (Markdown). A loaded machine is
reported (on stderr, and as the summary's `load_warnings`): repeats of one
timing whose interquartile range exceeds 20% of their median, or an MoE layer timed
faster than its dense yardstick, which it cannot be (it computes at least the
same FFN FLOPs, plus routing). The yardstick is a dense FFN with the same active FLOPs (hidden
k * expert_hidden), timed in the same process; `ratio_to_dense` is the MoE
median time over the dense median time. Times are medians of --repeats runs
after one compile-and-warm-up call.

`--breakdown` profiles the gather layer instead: it times, each as its own
jitted forward+backward, the router (router matmul, `route`, losses and
metrics), the experts alone on a capacity buffer of the layer's shape, and a
memory floor: one pass that reads every expert parameter and writes a
same-sized gradient (what any forward+backward must do at least once). The
parts explain where the layer's time goes as E grows at fixed k.
"""

import functools
import json
import statistics
import sys
import time
from typing import Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx

from moejax import dispatch as dispatch_lib
from moejax import routing as routing_lib
from moejax.dispatch.grouped_matmul import resolve_grouped_matmul, tokamax_module
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
_GROUPED_MATMUL = flags.DEFINE_list(
    "grouped_matmul", ["auto"], "Grouped matmuls to time for dropless "
    f"(`config.model.moe.grouped_matmul`: {list(routing_lib.config.GROUPED_MATMULS)}).")
_DROPLESS_BLOCK = flags.DEFINE_list(
    "dropless_block_size", [], "Block sizes to time for dropless, with each grouped "
    "matmul (for grouped_matmul=auto: 1 = jax.lax.ragged_dot, larger = the blocked loop; "
    "for xla/tokamax only the padding of each expert's rows changes); default: the "
    "grouped matmul's own (`dispatch.dropless.default_block_size`).")
_FORCE_BALANCE = flags.DEFINE_bool(
    "force_balance", False, "Every expert gets the same load (config.model.moe.force_balance):"
    " times the kernels without routing skew.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Profile the gather layer's parts.")
_EINSUM_MAX_EXPERTS = flags.DEFINE_integer(
    "einsum_max_experts", 64, "Skip einsum above this E (its cost is O(T*E*C*D)).")


# Repeats whose interquartile range exceeds this fraction of their median mean
# the machine was busy (an idle 2-core machine stays below ~0.1).
_SPREAD_WARNING = 0.2
_SPREADS: list[tuple[str, float]] = []  # (what was timed, its repeat spread)


def _median_seconds(fn, *args, repeats: int, label: Optional[str] = None) -> float:
  """Median seconds of `fn(*args)` after one compile-and-warm-up call; with a
  label (the table's layer timings) the spread of the repeats is kept for the
  load check (`load_warnings`). The breakdown's parts take milliseconds, and
  their repeats spread even on an idle machine, so they are not checked."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  if label is not None:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
    _SPREADS.append((label, (quartiles[2] - quartiles[0]) / median))
  return median


def load_warnings(results: list[dict], spreads: list[tuple[str, float]]) -> list[str]:
  """Signs that the machine was loaded, which make the ratios untrustworthy:
  repeats that spread widely, or an MoE layer timed faster than the dense
  FFN of the same active FLOPs (it computes at least that FFN, plus routing)."""
  warnings = [f"{label}: repeats spread (interquartile range) {spread:.0%} of their median "
              f"(> {_SPREAD_WARNING:.0%})" for label, spread in spreads
              if spread > _SPREAD_WARNING]
  warnings += [f"{r['dispatch']} E={r['num_experts']} k={r['top_k']}: ratio_to_dense "
               f"{r['ratio_to_dense']} < 1 for a strictly larger computation"
               for r in results if r["ratio_to_dense"] < 1]
  return warnings


def table(results: list[dict]) -> str:
  """The README's table: MoE time / dense time per dispatch, k and E (Markdown)."""
  experts = sorted({r["num_experts"] for r in results})
  rows = {}
  order = list(dict.fromkeys(r["dispatch"] for r in results))
  for r in sorted(results, key=lambda r: (order.index(r["dispatch"]), r["top_k"])):
    name = r["dispatch"] + (f" ({r['grouped_matmul']})" if "grouped_matmul" in r
                            and r["dispatch"] == "dropless" else "")
    rows.setdefault((name, r["top_k"]), {})[r["num_experts"]] = r["ratio_to_dense"]
  last = f"E={experts[-1]} / E={experts[0]}"
  lines = ["| dispatch | k | " + " | ".join(f"E={e}" for e in experts) + f" | {last} |",
           "| --- | --- |" + " --- |" * (len(experts) + 1)]
  for (name, top_k), ratios in rows.items():
    cells = [f"{ratios[e]:.2f}x" if e in ratios else "—" for e in experts]
    both = experts[0] in ratios and experts[-1] in ratios and len(experts) > 1
    span = f"{ratios[experts[-1]] / ratios[experts[0]]:.2f}" if both else "—"
    lines.append(f"| {name} | {top_k} | " + " | ".join(cells) + f" | {span} |")
  return "\n".join(lines) + "\n"


def _time_layer(layer: MoELayer, x: jax.Array, repeats: int,
                label: Optional[str] = None) -> float:
  """Median seconds of one jitted forward+backward (grads of params and x)."""
  graphdef, params = nnx.split(layer)
  cotangent = jax.random.normal(jax.random.key(7), x.shape, x.dtype)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      y, aux = nnx.merge(graphdef, params)(x)
      return jnp.sum(y * cotangent) + aux["weighted_loss"]
    return jax.grad(loss, argnums=(0, 1))(params, x)

  return _median_seconds(step, params, x, repeats=repeats, label=label)


def _time_dropless_block(layer: MoELayer, x: jax.Array, block_size: int) -> float:
  """The layer's time with its dropless grouped matmul at `block_size`."""
  default = layer._dispatcher  # pylint: disable=protected-access
  layer._dispatcher = functools.partial(  # pylint: disable=protected-access
      dispatch_lib.dropless_dispatch, block_size=block_size,
      grouped_matmul=layer.cfg.grouped_matmul)
  try:
    return _time_layer(layer, x, _REPEATS.value)
  finally:
    layer._dispatcher = default  # pylint: disable=protected-access


def _breakdown(layer: MoELayer, x: jax.Array, repeats: int) -> dict[str, float]:
  """Seconds of the gather layer's parts (see the module docstring)."""
  tokens = x.reshape(-1, x.shape[-1])
  groups = x.shape[0]
  kernel = layer.router.kernel[...]
  experts_graph, expert_params = nnx.split(layer.experts)

  @jax.jit
  def router_step(kernel, tokens):
    def loss(kernel, tokens):
      logits = jnp.dot(tokens, kernel).reshape(groups, -1, kernel.shape[-1])
      r = routing_lib.route(logits, router="topk", top_k=layer.top_k,
                            capacity_factor=layer.cfg.capacity_factor)
      return jnp.sum(r.weight) + r.aux_loss + r.z_loss + sum(
          jnp.sum(v) for v in r.metrics.values())
    return jax.grad(loss, argnums=(0, 1))(kernel, tokens)

  capacity = routing_lib.token_choice_capacity(
      num_tokens=tokens.shape[0] // groups, num_experts=layer.num_experts,
      top_k=layer.top_k, capacity_factor=layer.cfg.capacity_factor, min_capacity=1)
  buffer = jax.random.normal(jax.random.key(1),
                             (layer.num_experts, groups * capacity, x.shape[-1]))

  @jax.jit
  def experts_step(params, buffer):
    def loss(params, buffer):
      return jnp.sum(nnx.merge(experts_graph, params)(buffer))
    return jax.grad(loss, argnums=(0, 1))(params, buffer)

  @jax.jit
  def memory_floor(params):
    return jax.tree.map(lambda p: p * 2.0, params)

  return {
      "router": _median_seconds(router_step, kernel, tokens, repeats=repeats),
      "experts": _median_seconds(experts_step, expert_params, buffer, repeats=repeats),
      "param_memory_floor": _median_seconds(memory_floor, expert_params, repeats=repeats),
      "capacity_rows_over_tokens": layer.num_experts * groups * capacity / (
          tokens.shape[0] * layer.top_k),
  }


def main(argv):
  del argv
  x = jax.random.normal(jax.random.key(0), (_BATCH.value, _LENGTH.value, _D_MODEL.value))
  common = dict(d_model=_D_MODEL.value, expert_hidden=_HIDDEN.value)
  dense_seconds = {}
  results = []
  for top_k in map(int, _TOP_K.value):
    dense = MoELayer(num_experts=1, top_k=top_k, router="dense", rngs=nnx.Rngs(0), **common)
    dense_seconds[top_k] = _time_layer(dense, x, _REPEATS.value, f"dense k={top_k}")
    print(json.dumps({"layer": "dense", "top_k": top_k,
                      "hidden": top_k * _HIDDEN.value,
                      "seconds": round(dense_seconds[top_k], 5)}), flush=True)
    runs = [(dispatch, grouped_matmul) for dispatch in _DISPATCH.value
            for grouped_matmul in (_GROUPED_MATMUL.value if dispatch == "dropless"
                                   else [None])]
    for dispatch, grouped_matmul in runs:
      for num_experts in map(int, _EXPERTS.value):
        if dispatch == "einsum" and num_experts > _EINSUM_MAX_EXPERTS.value:
          continue
        capacity_factor = 0.0 if dispatch == "dropless" else _CAPACITY.value
        options = {} if grouped_matmul is None else {"grouped_matmul": grouped_matmul}
        layer = MoELayer(num_experts=num_experts, top_k=top_k, router="topk",
                         capacity_factor=capacity_factor, dispatch=dispatch,
                         force_balance=_FORCE_BALANCE.value, rngs=nnx.Rngs(0), **options,
                         **common)
        seconds = _time_layer(layer, x, _REPEATS.value,
                              f"{dispatch} E={num_experts} k={top_k}")
        if _BREAKDOWN.value and dispatch == "gather":
          parts = _breakdown(layer, x, _REPEATS.value)
          print(json.dumps({"breakdown": True, "num_experts": num_experts, "top_k": top_k,
                            "layer_over_dense": round(seconds / dense_seconds[top_k], 3),
                            **{f"{name}_over_dense": round(value / dense_seconds[top_k], 3)
                               for name, value in parts.items() if name != "capacity_rows_over_tokens"},
                            "capacity_rows_over_tokens": round(parts["capacity_rows_over_tokens"], 3)}),
                flush=True)
        result = {"layer": "moe", "dispatch": dispatch, "num_experts": num_experts,
                  "top_k": top_k, "capacity_factor": capacity_factor,
                  "force_balance": _FORCE_BALANCE.value,
                  "seconds": round(seconds, 5),
                  "ratio_to_dense": round(seconds / dense_seconds[top_k], 3)}
        if grouped_matmul is not None:  # the implementation that ran ("auto" resolved)
          result["grouped_matmul"] = resolve_grouped_matmul(grouped_matmul)
        results.append(result)
        print(json.dumps(result), flush=True)
        if dispatch == "dropless":
          for block_size in map(int, _DROPLESS_BLOCK.value):
            seconds = _time_dropless_block(layer, x, block_size)
            implementation, _ = dispatch_lib.dropless.grouped_matmul_layout(
                grouped_matmul, block_size, 0, num_experts)
            print(json.dumps({**result, "block_size": block_size, "seconds": round(seconds, 5),
                              "ratio_to_dense": round(seconds / dense_seconds[top_k], 3),
                              "grouped_matmul": implementation}),
                  flush=True)

  summary = {"summary": True, "backend": jax.default_backend(),
             "tokens": _BATCH.value * _LENGTH.value, "d_model": _D_MODEL.value,
             "expert_hidden": _HIDDEN.value, "jax": jax.__version__}
  if "dropless" in _DISPATCH.value and "tokamax" in map(resolve_grouped_matmul,
                                                        _GROUPED_MATMUL.value):
    summary["tokamax"] = tokamax_module().__version__
  # Dropless ratios are per grouped matmul when several are timed.
  several = len(_GROUPED_MATMUL.value) > 1
  by_key = {(f"{r['dispatch']}_{r['grouped_matmul']}" if several and "grouped_matmul" in r
             else r["dispatch"], r["num_experts"], r["top_k"]): r["seconds"]
            for r in results}
  for (dispatch, num_experts, top_k), seconds in sorted(by_key.items()):
    base = by_key.get((dispatch, min(map(int, _EXPERTS.value)), top_k))
    if base and num_experts != min(map(int, _EXPERTS.value)):
      summary[f"{dispatch}_k{top_k}_E{num_experts}_over_smallest_E"] = round(seconds / base, 3)
  warnings = load_warnings(results, _SPREADS)
  summary["max_repeat_spread"] = round(max(spread for _, spread in _SPREADS), 3)
  summary["load_warnings"] = warnings
  print(json.dumps(summary), flush=True)
  print("\n" + table(results), end="")
  for warning in warnings:
    print(f"WARNING (machine loaded? rerun when idle): {warning}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
