"""The MoE feed-forward layer: router module -> `Routing` -> dispatcher ->
experts -> combine, plus always-active shared experts.

Its options are one `routing.MoEConfig` (the keys of `config.model.moe`):
`MoELayer(d_model=..., rngs=..., **config.model.moe)` or
`MoELayer(d_model=..., rngs=..., moe=MoEConfig(...))` builds the layer a
config describes. The router is whatever `routing.ROUTERS[cfg.router]` is;
this file never branches on router names. Letters: B batch, L sequence, G
groups, S tokens per group, E experts, K choices per token, D model width.

`routed_forward` below is the core of the routed part (route, dispatch,
experts, combine); under an ambient mesh that splits the batch, the experts
or their hidden units, `moejax.parallel.expert_parallel.shard_routed` runs
the same function per device in `jax.shard_map` with the same outputs,
losses and metrics as on one device.
"""

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from moejax import dispatch as dispatch_lib
from moejax import routing as routing_lib
from moejax.nn.attention import explicit_spec
from moejax.nn.experts import MLP, DropoutExperts, Experts, _hidden_activation
from moejax.parallel import expert_parallel
from moejax.routing import MoEConfig, RouteContext


# What a trace records of each token in each MoE layer (`Routing.token_choices`).
TRACE_FIELDS = ("experts", "weights", "kept")


def _positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def routing_aux(routing: routing_lib.Routing) -> dict[str, jax.Array]:
  """The router losses and metrics a layer reports (before weighting)."""
  aux = dict(routing.metrics)
  aux["aux_loss"] = routing.aux_loss
  aux["z_loss"] = routing.z_loss
  return aux


def routed_forward(groups: jax.Array, extras: dict[str, jax.Array], router,
                   make_experts: Callable, rng: Optional[jax.Array], *,
                   axis_name: Any = None, dispatcher: Callable, ctx: RouteContext,
                   dtype, expert_dropout: float, trace: bool = False):
  """route -> dispatch -> experts -> combine for one device's groups.

  Args:
    groups: <float>[G, S, D] tokens in routing groups.
    extras: per-token int/bool arrays [G, S] for the router (`token_ids`,
      `mask`, `sequence`, and `replay` [G, S, K]; absent keys are None in
      the context).
    router: the `routing.Router` module.
    make_experts: routing -> a `dispatch.base.Experts` (the layer's
      `nn.Experts`, or their expert-parallel wrapper sized for the routing).
    rng: key for router noise and expert dropout, or None.
    axis_name: mesh axes the groups are split over (under shard_map), or None.
    dispatcher: a `dispatch.DISPATCHERS` function.
    ctx: the `RouteContext` without the per-token fields and rng.
    dtype: expert compute dtype.
    expert_dropout: dropout rate on the experts' hidden units in training.
    trace: also return each token's choices (`Routing.token_choices`).

  Returns:
    y <dtype>[G, S, D] and the router's `routing_aux`, with the per-token
    "per_token": {"first_expert": <int32>[G, S], and with `trace`
    "experts", "weights", "kept": [G, S, K']}.
  """
  # The router gets the layer's key as is (its noise is what it was before
  # expert dropout existed); dropout draws from a key folded from it.
  dropout_rng = None
  if rng is not None and expert_dropout > 0:
    dropout_rng = jax.random.fold_in(rng, 1)
  ctx = ctx._replace(rng=rng, token_ids=extras.get("token_ids"),
                     mask=extras.get("mask"), sequence=extras.get("sequence"),
                     replay=extras.get("replay"), axis_name=axis_name)
  routing = router(groups, ctx)
  experts = make_experts(routing)
  if expert_dropout > 0 and not ctx.deterministic:
    if dropout_rng is None:
      raise ValueError("rng is required for expert_dropout when deterministic=False")
    experts = DropoutExperts(experts, expert_dropout, dropout_rng)
  y = dispatcher(groups.astype(dtype), routing, experts)
  aux = routing_aux(routing)
  aux["per_token"] = {"first_expert": routing.first_expert()}
  if trace:
    aux["per_token"].update(zip(TRACE_FIELDS, routing.token_choices()))
  return y, aux


def _reshape(a: jax.Array, shape: tuple[int, ...], axes, dim: int = 0) -> jax.Array:
  """`a.reshape(shape)`; on an Explicit mesh laid out with dimension `dim`
  split over the mesh axes `axes` (a PartitionSpec entry: None, a name or a
  tuple of names) and the others replicated, which the sharding-in-types rules
  cannot infer for a reshape that merges or splits a split dimension."""
  if explicit_spec(a) is None:
    return a.reshape(shape)
  if isinstance(axes, (list, tuple)):
    axes = None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
  entries = [None] * len(shape)
  entries[dim] = axes
  return a.reshape(shape, out_sharding=PartitionSpec(*entries))


def _axis_devices(axes) -> int:
  """Devices of a PartitionSpec entry on the ambient mesh (1 for None)."""
  if not axes:
    return 1
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[name] for name in names)


def _whole_chunks(chunks: int, axes) -> bool:
  """Whether `chunks` blocks of rows split evenly over the devices of `axes`."""
  return chunks % _axis_devices(axes) == 0


def _split_rows(a: jax.Array, chunks: int) -> jax.Array:
  """[B, ...] -> [chunks, B / chunks, ...], on an Explicit mesh keeping the
  rows' split on the chunks where each device holds whole chunks (local),
  else on the rows within a chunk."""
  shape = (chunks, a.shape[0] // chunks) + a.shape[1:]
  spec = explicit_spec(a)
  if spec is None:
    return a.reshape(shape)
  return _reshape(a, shape, spec[0], dim=0 if _whole_chunks(chunks, spec[0]) else 1)


class MoELayer(nnx.Module):
  """Mixture-of-Experts FFN (or the dense FFN baseline with router="dense").

  Args:
    d_model: D.
    moe: a `routing.MoEConfig`, or None to build one from `**options`.
    tokens_per_group: S, when known at build time (routers with per-slot
      parameters, Soft MoE, need it; `TransformerLM` passes it).
    dtype: compute dtype of the experts; the router is always float32.
    rngs: parameter initialization.
    vocab_size: V, for routers with per-id state (`Router.uses_vocab`: the
      balanced hash table); `TransformerLM` passes it.
    **options: `MoEConfig` fields (see its docstring for each).
  """

  def __init__(self, *, d_model: int, moe: Optional[MoEConfig] = None,
               tokens_per_group: Optional[int] = None, dtype=jnp.float32,
               rngs: nnx.Rngs, vocab_size: Optional[int] = None, **options):
    if moe is None:
      moe = MoEConfig.from_mapping(options)
    elif options:
      raise ValueError(f"MoELayer: pass either moe= or options, not both ({sorted(options)})")
    _positive_int("d_model", d_model)
    routing_lib.validate(moe)
    _hidden_activation(moe.activation)  # validates the name
    router_cls = routing_lib.get_router(moe.router)
    self.cfg = moe
    self.d_model = d_model
    self.dtype = dtype
    self.routed = router_cls.routed
    self.num_experts = moe.experts
    self.top_k = moe.k
    self.expert_hidden = moe.hidden
    self.aux_loss_weight = moe.aux_loss_weight
    self.z_loss_weight = moe.z_loss_weight

    if not self.routed:
      # The baseline: one FFN with the active hidden width of top_k experts.
      self.ffn = MLP(d_model=d_model, hidden=moe.top_k * moe.expert_hidden,
                     activation=moe.activation, dtype=dtype, rngs=rngs,
                     swiglu_limit=moe.swiglu_limit)
    else:
      self._dispatcher = dispatch_lib.get_dispatcher(routing_lib.resolve_dispatch(moe),
                                                     grouped_matmul=moe.grouped_matmul)
      expert_parallel.resolve_exchange(moe.dropless_exchange)  # validates the name
      for name, factor in (("capacity_factor", moe.capacity_factor),
                           ("eval_capacity_factor", moe.eval_capacity_factor)):
        if (routing_lib.resolve_dispatch(moe) == "dropless" and factor is not None
            and not routing_lib.is_dropless(factor)):
          raise ValueError(f"dispatch='dropless' has no capacity; set {name}=0 "
                           f"(got {name}={factor})")
      extra = {"vocab_size": vocab_size} if router_cls.uses_vocab else {}
      self.router = router_cls(moe, d_model=d_model,
                               tokens_per_group=tokens_per_group or moe.group_size,
                               rngs=rngs, **extra)
      self.experts = Experts(num_experts=moe.experts, d_model=d_model, hidden=moe.hidden,
                             activation=moe.activation, dtype=dtype, rngs=rngs,
                             swiglu_limit=moe.swiglu_limit)
    self.shared = self.shared_gate = nnx.data(None)
    if moe.num_shared_experts:
      self.shared = MLP(d_model=d_model, hidden=moe.num_shared_experts * moe.hidden,
                        activation=moe.activation, dtype=dtype, rngs=rngs,
                        swiglu_limit=moe.swiglu_limit)
      if moe.shared_expert_gate:
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.shared_gate = nnx.Param(init(rngs.params(), (d_model, 1), jnp.float32))

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rng: Optional[jax.Array] = None, token_ids: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None, replay: Optional[jax.Array] = None,
               trace: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """Applies the layer.

    Args:
      x: [B, L, D] activations.
      deterministic: turns router noise and expert dropout off.
      rng: key for router noise and expert dropout (training).
      token_ids: <int>[B, L] the tokens at each position (routers that use
        them, e.g. hash).
      mask: <bool>[B, L] True at real positions; padding takes no expert
        capacity and counts in no router loss or metric. None = all real.
      replay: <int>[B, L, K] experts each token goes to instead of the
        router's choice, weighted by the router's scores there (a recorded
        trace, `moejax.trace`); routers with `replayable` only.
      trace: also return each token's choices as a trace records them.

    Returns:
      y: [B, L, D] in `dtype` (the layer output, without the residual).
      aux: `aux_loss`, `z_loss`, `weighted_loss` (scalars), the router
        metrics, and `first_expert` <int32>[B, L] (-1: no expert); with
        `trace`, "trace": {"experts", "weights", "kept": [B, L, K']} in rank
        order (`Routing.token_choices`).
    """
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x must be [B, L, {self.d_model}], got shape {x.shape}")
    batch, length, d_model = x.shape
    tokens = x.reshape(batch * length, d_model)
    if not self.routed:
      y = self.ffn(tokens)
      zero = jnp.zeros((), jnp.float32)
      aux = {"aux_loss": zero, "z_loss": zero, "weighted_loss": zero}
    else:
      y, aux = self._route_and_run(x, deterministic, rng, token_ids, mask, replay, trace)
    if self.shared is not None:
      shared = self.shared(tokens)
      if self.shared_gate is not None:  # Qwen2-MoE: sigmoid(x w) per token
        gate = jnp.dot(tokens.astype(self.dtype), self.shared_gate[...].astype(self.dtype))
        shared = jax.nn.sigmoid(gate.astype(jnp.float32)).astype(shared.dtype) * shared
      y = y + shared
    return y.reshape(batch, length, -1).astype(self.dtype), aux

  def _to_groups(self, a: jax.Array, group_size: int, axes) -> jax.Array:
    """[B, L, ...] -> [G, S, ...] in this layer's grouping.

    group_by="batch" groups S = group_size sequences at one position, ordered
    (chunk of S sequences, position): [B, L] -> [B/S, S, L] -> [B/S, L, S].

    On an Explicit mesh the groups are laid out split over the mesh axes
    `axes` (`expert_parallel.routing_group_axes`): where each device's batch
    rows hold whole groups the reshape is local (group_by="sequence" with S
    dividing its tokens; group_by="batch" with its rows holding whole chunks,
    i.e. S dividing the per-device batch). Otherwise (a group of the tokens
    at one position across devices, or groups repeated on some devices) XLA
    moves the tokens: one transpose of the batch.
    """
    if self.cfg.group_by == "batch":
      a = jnp.swapaxes(_split_rows(a, a.shape[0] // group_size), 1, 2)
      return _reshape(a, (-1, group_size) + a.shape[3:], axes)
    return _reshape(a, (-1, group_size) + a.shape[2:], axes)

  def group_size(self, batch: int, length: int) -> int:
    """S for a [B, L] batch (`group_size`, or a sequence / a position)."""
    cfg = self.cfg
    if cfg.group_by == "batch":
      group_size = cfg.group_size or batch
      if batch % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch size "
                         f"{batch} (group_by='batch' groups tokens at one position)")
    else:
      group_size = cfg.group_size or length
      if batch * length % group_size:
        raise ValueError(f"group_size={group_size} does not divide the "
                         f"{batch * length} tokens of the batch")
    return group_size

  def _route_and_run(self, x, deterministic, rng, token_ids, mask, replay, trace):
    """[B, L, D] -> ([B*L, D] in the order of x, aux)."""
    cfg = self.cfg
    batch, length, _ = x.shape
    group_size = self.group_size(batch, length)
    mesh = expert_parallel.parallel_mesh()
    # Inference may repeat groups too few to split (one decoding step's);
    # training refuses that (see `routing_group_axes`).
    axes = () if mesh is None else expert_parallel.routing_group_axes(
        mesh, batch * length // group_size, replicate=deterministic)
    groups = self._to_groups(x, group_size, axes)
    sequence = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, length))
    extras = {"sequence": sequence}
    if mask is not None:
      extras["mask"] = mask.astype(bool)
    if token_ids is not None and routing_lib.get_router(cfg.router).uses_token_ids:
      extras["token_ids"] = token_ids.astype(jnp.int32)
    if replay is not None:
      if not self.router.replayable:
        raise ValueError(f"router={cfg.router!r} cannot replay recorded routing (a "
                         f"trace); the token-choice routers can")
      if replay.shape != (batch, length, cfg.k):
        raise ValueError(f"replay must be <int>[B, L, K] = {[batch, length, cfg.k]}, "
                         f"got {list(replay.shape)}")
      extras["replay"] = replay.astype(jnp.int32)
    extras = {name: self._to_groups(value, group_size, axes)
              for name, value in extras.items()}
    capacity_factor = cfg.capacity_factor
    if deterministic and cfg.eval_capacity_factor is not None:
      capacity_factor = cfg.eval_capacity_factor
    ctx = RouteContext(capacity_factor=capacity_factor, deterministic=deterministic,
                       num_sequences=batch)
    y, aux = expert_parallel.shard_routed(
        routed_forward, groups, extras, self.router, self.experts, rng,
        mesh=mesh, dropless_exchange=cfg.dropless_exchange, group_axes=axes,
        dispatcher=self._dispatcher, ctx=ctx, dtype=self.dtype,
        expert_dropout=cfg.expert_dropout, trace=trace)
    aux["weighted_loss"] = (self.aux_loss_weight * aux["aux_loss"]
                            + self.z_loss_weight * aux["z_loss"])
    # Small per-token arrays, on every device (readable by every process).
    per_token = {name: self._from_groups(value, batch, length, ())
                 for name, value in aux.pop("per_token").items()}
    aux["first_expert"] = per_token.pop("first_expert")
    if trace:
      aux["trace"] = per_token
    spec = explicit_spec(x)
    y = self._from_groups(y, batch, length, None if spec is None else spec[0])
    return y.reshape(batch * length, -1), aux

  def _from_groups(self, a: jax.Array, batch: int, length: int, batch_axes):
    """[G, S, ...] -> [B, L, ...], on an Explicit mesh with B split over
    `batch_axes` (a PartitionSpec entry: the layout of the layer's input)."""
    if self.cfg.group_by == "batch":
      chunks, group_size = batch // a.shape[1], a.shape[1]
      dim = 0 if _whole_chunks(chunks, batch_axes) else 2
      a = _reshape(a, (chunks, length, group_size) + a.shape[2:], batch_axes, dim=dim)
      a = jnp.swapaxes(a, 1, 2)  # [B/S, S, L, ...]
      return _reshape(a, (batch, length) + a.shape[3:], batch_axes)
    return _reshape(a, (batch, length) + a.shape[2:], batch_axes)

  def after_step(self, aux: dict[str, jax.Array]) -> None:
    """The router's update outside the optimizer (see `Router.after_step`)."""
    if self.routed:
      self.router.after_step(aux)
