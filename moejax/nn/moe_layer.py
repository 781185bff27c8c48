"""The MoE feed-forward layer: router -> `route` -> dispatcher -> experts ->
combine, plus always-active shared experts.

Its keyword arguments are the keys of `config.model.moe`, so
`MoELayer(d_model=..., rngs=..., **config.model.moe)` builds the layer a
config describes. Letters: B batch, L sequence, G groups, S tokens per group,
E experts, K choices per token, D model width, H expert hidden width.

Under an ambient mesh (`moejax.parallel.activate`) that splits the batch, the
experts or their hidden units, the routed part runs expert parallel in
`jax.shard_map` (`moejax.parallel.expert_parallel`) with the same outputs,
losses and metrics as on one device.
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import dispatch as dispatch_lib
from moejax import routing as routing_lib
from moejax.nn.experts import MLP, Experts, _hidden_activation
from moejax.parallel import expert_parallel

# Options forwarded to `routing.route` (besides top_k and capacity_factor).
ROUTER_OPTIONS = ("batch_prioritized", "renormalize", "jitter", "noise_std",
                  "min_capacity")
DENSE = "dense"
# How tokens form routing groups (see `MoELayer`, `group_by`).
GROUP_BY = ("sequence", "batch")


def _positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


class MoELayer(nnx.Module):
  """Mixture-of-Experts FFN (or the dense FFN baseline with router="dense").

  Args:
    d_model: D.
    num_experts: routed experts before `granularity`.
    top_k: experts per token before `granularity`.
    expert_hidden: H of one expert before `granularity`.
    router: "dense" or a name in `routing.ROUTERS`.
    capacity_factor: see `routing.route`; 0 = dropless.
    eval_capacity_factor: the capacity factor when `deterministic=True`
      (evaluation); None = `capacity_factor`. V-MoE (Riquelme et al. 2021,
      §4.1) and Switch (Fedus et al. 2021, Table 1) evaluate at other factors
      than they train with.
    group_size: tokens per routing group; default one group per sequence
      (group_by="sequence") or one group per position (group_by="batch").
    group_by: "sequence": a group is group_size consecutive tokens of the
      flattened [B*L] batch. "batch": the batch is transposed to [L, B] first,
      so a group holds tokens at one position of different sequences
      (group_size must then divide B). Routers whose decision for a token
      depends on the rest of its group (expert choice, batch-prioritized
      token choice, top-k's later choices under a capacity) then see no later
      position: routing is causal in time, as a decoder needs (Wang et al.
      2024, "Auxiliary-Loss-Free Load Balancing", §5.2).
    dispatch: a name in `dispatch.DISPATCHERS`.
    dropless_exchange: how dropless rows cross the `expert` mesh axis under
      expert parallelism: "auto" (`jax.lax.ragged_all_to_all` on GPU/TPU, a
      padded all_to_all on CPU), "ragged", "padded" or "ragged_reference"
      (the ragged bookkeeping on an all_gather emulation, for CPU checks);
      see `parallel.expert_parallel`. Unused on one device.
    activation: "gelu" or "swiglu".
    num_shared_experts: always-active experts of hidden expert_hidden /
      granularity each (DeepSeekMoE, Dai et al. 2024, §3.2).
    granularity: G_f; each expert becomes G_f experts of hidden
      expert_hidden / G_f and num_experts, top_k are multiplied by G_f
      (fine-grained MoE, Krajewski et al. 2024), so active parameters stay fixed.
    aux_loss_weight, z_loss_weight: weights of the router losses in
      `aux["weighted_loss"]`.
    dtype: compute dtype of the experts; the router is always float32.
    rngs: parameter initialization.
    **router_options: `batch_prioritized`, `renormalize`, `jitter`, `noise_std`,
      `min_capacity` (see `routing.route`).
  """

  def __init__(self, *, d_model: int, num_experts: int, top_k: int, expert_hidden: int,
               router: str = "topk", capacity_factor: float = 1.25,
               eval_capacity_factor: Optional[float] = None,
               group_size: Optional[int] = None, group_by: str = "sequence",
               dispatch: str = "gather", dropless_exchange: str = "auto",
               activation: str = "gelu", num_shared_experts: int = 0,
               granularity: int = 1, aux_loss_weight: float = 1e-2,
               z_loss_weight: float = 1e-3, dtype=jnp.float32, rngs: nnx.Rngs,
               **router_options):
    unknown = sorted(set(router_options) - set(ROUTER_OPTIONS))
    if unknown:
      raise ValueError(f"unknown MoELayer option(s) {unknown}; valid router options: "
                       f"{list(ROUTER_OPTIONS)}")
    for name, value in (("d_model", d_model), ("num_experts", num_experts),
                        ("top_k", top_k), ("expert_hidden", expert_hidden),
                        ("granularity", granularity)):
      _positive_int(name, value)
    if group_size is not None:
      _positive_int("group_size", group_size)
    if group_by not in GROUP_BY:
      raise ValueError(f"unknown group_by {group_by!r}; valid values: {list(GROUP_BY)}")
    if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) \
        or num_shared_experts < 0:
      raise ValueError(f"num_shared_experts must be an integer >= 0, got {num_shared_experts!r}")
    if expert_hidden % granularity:
      raise ValueError(f"expert_hidden={expert_hidden} is not divisible by "
                       f"granularity={granularity}")
    if router != DENSE and router not in routing_lib.ROUTERS:
      raise ValueError(f"unknown router {router!r}; valid routers: "
                       f"{sorted(routing_lib.ROUTERS) + [DENSE]}")
    _hidden_activation(activation)  # validates the name
    dispatcher = dispatch_lib.get_dispatcher(dispatch)
    expert_parallel.resolve_exchange(dropless_exchange)  # validates the name

    self.router = router
    self.d_model = d_model
    self.num_experts = num_experts * granularity
    self.top_k = top_k * granularity
    self.expert_hidden = expert_hidden // granularity
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.group_size = group_size
    self.group_by = group_by
    self.dispatch = dispatch
    self.dropless_exchange = dropless_exchange
    self.aux_loss_weight = aux_loss_weight
    self.z_loss_weight = z_loss_weight
    self.router_options = dict(router_options)
    self.dtype = dtype
    self._dispatcher = dispatcher

    if router == DENSE:
      # The baseline: one FFN with the active hidden width of top_k experts.
      self.ffn = MLP(d_model=d_model, hidden=top_k * expert_hidden,
                     activation=activation, dtype=dtype, rngs=rngs)
    else:
      if router == "switch" and granularity > 1:
        raise ValueError(f"router='switch' is top-1 but granularity={granularity} "
                         "multiplies top_k; use router='topk'")
      options = routing_lib.RouterOptions(
          top_k=self.top_k, capacity_factor=capacity_factor,
          min_capacity=router_options.get("min_capacity", 1),
          batch_prioritized=router_options.get("batch_prioritized", False),
          renormalize=router_options.get("renormalize"))
      routing_lib.validate_router_options(router, self.num_experts, options)
      if eval_capacity_factor is not None:
        try:
          routing_lib.validate_router_options(
              router, self.num_experts, dataclasses.replace(options, capacity_factor=eval_capacity_factor))
        except ValueError as e:
          raise ValueError(f"eval_capacity_factor: {e}") from e
      for name, factor in (("capacity_factor", capacity_factor),
                           ("eval_capacity_factor", eval_capacity_factor)):
        if dispatch == "dropless" and factor is not None and not routing_lib.is_dropless(factor):
          raise ValueError(f"dispatch='dropless' has no capacity; set {name}=0 "
                           f"(got {name}={factor})")
      # Switch Transformer initializes the router with a small scale (0.1).
      router_init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
      self.router_kernel = nnx.Param(
          router_init(rngs.params(), (d_model, self.num_experts), jnp.float32))
      self.experts = Experts(num_experts=self.num_experts, d_model=d_model,
                             hidden=self.expert_hidden, activation=activation,
                             dtype=dtype, rngs=rngs)
    self.shared = nnx.data(None)
    if num_shared_experts:
      self.shared = MLP(d_model=d_model, hidden=num_shared_experts * self.expert_hidden,
                        activation=activation, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, Any]]:
    """Applies the layer.

    Args:
      x: [B, L, D] activations.
      deterministic: turns router noise off.
      rng: key for router noise (needed only with jitter/noise_std in training).

    Returns:
      y: [B, L, D] in `dtype` (the layer output, without the residual).
      aux: `aux_loss`, `z_loss`, `weighted_loss` (scalars) and router metrics.
    """
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x must be [B, L, {self.d_model}], got shape {x.shape}")
    batch, length, d_model = x.shape
    tokens = x.reshape(batch * length, d_model)
    if self.router == DENSE:
      y = self.ffn(tokens)
      zero = jnp.zeros((), jnp.float32)
      aux = {"aux_loss": zero, "z_loss": zero, "weighted_loss": zero}
    else:
      y, aux = self._route_and_run(x, deterministic, rng)
    if self.shared is not None:
      y = y + self.shared(tokens)
    return y.reshape(batch, length, -1).astype(self.dtype), aux

  def _route_and_run(self, x: jax.Array, deterministic: bool,
                     rng: Optional[jax.Array]):
    """[B, L, D] -> ([B*L, D] in the order of x, aux)."""
    inputs = x
    batch, length, d_model = x.shape
    if self.group_by == "batch":
      # [L, B, D]: consecutive tokens share a position, so groups never mix positions.
      x = jnp.swapaxes(x, 0, 1)
      group_size = self.group_size or batch
      if batch % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch size "
                         f"{batch} (group_by='batch' groups tokens at one position)")
    else:
      group_size = self.group_size or length
      if batch * length % group_size:
        raise ValueError(f"group_size={group_size} does not divide the "
                         f"{batch * length} tokens of the batch")
    groups = x.reshape(-1, group_size, d_model)
    y, aux = expert_parallel.routed_forward(
        functools.partial(self._route, deterministic=deterministic), self._dispatcher,
        groups, self.router_kernel[...], self.experts, rng, dtype=self.dtype,
        mesh=expert_parallel.parallel_mesh(), dropless_exchange=self.dropless_exchange)
    aux["weighted_loss"] = (self.aux_loss_weight * aux["aux_loss"]
                            + self.z_loss_weight * aux["z_loss"])
    y = y.reshape(x.shape[:2] + (-1,))
    if self.group_by == "batch":
      y = expert_parallel.match_sharding(jnp.swapaxes(y, 0, 1), inputs)
    return y.reshape(batch * length, -1), aux

  def _route(self, groups: jax.Array, router_kernel: jax.Array,
             rng: Optional[jax.Array], *, deterministic: bool) -> routing_lib.Routing:
    """<float>[G, S, D] groups -> their `Routing` (float32 router).

    Runs once per device on its own groups under expert parallelism, so it
    reads the router kernel from its argument, not from `self`.
    """
    num_groups, group_size, d_model = groups.shape
    options = dict(self.router_options)
    jitter = options.pop("jitter", 0.0)
    jitter_rng = noise_rng = None
    if rng is not None:
      jitter_rng, noise_rng = jax.random.split(rng)
    router_input = groups.reshape(num_groups * group_size, d_model).astype(jnp.float32)
    if jitter and not deterministic:
      if rng is None:
        raise ValueError("rng is required for router jitter when deterministic=False")
      # Switch Transformer jitters the router input, not the logits.
      router_input = routing_lib.apply_jitter(router_input, jitter, jitter_rng)
    logits = jnp.dot(router_input, router_kernel)  # [G*S, E] float32
    logits = logits.reshape(num_groups, group_size, self.num_experts)
    capacity_factor = self.capacity_factor
    if deterministic and self.eval_capacity_factor is not None:
      capacity_factor = self.eval_capacity_factor
    return routing_lib.route(
        logits, router=self.router, top_k=self.top_k,
        capacity_factor=capacity_factor, rng=noise_rng,
        deterministic=deterministic, **options)
