"""The one evaluator: held-out loss and per-layer routing of a model.

The training loop (every `eval_every` steps), `python -m moejax.evaluate` and
the studies all run it (big_vision's evaluators and vmoe's evaluation hook are
the anchors):

    evaluator = Evaluator(graphdef, num_domains=..., frozen=...)
    result = evaluator.run(params, batches)
    record = layer_report(result, moe_layers)   # eval/loss, eval/layer{i}/...

What differs between evaluations is expressed once: the routing settings
(capacity, dropless, regrouping) as a validated config (`eval_config`), the
routing-leak probe as arguments of the one step (`loss_before`, `scramble`).
Every scalar a router reports per layer passes through by its own name; the
ones computed from the expert load (`max_violation`, `dead_experts`) come
from the load averaged over the batches.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from moejax.nn.attention import explicit_spec
from moejax.train import config as config_lib
from moejax.train import routing_report
from moejax.train import steps as steps_lib

# Per-layer values computed from the mean expert load over the batches, not
# averaged per batch; and per-layer aux entries that are not scalars.
_FROM_LOAD = ("max_violation", "load_max_over_mean")
_NOT_SCALARS = ("expert_load", "first_expert", "trace")


def _layer_scalars(layers: dict[int, dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """{name: <float32>[MoE layers]} for every scalar all MoE layers report."""
  if not layers:
    return {}
  names = set.intersection(*(set(layer) for layer in layers.values()))
  names -= set(_FROM_LOAD) | set(_NOT_SCALARS)
  names = {name for name in names if all(jnp.ndim(layer[name]) == 0
                                         for layer in layers.values())}
  return {name: jnp.stack([jnp.asarray(layer[name], jnp.float32)
                           for layer in layers.values()]) for name in sorted(names)}


def _next_row(tokens: jax.Array) -> jax.Array:
  """<int>[B, L] -> each row replaced by the row before it (another window of
  the corpus), on any mesh: a roll across batch-sharded rows is done
  replicated, then laid out as the input was."""
  spec = explicit_spec(tokens)
  if spec is None:
    return jnp.roll(tokens, 1, axis=0)
  rolled = jnp.roll(jax.sharding.reshard(tokens, PartitionSpec()), 1, axis=0)
  return jax.sharding.reshard(rolled, PartitionSpec(*spec))


def make_eval_step(graphdef, *, num_domains: int = 0, frozen: Any = None,
                   loss_before: Optional[int] = None, scramble: bool = False,
                   trace: bool = False):
  """A jitted (params, batch) -> (loss sum, target count, loads, joint, scalars,
  traces).

  loads: <float32>[MoE layers, E] expert load; joint: <float32>[MoE layers,
  num_domains, E] counts of (domain, first expert) over real tokens when the
  batch has a "domain" field and num_domains > 0, else [MoE layers, 0, E];
  scalars: {name: <float32>[MoE layers]} the routers' per-layer scalars.
  `frozen`: the rest of a LoRA model's state (as in `steps.make_train_step`).
  With `loss_before` = P only positions < P count in the loss, and with
  `scramble` positions >= P hold another row's tokens (rows are independent
  windows of the corpus). Routing always sees the batch's own padding mask.
  A batch with "routes" ({MoE layer: <int>[B, L, K]}) replays them
  (`TransformerLM.__call__`); with `trace`, traces is {"batch": the
  batch's inputs, targets and weights [B, L], "layers": {MoE layer: its
  "trace" arrays [B, L, ...]}} on every device, else {}."""
  def eval_step(params, frozen, batch):
    mask = steps_lib.padding_mask(batch)
    inputs, weights = batch["inputs"], batch["weights"]
    if loss_before is not None:
      positions = jnp.arange(inputs.shape[1])[None, :]
      weights = jnp.where(positions < loss_before, weights, 0.0)
      if scramble:
        inputs = jnp.where(positions >= loss_before, _next_row(inputs), inputs)
    states = (params,) if frozen is None else (params, frozen)
    logits, aux = nnx.merge(graphdef, *states)(inputs, mask=mask, routes=batch.get("routes"),
                                               trace=trace)
    total, count = steps_lib.cross_entropy(logits, batch["targets"], weights)
    loads = steps_lib.replicated(steps_lib.layer_loads(aux))
    layers = aux.get("layers", {})
    joints = []
    for layer in layers.values():
      if num_domains and "domain" in batch:
        joints.append(routing_report.joint_counts(
            steps_lib.replicated(batch["domain"]),
            steps_lib.replicated(layer["first_expert"]), num_domains, loads.shape[-1],
            steps_lib.replicated(mask)))
      else:
        joints.append(jnp.zeros((0, loads.shape[-1]), jnp.float32))
    joint = jnp.stack(joints) if joints else jnp.zeros((0, 0, 0), jnp.float32)
    traces = {}
    if trace:  # every device holds the global rows (any process may write them)
      traces = jax.tree.map(steps_lib.replicated, {
          "batch": {name: batch[name] for name in ("inputs", "targets", "weights")},
          "layers": {index: layer["trace"] for index, layer in layers.items()}})
    return total, count, loads, joint, _layer_scalars(layers), traces
  return steps_lib.jit_with_frozen(eval_step, frozen)


class Evaluator:
  """Runs one eval step over batches and sums what it returns."""

  def __init__(self, graphdef, *, num_domains: int = 0, frozen: Any = None,
               loss_before: Optional[int] = None, scramble: bool = False,
               trace: bool = False):
    self.step = make_eval_step(graphdef, num_domains=num_domains, frozen=frozen,
                               loss_before=loss_before, scramble=scramble, trace=trace)

  def run(self, params, batches) -> dict[str, Any]:
    """Held-out loss and routing over `batches`.

    Returns:
      loss: mean cross-entropy (nats per target token).
      expert_load: <float64>[MoE layers, E] mean load over the batches.
      joint: <float64>[MoE layers, domains, E] summed (domain, expert) counts.
      scalars: {name: <float64>[MoE layers]} means over the batches.
      traces: the steps' traces (see `make_eval_step`) as numpy [N, L, ...],
        the batches' global rows one after the other (with `trace`; else {}).
    """
    total = count = 0.0
    loads = joint = 0.0
    scalars: dict[str, Any] = {}
    traces: list[dict[int, dict[str, Any]]] = []
    for batch in batches:
      b_total, b_count, b_loads, b_joint, b_scalars, b_traces = self.step(params, batch)
      traces.append(jax.tree.map(np.asarray, b_traces))
      total += float(b_total)
      count += float(b_count)
      loads = loads + np.asarray(b_loads, np.float64)
      joint = joint + np.asarray(b_joint, np.float64)
      for name, value in b_scalars.items():
        scalars[name] = scalars.get(name, 0.0) + np.asarray(value, np.float64)
    n = max(len(batches), 1)
    return {"loss": total / max(count, 1.0), "expert_load": np.asarray(loads) / n,
            "joint": np.asarray(joint), "scalars": {k: v / n for k, v in scalars.items()},
            "traces": (jax.tree.map(lambda *rows: np.concatenate(rows), *traces)
                       if traces else {})}


def layer_report(result: dict[str, Any], moe_layers: list[int],
                 prefix: str = "eval") -> dict[str, float]:
  """`{prefix}/loss` and per MoE layer i `{prefix}/layer{i}/<name>`:
  max_violation and dead_experts (from the mean load), every router scalar,
  expert_domain_mi (bits) with domain labels; and `{prefix}/<name>`, the mean
  over the MoE layers of each."""
  out = {f"{prefix}/loss": float(result["loss"])}
  loads = result["expert_load"]
  if not moe_layers or not np.size(loads):
    return out
  joint = result["joint"]
  per_layer: dict[str, list[float]] = {}
  for index, layer in enumerate(moe_layers):
    values = {"max_violation": float(routing_report.max_violation(loads[index])),
              "dead_experts": float(routing_report.dead_experts(loads[index]))}
    for name, value in result["scalars"].items():
      if np.isfinite(value[index]):
        values[name] = float(value[index])
    if np.ndim(joint) == 3 and joint.shape[1] > 0:
      values["expert_domain_mi"] = routing_report.mutual_information_bits(joint[index])
    for name, value in values.items():
      out[f"{prefix}/layer{layer}/{name}"] = value
      per_layer.setdefault(name, []).append(value)
  out.update({f"{prefix}/{name}": float(np.mean(v)) for name, v in per_layer.items()})
  return out


def eval_config(config: ml_collections.ConfigDict, *, eval_capacity_factor=None,
                dropless: bool = False, group_by: Optional[str] = None,
                dtype: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config with the evaluation's routing settings; ValueError names a bad one.

  eval_capacity_factor: every MoE layer evaluates with capacity factor F;
  dropless: no capacity (token-choice routers, the dropless dispatcher);
  group_by: the routing groups of the evaluation (group_size as the group_by
  implies); dtype: the compute dtype (`model.dtype`). Parameters are
  unchanged by all of them."""
  config = ml_collections.ConfigDict(config.to_dict())
  moe = config.model.moe
  if dropless and eval_capacity_factor is not None:
    raise ValueError("give either --eval_capacity_factor or --dropless, not both")
  if dropless:
    moe.capacity_factor = 0.0
    moe.eval_capacity_factor = None
    moe.dispatch = "dropless"
  elif eval_capacity_factor is not None:
    if not np.isfinite(eval_capacity_factor) or eval_capacity_factor <= 0:
      raise ValueError(f"--eval_capacity_factor={eval_capacity_factor} must be > 0 "
                       f"(use --dropless for no capacity)")
    moe.eval_capacity_factor = float(eval_capacity_factor)
    if moe.dispatch == "dropless":  # a capacity needs a capacity dispatcher
      moe.dispatch = "auto"
  if group_by is not None:
    moe.group_by = group_by
    moe.group_size = None
  if dtype is not None:
    config.model.dtype = dtype
  try:
    config_lib.validate_config(config)
  except ValueError as e:
    raise ValueError(f"these evaluation settings do not apply to this run: {e}") from None
  return config
