"""Routers as modules, and their registry.

The contract (what replaces the 2021-22 `route(probs)` functions):

  * A router is a Flax NNX module (a subclass of `Router`) built from the
    typed `MoEConfig`. It owns its parameters (any pytree of `nnx.Param`) and
    any state updated outside the optimizer (`RouterState`, e.g. the
    balancing bias), and maps one call's routing groups <float32>[G, S, D]
    plus a `RouteContext` (token ids, padding mask, sequence ids, ...) to a
    `Routing`, whose losses and metrics it fills.
  * It declares, as class attributes and class methods of the config (so
    code that builds no model can ask), what other code used to branch on by
    name: `scoring`, `dispatchers` (the dispatch names it supports),
    `uses_token_ids`, `routed` (False only for the dense FFN baseline),
    `capacity(cfg, S, factor)` (its capacity rule), `experts_per_token(cfg)`
    and `router_params(cfg, D, S)` (for `moejax.scaling.accounting`),
    `noncausal_reason(cfg, S)` (why it lets a decoder token see later tokens
    under `cfg.group_by`, or None) and `validate(cfg)`.
  * `after_step(aux)` updates the router's state after an optimizer step
    from the layer's (globally averaged) routing metrics; the trainer calls
    it through `TransformerLM.after_step`.
  * It is registered once by name (`register_router`); nothing outside this
    package branches on router names. A router written outside moejax
    registers the same way and is then one `config.model.moe.router` flag.

Letters: G groups, S tokens per group, E experts, K choices per token, C
capacity (slots per expert per group), D model width.
"""

import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.routing import balancing
from moejax.routing import capacity as capacity_lib
from moejax.routing import losses
from moejax.routing import metrics as metrics_lib
from moejax.routing import scores as scores_lib
from moejax.routing.config import MoEConfig, validate_common
from moejax.routing.expert_choice import expert_choice
from moejax.routing.token_choice import token_choice
from moejax.routing.types import Routing

DISPATCH_AUTO = "auto"


class RouterState(nnx.Variable):
  """Router state updated outside the optimizer (saved in checkpoints with
  the parameters, never given to optax)."""


class RouteContext(NamedTuple):
  """What a router may use besides the group's activations.

  Attributes:
    capacity_factor: the factor of this call (training or evaluation).
    deterministic: no noise (evaluation).
    rng: PRNG key for noise, or None.
    token_ids: <int32>[G, S] token ids, or None.
    mask: <bool>[G, S] True for real tokens, or None (all real).
    sequence: <int32>[G, S] global index of each token's sequence, or None.
    num_sequences: number of sequences in the global batch (for `sequence`).
    axis_name: the mesh axes the groups are split over under shard_map
      (losses over the global batch all-reduce over them), or None.
    replay: <int32>[G, S, K] experts to route each token to instead of the
      router's own choice (a recorded trace, `moejax.trace`), weighted by the
      router's scores there; None = route. Routers with `replayable` only.
  """
  capacity_factor: float
  deterministic: bool = True
  rng: Optional[jax.Array] = None
  token_ids: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None
  sequence: Optional[jax.Array] = None
  num_sequences: Optional[int] = None
  axis_name: Any = None
  replay: Optional[jax.Array] = None


ROUTERS: dict[str, type["Router"]] = {}


def register_router(name: str, cls: type["Router"]) -> type["Router"]:
  """Registers a `Router` subclass under `name` (the value of
  `config.model.moe.router`). Returns `cls`, so it also works as
  `register_router("name", MyRouter)` after the class statement."""
  if not (isinstance(cls, type) and issubclass(cls, Router)):
    raise TypeError(f"register_router({name!r}, ...) needs a Router subclass, got {cls!r}")
  if name in ROUTERS:
    raise ValueError(f"router {name!r} is already registered")
  ROUTERS[name] = cls
  return cls


def get_router(name: str) -> type["Router"]:
  """The router class called `name`; ValueError listing the valid names."""
  if name not in ROUTERS:
    raise ValueError(f"unknown router {name!r}; valid routers: {sorted(ROUTERS)}")
  return ROUTERS[name]


def validate(cfg: MoEConfig) -> None:
  """All checks of a config: shared ones, then the router's own."""
  cls = get_router(cfg.router)
  validate_common(cfg)
  cls.validate(cfg)
  if (cfg.router_logit_bias or cfg.router_dtype != "float32") and (
      not issubclass(cls, LogitRouter) or (cls.uses_token_ids and not cfg.hash_gate)):
    raise ValueError(f"router_logit_bias and router_dtype apply to routers that select on "
                     f"learned logits; router={cfg.router!r} does not")
  if cfg.force_balance and (not issubclass(cls, TokenChoiceRouter) or cls.uses_token_ids):
    raise ValueError(f"force_balance applies to the learned token-choice routers "
                     f"({', '.join(learned_token_choice())}); router={cfg.router!r} "
                     f"assigns its own way (expert choice and Soft MoE are balanced by "
                     f"construction)")
  if cls.routed:
    dispatch = resolve_dispatch(cfg)
    if dispatch not in cls.dispatchers:
      raise ValueError(f"router={cfg.router!r} supports dispatch {list(cls.dispatchers)}, "
                       f"got dispatch={cfg.dispatch!r}")


def learned_token_choice() -> list[str]:
  """Registered routers that select top-K on learned scores (`force_balance`)."""
  return [name for name, cls in sorted(ROUTERS.items())
          if issubclass(cls, TokenChoiceRouter) and not cls.uses_token_ids]


def resolve_dispatch(cfg: MoEConfig) -> str:
  """`cfg.dispatch`, with "auto" = the router's first supported dispatcher."""
  if cfg.dispatch == DISPATCH_AUTO:
    return get_router(cfg.router).dispatchers[0]
  return cfg.dispatch


class Router(nnx.Module):
  """Base class of routers; see the module docstring for the contract."""

  routed: ClassVar[bool] = True
  scoring: ClassVar[str] = ""
  dispatchers: ClassVar[tuple[str, ...]] = ("gather", "einsum", "dropless")
  uses_token_ids: ClassVar[bool] = False
  replayable: ClassVar[bool] = False  # honours RouteContext.replay
  uses_vocab: ClassVar[bool] = False  # __init__ takes vocab_size=V

  def __init__(self, cfg: MoEConfig, *, d_model: int,
               tokens_per_group: Optional[int] = None, rngs: nnx.Rngs):
    del d_model, tokens_per_group, rngs
    self.cfg = cfg

  # -- declarations (class methods of the config) ---------------------------

  @classmethod
  def validate(cls, cfg: MoEConfig) -> None:
    """Raises ValueError naming the option if `cfg` is impossible for this router."""

  @classmethod
  def capacity(cls, cfg: MoEConfig, num_tokens: int, capacity_factor: float) -> int:
    """C, slots per expert for a group of `num_tokens` tokens."""
    raise NotImplementedError

  @classmethod
  def experts_per_token(cls, cfg: MoEConfig) -> float:
    """Experts a token is processed by (on average), for FLOP accounting."""
    raise NotImplementedError

  @classmethod
  def router_params(cls, cfg: MoEConfig, d_model: int,
                    tokens_per_group: Optional[int] = None) -> int:
    """Number of router parameters (for accounting)."""
    del tokens_per_group
    return d_model * cfg.experts + (cfg.experts if cfg.router_logit_bias else 0)

  @classmethod
  def noncausal_reason(cls, cfg: MoEConfig,
                       tokens_per_group: Optional[int] = None) -> Optional[str]:
    """Why a decoder token's output can depend on later tokens, or None."""
    del cfg, tokens_per_group
    return None

  # -- the module ------------------------------------------------------------

  def __call__(self, x: jax.Array, ctx: RouteContext) -> Routing:
    """<float32>[G, S, D] routing groups -> their `Routing`."""
    raise NotImplementedError

  def after_step(self, aux: dict[str, jax.Array]) -> None:
    """Updates state outside the optimizer after a training step (default: none)."""
    del aux


# ----------------------------------------------------------------------------
# Routers on logits x W: token choice (switch, topk, sinkhorn), expert choice.


def _balancing_loss(routing: Routing, selection_scores: jax.Array, choices: jax.Array,
                    cfg: MoEConfig, ctx: RouteContext) -> Routing:
  """Fills the balancing loss of cfg.aux_loss_type (`routing.balancing`)."""
  if cfg.aux_loss_type == "switch" and ctx.mask is None:
    # The historical path, kept bit for bit (balancing.switch_loss agrees).
    counts = jnp.sum(choices, axis=1)
    aux_loss = losses.load_balancing_loss(selection_scores, counts)
  else:
    aux_loss = balancing.balancing_loss(
        cfg.aux_loss_type, scores=selection_scores, choices=choices, mask=ctx.mask,
        sequence=ctx.sequence, num_sequences=ctx.num_sequences, top_k=cfg.k,
        axis_name=ctx.axis_name)
  return routing.replace(aux_loss=jnp.asarray(aux_loss, jnp.float32))


def z_loss(logits: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """ST-MoE's router z-loss over the real tokens (`losses.router_z_loss`)."""
  if mask is None:
    return losses.router_z_loss(logits)
  return balancing.masked_z_loss(logits, mask)


def logit_max(logits: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """<float32>[] largest |logit| over the (real) tokens of <float32>[G, S, E] logits."""
  magnitude = jnp.max(jnp.abs(jax.lax.stop_gradient(logits)), axis=-1)
  if mask is not None:
    magnitude = jnp.where(mask, magnitude, 0.0)
  return jnp.max(magnitude)


def _add_noise(logits: jax.Array, cfg: MoEConfig, ctx: RouteContext,
               jitter_logits: bool) -> jax.Array:
  if ctx.deterministic or (cfg.noise_std == 0 and not (jitter_logits and cfg.jitter > 0)):
    return logits
  if ctx.rng is None:
    raise ValueError("rng is required when jitter or noise_std > 0 and deterministic=False")
  jitter_rng, noise_rng = jax.random.split(ctx.rng)
  if jitter_logits and cfg.jitter > 0:
    logits = apply_jitter(logits, cfg.jitter, jitter_rng)
  if cfg.noise_std > 0:
    logits = logits + cfg.noise_std * jax.random.normal(noise_rng, logits.shape)
  return logits


def apply_jitter(values: jax.Array, jitter: float, rng: jax.Array) -> jax.Array:
  """Multiplicative jitter (Switch Transformer, §2.4 / Table 3): values *
  U(1 - jitter, 1 + jitter), elementwise. Switch applies it to the router input."""
  noise = jax.random.uniform(rng, values.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
  return values * noise.astype(values.dtype)


class LogitRouter(Router):
  """A router whose decisions come from logits x W, W <float32>[D, E].

  Subclasses implement `route_logits`, a class method, so that the pure
  `routing.route(logits, ...)` runs the same code as the module. With
  `bias_update_rate > 0` the module holds a `RouterState` bias <float32>[E]
  (auxiliary-loss-free balancing) that affects selection only.
  """

  uses_bias: ClassVar[bool] = False  # whether bias_update_rate may be > 0

  def __init__(self, cfg: MoEConfig, *, d_model: int,
               tokens_per_group: Optional[int] = None, rngs: nnx.Rngs):
    super().__init__(cfg, d_model=d_model, tokens_per_group=tokens_per_group, rngs=rngs)
    # Switch Transformer initializes the router with a small scale (0.1).
    init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
    self.kernel = nnx.Param(init(rngs.params(), (d_model, cfg.experts), jnp.float32))
    self.logit_bias = nnx.data(None)
    if cfg.router_logit_bias:
      self.logit_bias = nnx.Param(jnp.zeros((cfg.experts,), jnp.float32))
    self.bias = nnx.data(None)
    if cfg.bias_update_rate > 0 or cfg.quantile_balancing:
      self.bias = RouterState(jnp.zeros((cfg.experts,), jnp.float32))

  @classmethod
  def validate(cls, cfg: MoEConfig) -> None:
    if cfg.bias_update_rate > 0 and not cls.uses_bias:
      raise ValueError(f"bias_update_rate applies to token-choice routers; "
                       f"router={cfg.router!r} has no selection bias")
    if cfg.quantile_balancing and not cls.uses_bias:
      raise ValueError(f"quantile_balancing applies to the learned token-choice routers; "
                       f"router={cfg.router!r} selects its own way")

  @classmethod
  def route_logits(cls, logits: jax.Array, cfg: MoEConfig, ctx: RouteContext,
                   bias: Optional[jax.Array] = None) -> Routing:
    """<float32>[G, S, E] logits (noise already added) -> `Routing`."""
    raise NotImplementedError

  def __call__(self, x: jax.Array, ctx: RouteContext) -> Routing:
    cfg = self.cfg
    num_groups, group_size, d_model = x.shape
    router_input = x.reshape(num_groups * group_size, d_model).astype(jnp.float32)
    jitter_rng = rng = None
    if ctx.rng is not None:
      jitter_rng, rng = jax.random.split(ctx.rng)
    if not ctx.deterministic and cfg.jitter > 0:
      if ctx.rng is None:
        raise ValueError("rng is required for router jitter when deterministic=False")
      # Switch Transformer jitters the router input, not the logits.
      router_input = apply_jitter(router_input, cfg.jitter, jitter_rng)
    # In router_dtype (float32 by default), as a checkpoint's framework computes
    # them. The float32 kernel enters the dot as is, so that qwix (QLoRA of the
    # router, moejax.train.lora) finds its quantized weight there.
    dtype, kernel = jnp.dtype(cfg.router_dtype), self.kernel[...]
    if dtype != jnp.float32:
      router_input, kernel = router_input.astype(dtype), kernel.astype(dtype)
    logits = jnp.dot(router_input, kernel)
    if self.logit_bias is not None:
      logits = logits + self.logit_bias[...].astype(dtype)
    logits = logits.astype(jnp.float32).reshape(num_groups, group_size, -1)
    z_logits = logits
    logits = _add_noise(logits, cfg, ctx._replace(rng=rng), jitter_logits=False)
    bias = None if self.bias is None else self.bias[...]
    routing = self.route_logits(logits, cfg, ctx, bias)
    # The z-loss is taken on the logits before noise; so is their magnitude, the
    # quantity that grows before a router diverges (ST-MoE, §3).
    routing = routing.replace(z_loss=z_loss(z_logits, ctx.mask), metrics={
        **routing.metrics, "router_logit_max": logit_max(z_logits, ctx.mask)})
    if bias is not None:
      routing = routing.replace(metrics={**routing.metrics,
                                         "bias_norm": jnp.linalg.norm(bias)})
    return routing

  def after_step(self, aux: dict[str, jax.Array]) -> None:
    """Auxiliary-loss-free balancing (Wang et al. 2024, Algorithm 1):
    b_e <- b_e + u * sign(mean load - load_e), from the global batch's load
    (`expert_load`, averaged over devices and processes by the layer); or
    quantile balancing's beta <- ema beta + (1 - ema) quantile, re-centered
    (Megatron-Core `_update_router_qb_beta`)."""
    if self.bias is None:
      return
    if self.cfg.quantile_balancing:
      ema = self.cfg.quantile_balancing_ema
      beta = ema * self.bias[...] + (1.0 - ema) * jax.lax.stop_gradient(aux[QB_QUANTILE])
      self.bias[...] = beta - jnp.mean(beta)
      return
    load = jax.lax.stop_gradient(aux["expert_load"]).astype(jnp.float32)
    step = self.cfg.bias_update_rate * jnp.sign(jnp.mean(load) - load)
    self.bias[...] = self.bias[...] + step


def _choices(experts: jax.Array, num_experts: int) -> jax.Array:
  """<float32>[G, S, E] 1 where a token chose the expert (before drops)."""
  return jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=-2)


class TokenChoiceRouter(LogitRouter):
  """Top-K token choice (GShard / Switch), with every scoring of
  `routing.scores` (softmax, Mixtral's softmax over the top-K, DeepSeek-V3's
  sigmoid), a selection bias and group-limited routing."""

  scoring = "softmax/softmax_topk/sigmoid/sqrtsoftplus of x W (score_fn), top-K per token"
  uses_bias = True
  replayable = True

  @classmethod
  def validate(cls, cfg: MoEConfig) -> None:
    super().validate(cfg)
    if cfg.k > cfg.experts:
      raise ValueError(f"top_k={cfg.k} exceeds num_experts={cfg.experts}"
                       + (" (both times granularity)" if cfg.granularity > 1 else ""))
    if cfg.experts % cfg.num_groups:
      raise ValueError(f"num_groups={cfg.num_groups} does not divide num_experts="
                       f"{cfg.experts}")
    if cfg.top_groups > cfg.num_groups:
      raise ValueError(f"top_groups={cfg.top_groups} exceeds num_groups={cfg.num_groups}")
    eligible = cfg.top_groups * cfg.experts // cfg.num_groups
    if cfg.k > eligible:
      # The fewest experts, a multiple of num_groups, whose top_groups best
      # groups hold top_k experts (DeepSeek-V3's 8 groups, top 4, top-8: 16).
      needed = cfg.num_groups * -(-cfg.k // cfg.top_groups)
      experts = "num_experts * granularity" if cfg.granularity > 1 else "num_experts"
      raise ValueError(
          f"top_k={cfg.k} exceeds the {eligible} experts of the top_groups={cfg.top_groups} "
          f"best of num_groups={cfg.num_groups} groups: it needs {experts} >= {needed}, "
          "a multiple of num_groups")

  @classmethod
  def capacity(cls, cfg: MoEConfig, num_tokens: int, capacity_factor: float) -> int:
    return capacity_lib.token_choice_capacity(
        num_tokens=num_tokens, num_experts=cfg.experts, top_k=cfg.k,
        capacity_factor=capacity_factor, min_capacity=cfg.min_capacity,
        rounding=cfg.capacity_rounding)

  @classmethod
  def experts_per_token(cls, cfg: MoEConfig) -> float:
    return float(cfg.k)

  @classmethod
  def noncausal_reason(cls, cfg: MoEConfig,
                       tokens_per_group: Optional[int] = None) -> Optional[str]:
    if cfg.group_by == "batch" or capacity_lib.is_dropless(cfg.capacity_factor):
      return None
    if tokens_per_group is not None:
      if cls.capacity(cfg, tokens_per_group, cfg.capacity_factor) >= tokens_per_group:
        return None
    elif cfg.capacity_factor * cfg.k >= cfg.experts:
      return None  # a token picks an expert at most once, so C >= S means no drops
    if cfg.batch_prioritized:
      return ("batch_prioritized=True with group_by='sequence': slots are served by "
              "descending router score across the group, so whether a token is "
              "dropped depends on later tokens")
    if cfg.k > 1:
      return (f"router={cfg.router!r} with top_k*granularity={cfg.k} and finite capacity, "
              "group_by='sequence': every token's 1st choice is served before any "
              "token's 2nd choice, so whether a token's later choices are dropped "
              "depends on the 1st choices of later tokens")
    return None  # top-1, position priority: slots fill in position order

  @classmethod
  def select(cls, logits: jax.Array, cfg: MoEConfig, ctx: RouteContext,
             bias: Optional[jax.Array], experts: Optional[jax.Array] = None
             ) -> scores_lib.Selection:
    """The top-K of `cfg.score_fn`, or `experts` <int>[G, S, K] weighted by it."""
    del ctx
    return scores_lib.select_experts(
        logits, top_k=cfg.k, score_fn=cfg.score_fn, renormalize=cfg.renormalize_weights,
        bias=bias, num_groups=cfg.num_groups, top_groups=cfg.top_groups,
        routed_scaling_factor=cfg.routed_scaling_factor, experts=experts)

  @classmethod
  def route_logits(cls, logits, cfg, ctx, bias=None):
    num_tokens = logits.shape[1]
    quantile = None
    if cfg.quantile_balancing and ctx.replay is None:
      experts, quantile = quantile_selection(logits, bias, cfg.k, ctx)
      ctx = ctx._replace(replay=experts)
      bias = None  # beta selects; the weights are the unbiased scores
    if ctx.replay is not None:  # recorded experts, weighted by this router
      selection = TokenChoiceRouter.select(logits, cfg, ctx, bias, experts=ctx.replay)
    elif cfg.force_balance:
      selection = TokenChoiceRouter.select(logits, cfg, ctx, bias,
                                           experts=balanced_experts(logits.shape, cfg))
    else:
      selection = cls.select(logits, cfg, ctx, bias)
    routing = token_choice(
        selection.experts, selection.weights, selection.priority,
        num_experts=cfg.experts, capacity=cls.capacity(cfg, num_tokens, ctx.capacity_factor),
        batch_prioritized=cfg.batch_prioritized, mask=ctx.mask)
    metrics = {**routing.metrics, "router_entropy": jax.lax.stop_gradient(
        metrics_lib.router_entropy(selection.scores, ctx.mask))}
    if quantile is not None:
      metrics[QB_QUANTILE] = quantile
    return _balancing_loss(routing.replace(metrics=metrics), selection.scores,
                           _choices(selection.experts, cfg.experts), cfg, ctx)


# The per-expert quantile a quantile-balancing router reports for its update.
QB_QUANTILE = "qb_quantile"


def quantile_selection(logits: jax.Array, beta: jax.Array, k: int, ctx: RouteContext
                       ) -> tuple[jax.Array, jax.Array]:
  """Quantile balancing's selection and its next bias (Megatron-Core
  `qb_dual_update`): experts <int32>[G, S, K], the top-K of logits - beta per
  token, and <float32>[E] the column quantile over the T = G S tokens: with
  alpha_t a token's (K+1)-th largest logits - beta, the (T K / E + 1)-th
  largest logits - alpha of each expert's column (its bias for T K / E
  tokens). In evaluation, or with padding, the quantile is beta (no update)."""
  num_groups, num_tokens, num_experts = logits.shape
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  values, experts = jax.lax.top_k(logits - beta, min(k + 1, num_experts))
  experts = experts[..., :k]
  if ctx.deterministic or ctx.mask is not None or k + 1 > num_experts:
    return experts, beta
  total = num_groups * num_tokens
  if total * k % num_experts:
    raise ValueError(f"quantile_balancing needs the {total} tokens a device routes times "
                     f"top_k={k} to be a multiple of num_experts={num_experts}")
  alpha = values[..., -1:].reshape(total, 1)
  columns = (logits.reshape(total, num_experts) - alpha).T  # [E, T]
  quantile = jax.lax.top_k(columns, total * k // num_experts + 1)[0][:, -1]
  return experts.astype(jnp.int32), quantile


def balanced_experts(shape: tuple[int, ...], cfg: MoEConfig) -> jax.Array:
  """`cfg.force_balance`: token s of a group takes experts (s K + j) mod E,
  j < K (distinct for K <= E; every expert gets S K / E tokens when E divides
  S K). <int32>[G, S, K] for logits of `shape` [G, S, E]."""
  num_groups, num_tokens, _ = shape
  slots = jnp.arange(num_tokens, dtype=jnp.int32)[:, None] * cfg.k + jnp.arange(cfg.k)
  return jnp.broadcast_to(slots % cfg.experts, (num_groups, num_tokens, cfg.k))


class SwitchRouter(TokenChoiceRouter):
  """Switch Transformer (Fedus et al. 2021): top-1 token choice."""

  @classmethod
  def validate(cls, cfg: MoEConfig) -> None:
    if cfg.top_k != 1:
      raise ValueError(f"router='switch' routes each token to 1 expert, got top_k="
                       f"{cfg.top_k}; use router='topk' for top_k > 1")
    if cfg.granularity > 1:
      raise ValueError(f"router='switch' is top-1 but granularity={cfg.granularity} "
                       "multiplies top_k; use router='topk'")
    super().validate(cfg)


class SinkhornRouter(TokenChoiceRouter):
  """S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed Language
  Models", §2.2): in training, the top-K experts are selected on a balanced
  assignment found by Sinkhorn iterations on exp(logits); the weights are the
  softmax probabilities of those experts. At evaluation, plain top-K."""

  scoring = "softmax of x W; training selects on Sinkhorn-balanced scores"
  uses_bias = False

  @classmethod
  def validate(cls, cfg: MoEConfig) -> None:
    super().validate(cfg)
    if cfg.score_fn != "softmax" or cfg.num_groups > 1:
      raise ValueError("router='sinkhorn' selects on its own balanced scores: it needs "
                       "score_fn='softmax' and num_groups=1")

  @classmethod
  def noncausal_reason(cls, cfg, tokens_per_group=None):
    if cfg.group_by == "batch":
      return None
    return ("router='sinkhorn' with group_by='sequence': in training the balanced "
            "assignment normalizes each expert's column over the whole group, so a "
            "token's experts depend on later tokens")

  @classmethod
  def select(cls, logits, cfg, ctx, bias, experts=None):
    if experts is None and not ctx.deterministic:
      from moejax.routing import sinkhorn  # pylint: disable=g-import-not-at-top
      balanced = sinkhorn.sinkhorn_scores(logits, cfg.sinkhorn_iterations, ctx.mask)
      _, experts = jax.lax.top_k(balanced, cfg.k)
    return super().select(logits, cfg, ctx, bias, experts)


class ExpertChoiceRouter(LogitRouter):
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of
  the group by softmax probability. Balanced by construction: no balancing
  loss (aux_loss_type is not used), a token gets 0..E experts."""

  scoring = "softmax of x W, top-C tokens per expert"
  dispatchers = ("gather", "einsum")  # dropless needs capacity_factor=0

  @classmethod
  def validate(cls, cfg: MoEConfig) -> None:
    super().validate(cfg)
    for name, factor in (("capacity_factor", cfg.capacity_factor),
                         ("eval_capacity_factor", cfg.eval_capacity_factor)):
      if factor is not None and capacity_lib.is_dropless(factor):
        raise ValueError(f"{name}=0 (dropless) applies to token choice only; "
                         "router='expert_choice' needs a capacity factor > 0")
    if cfg.score_fn != "softmax" or cfg.num_groups > 1:
      raise ValueError("router='expert_choice' ranks tokens by softmax probability: it "
                       "needs score_fn='softmax' and num_groups=1")

  @classmethod
  def capacity(cls, cfg: MoEConfig, num_tokens: int, capacity_factor: float) -> int:
    return capacity_lib.expert_choice_capacity(
        num_tokens=num_tokens, num_experts=cfg.experts, capacity_factor=capacity_factor,
        min_capacity=cfg.min_capacity, rounding=cfg.capacity_rounding)

  @classmethod
  def experts_per_token(cls, cfg: MoEConfig) -> float:
    # Each expert takes C = capacity_factor * S / E tokens, so a token is
    # processed by capacity_factor experts on average (Zhou et al. 2022, §3.1: c = k).
    return float(cfg.capacity_factor)

  @classmethod
  def noncausal_reason(cls, cfg, tokens_per_group=None):
    if cfg.group_by == "batch":
      return None
    if tokens_per_group is not None:
      if cls.capacity(cfg, tokens_per_group, cfg.capacity_factor) >= tokens_per_group:
        return None
    elif cfg.capacity_factor >= cfg.experts:
      return None  # C >= S for every S: every expert takes every token
    return (f"router={cfg.router!r} with group_by='sequence': each expert picks its top "
            "tokens over the whole group, so whether a token is processed depends on "
            "later tokens")

  @classmethod
  def route_logits(cls, logits, cfg, ctx, bias=None):
    del bias
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    capacity = cls.capacity(cfg, logits.shape[1], ctx.capacity_factor)
    return expert_choice(probs, capacity=capacity, mask=ctx.mask)


class DenseFFN(Router):
  """Not a router: `router="dense"` makes the layer a dense FFN with the
  active hidden width of K experts (the baseline of every comparison)."""

  routed = False
  scoring = "none (dense FFN)"
  dispatchers = ()

  @classmethod
  def experts_per_token(cls, cfg):
    return 0.0

  @classmethod
  def router_params(cls, cfg, d_model, tokens_per_group=None):
    return 0


register_router("dense", DenseFFN)
register_router("switch", SwitchRouter)
register_router("topk", TokenChoiceRouter)
register_router("expert_choice", ExpertChoiceRouter)
register_router("sinkhorn", SinkhornRouter)


def route(logits: jax.Array, *, router: str, top_k: int = 1, bias: Optional[jax.Array] = None,
          mask: Optional[jax.Array] = None, rng: Optional[jax.Array] = None,
          deterministic: bool = True, sequence: Optional[jax.Array] = None,
          num_sequences: Optional[int] = None, axis_name: Any = None,
          **options) -> Routing:
  """Routes G groups of S tokens to E experts from router logits.

  The pure entry point of the logit routers (what the tests and references
  call); `nn.MoELayer` runs the same `route_logits` through the router module.

  Args:
    logits: <float>[G, S, E] router logits; computed in float32 (a lower
      precision input is upcast).
    router: a registered logit router ("switch", "topk", "expert_choice",
      "sinkhorn", ...).
    top_k: K (1 here, a bare call being a Switch router; the model's default
      is `MoEConfig.top_k`).
    bias: <float32>[E] selection bias (token choice), or None.
    mask: <bool>[G, S] real tokens, or None.
    rng, deterministic: router noise (`jitter` here multiplies the logits;
      the MoE layer jitters the router input instead).
    sequence, num_sequences, axis_name: see `RouteContext`.
    **options: any other `MoEConfig` field (capacity_factor, min_capacity,
      capacity_rounding, batch_prioritized, renormalize, score_fn,
      routed_scaling_factor, num_groups, top_groups, jitter, noise_std,
      aux_loss_type, sinkhorn_iterations, ...), with MoEConfig's defaults.

  Returns:
    A `Routing`. The z-loss is taken on the logits as given (before noise).
  """
  if not hasattr(logits, "dtype") or not hasattr(logits, "ndim"):
    raise ValueError(f"logits must be an array, got {type(logits).__name__}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
  if logits.ndim != 3:
    raise ValueError(f"logits must have rank 3 [G, S, E], got shape {logits.shape}")
  cls = get_router(router)
  if not issubclass(cls, LogitRouter) or cls.uses_token_ids:
    raise ValueError(f"router={router!r} does not route from logits; build it as a "
                     f"module (nn.MoELayer) instead of calling route()")
  unknown = sorted(set(options) - {f.name for f in dataclasses.fields(MoEConfig)})
  if unknown:
    raise ValueError(f"unknown route() option(s) {unknown}")
  cfg = MoEConfig(router=router, num_experts=logits.shape[-1], top_k=top_k,
                  dispatch=DISPATCH_AUTO, **options)
  if bias is not None:
    # A given bias is a selection bias whatever the update rule (route() has none).
    cfg_check = dataclasses.replace(cfg, bias_update_rate=1.0)
    validate(cfg_check)
  else:
    validate(cfg)
  logits = logits.astype(jnp.float32)
  ctx = RouteContext(capacity_factor=cfg.capacity_factor, deterministic=deterministic,
                     rng=rng, mask=mask, sequence=sequence, num_sequences=num_sequences,
                     axis_name=axis_name)
  noisy = _add_noise(logits, cfg, ctx, jitter_logits=True)
  routing = cls.route_logits(noisy, cfg, ctx, bias)
  return routing.replace(z_loss=z_loss(logits, mask))

