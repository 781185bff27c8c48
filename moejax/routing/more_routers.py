"""Routers that do not route from logits x W: Soft MoE and Hash layers.

Each is one module plus one registry entry (`routing.routers` has the
contract); neither needed a change outside the routing package.

Letters: G groups, S tokens per group, E experts, P slots per expert, K
choices per token, D model width.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.routing import capacity as capacity_lib
from moejax.routing import hashing
from moejax.routing import metrics as metrics_lib
from moejax.routing import soft_moe
from moejax.routing.config import MoEConfig
from moejax.routing.routers import (RouteContext, Router, RouterState, TokenChoiceRouter,
                                    register_router)
from moejax.routing.token_choice import token_choice
from moejax.routing.types import Routing


class SoftMoERouter(Router):
  """Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of
  Experts"): each of the E*P slots is a softmax-over-tokens average of the
  group's tokens, and each token a softmax-over-slots average of the slot
  outputs. Tokens and the slot parameters Phi <float32>[D, E, P] are
  L2-normalized and the logits multiplied by a learned scale (§2.3). No
  token is dropped and there is no balancing loss.

  P = max(min_capacity, ceil(capacity_factor * S / E)) (`soft_moe_slots`),
  so capacity_factor = K gives the expert FLOPs of top-K routing. P is fixed
  when the layer is built, from the tokens per routing group.

  A slot mixes every token of its group, so over a sequence a token's output
  depends on later tokens; with group_by="batch" a group holds the tokens at
  one position and routing is causal in time.
  """

  scoring = "L2-normalized x . Phi, softmax over tokens (dispatch) and slots (combine)"
  dispatchers = ("einsum",)

  def __init__(self, cfg: MoEConfig, *, d_model: int,
               tokens_per_group: Optional[int] = None, rngs: nnx.Rngs):
    super().__init__(cfg, d_model=d_model, tokens_per_group=tokens_per_group, rngs=rngs)
    if tokens_per_group is None:
      raise ValueError("router='soft_moe' sizes its slots from the tokens per routing "
                       "group: set group_size (or build the model with tokens_per_group)")
    self.tokens_per_group = tokens_per_group
    self.slots = self.capacity(cfg, tokens_per_group, cfg.capacity_factor)
    init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    self.slot_params = nnx.Param(
        init(rngs.params(), (d_model, cfg.experts, self.slots), jnp.float32))
    self.scale = nnx.Param(jnp.ones((), jnp.float32))

  @classmethod
  def validate(cls, cfg: MoEConfig) -> None:
    if capacity_lib.is_dropless(cfg.capacity_factor):
      raise ValueError("router='soft_moe' needs capacity_factor > 0 (it sets the slots "
                       "per expert)")
    if cfg.eval_capacity_factor not in (None, cfg.capacity_factor):
      raise ValueError("router='soft_moe' has a fixed number of slots (parameters): "
                       "eval_capacity_factor must be None")
    for name in ("bias_update_rate", "noise_std", "jitter"):
      if getattr(cfg, name):
        raise ValueError(f"router='soft_moe' has no {name} (no discrete selection)")

  @classmethod
  def capacity(cls, cfg, num_tokens, capacity_factor):
    return soft_moe.soft_moe_slots(num_tokens, cfg.experts, capacity_factor,
                                   cfg.min_capacity)

  @classmethod
  def experts_per_token(cls, cfg):
    return float(cfg.capacity_factor)

  @classmethod
  def router_params(cls, cfg, d_model, tokens_per_group=None):
    if tokens_per_group is None:
      raise ValueError("router='soft_moe' parameter count needs tokens_per_group")
    return d_model * cfg.experts * cls.capacity(cfg, tokens_per_group,
                                                cfg.capacity_factor) + 1

  @classmethod
  def noncausal_reason(cls, cfg, tokens_per_group=None):
    if cfg.group_by == "batch":
      return None
    return ("router='soft_moe' with group_by='sequence': every slot is a weighted "
            "average of all the tokens of the group, later ones included")

  def __call__(self, x: jax.Array, ctx: RouteContext) -> Routing:
    num_groups, num_tokens, _ = x.shape
    if num_tokens != self.tokens_per_group:
      raise ValueError(f"router='soft_moe' was built for groups of {self.tokens_per_group} "
                       f"tokens (its slots are parameters), got {num_tokens}")
    dispatch, combine = soft_moe.soft_moe_weights(
        x.astype(jnp.float32), self.slot_params[...], self.scale[...], ctx.mask)
    shape = (num_groups, num_tokens, self.cfg.experts, self.slots)
    # Expert load: the share of the (real) tokens' combine mass on each expert.
    per_expert = jnp.sum(combine, axis=(0, 1, 3))
    load = per_expert / jnp.maximum(jnp.sum(per_expert), 1e-30)
    token_slots = combine.reshape(num_groups, num_tokens, -1)
    metrics = {
        "expert_load": load,
        "load_max_over_mean": jnp.max(load) * load.shape[0],
        "dropped_fraction": jnp.zeros((), jnp.float32),
        "router_entropy": metrics_lib.router_entropy(token_slots, ctx.mask),
    }
    zero = jnp.zeros((), jnp.float32)
    return Routing(token=None, expert=None, slot=None, weight=None, aux_loss=zero,
                   z_loss=zero, metrics=jax.lax.stop_gradient(metrics),
                   num_tokens=num_tokens, num_experts=self.cfg.experts,
                   capacity=self.slots, choices_per_token=None,
                   dispatch=dispatch.reshape(shape), combine=combine.reshape(shape))


class HashRouter(TokenChoiceRouter):
  """Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models"):
  a fixed random map token id -> K distinct experts (`hashing.hash_experts`),
  learned nothing, weight 1/K per expert. The token ids reach every MoE layer
  (`RouteContext.token_ids`); capacity and drops as for top-K token choice.

  With `hash_gate` (DeepSeek-V4's hash layers, `config.model.first_hash_layers`)
  the layer also has a learned router kernel whose scores (`score_fn`) weigh
  the hashed experts, renormalized and scaled as the token-choice router's.
  """

  scoring = "fixed hash of the token id (hash_gate: weighted by x W's scores)"
  uses_token_ids = True
  uses_vocab = True
  uses_bias = False

  def __init__(self, cfg: MoEConfig, *, d_model: int,
               tokens_per_group: Optional[int] = None, rngs: nnx.Rngs,
               vocab_size: Optional[int] = None):
    if cfg.hash_gate:
      super().__init__(cfg, d_model=d_model, tokens_per_group=tokens_per_group, rngs=rngs)
    else:
      Router.__init__(self, cfg, d_model=d_model, tokens_per_group=tokens_per_group,
                      rngs=rngs)
    self.table = nnx.data(None)
    if cfg.hash_table == "balanced":
      if not vocab_size:
        raise ValueError("hash_table='balanced' needs the vocabulary size (the model "
                         "passes it)")
      # The random map until `fill_table` (a run's start) balances it.
      self.table = RouterState(hashing.hash_experts(
          jnp.arange(vocab_size, dtype=jnp.int32), cfg.experts, cfg.k, cfg.hash_seed))

  def fill_table(self, counts) -> None:
    """Sets the balanced table from the training data's id counts <int>[V]
    (`hashing.balanced_table`); a stacked (scanned) table gets it in every unit."""
    table = jnp.asarray(hashing.balanced_table(counts, self.cfg.experts, self.cfg.k,
                                               self.cfg.hash_seed))
    current = self.table[...]
    self.table[...] = jnp.broadcast_to(table, current.shape).astype(current.dtype)

  @classmethod
  def validate(cls, cfg: MoEConfig) -> None:
    super().validate(cfg)
    for name in ("batch_prioritized", "noise_std", "jitter", "bias_update_rate"):
      if getattr(cfg, name):
        raise ValueError(f"router='hash' selects by token id: {name} does not apply")
    if cfg.num_groups > 1:
      raise ValueError("router='hash' selects by token id: num_groups does not apply")

  @classmethod
  def router_params(cls, cfg, d_model, tokens_per_group=None):
    if cfg.hash_gate:
      return super().router_params(cfg, d_model, tokens_per_group)
    return 0

  def _experts(self, ctx: RouteContext) -> jax.Array:
    """<int32>[G, S, K]: the replayed experts, else the token ids' hash."""
    if ctx.replay is not None:
      return ctx.replay.astype(jnp.int32)
    if ctx.token_ids is None:
      raise ValueError("router='hash' needs the token ids (RouteContext.token_ids)")
    if self.table is not None:
      return jnp.take(self.table[...], ctx.token_ids, axis=0)
    return hashing.hash_experts(ctx.token_ids, self.cfg.experts, self.cfg.k,
                                self.cfg.hash_seed)

  @classmethod
  def route_logits(cls, logits, cfg, ctx, bias=None):
    # hash_gate: the hashed experts (in ctx.replay, see __call__) weighted by
    # the scores, through the token-choice router's own path.
    return TokenChoiceRouter.route_logits(logits, cfg, ctx, bias)

  def __call__(self, x: jax.Array, ctx: RouteContext) -> Routing:
    experts = self._experts(ctx)
    if self.cfg.hash_gate:
      return super().__call__(x, ctx._replace(replay=experts))
    cfg = self.cfg
    num_groups, num_tokens, _ = x.shape
    weights = jnp.full(experts.shape, cfg.routed_scaling_factor / cfg.k, jnp.float32)
    priority = jnp.zeros((num_groups, num_tokens), jnp.float32)
    return token_choice(experts, weights, priority, num_experts=cfg.experts,
                        capacity=self.capacity(cfg, num_tokens, ctx.capacity_factor),
                        batch_prioritized=False, mask=ctx.mask)

  def after_step(self, aux):
    del aux


register_router("soft_moe", SoftMoERouter)
register_router("hash", HashRouter)
