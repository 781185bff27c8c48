"""`route`: router logits -> `Routing`, and the registry of routers.

A router is one function `(probs, options) -> Routing` plus one registry entry;
dispatchers never see logits, so a new router touches no dispatcher.
"""

import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from moejax.routing import capacity as capacity_lib
from moejax.routing import losses
from moejax.routing.expert_choice import expert_choice
from moejax.routing.token_choice import token_choice
from moejax.routing.types import Routing


@dataclasses.dataclass(frozen=True)
class RouterOptions:
  """Static routing options (the keyword arguments of `route`)."""
  top_k: int = 1
  capacity_factor: float = 1.25
  min_capacity: int = 1
  batch_prioritized: bool = False
  renormalize: Optional[bool] = None

  @property
  def renormalize_weights(self) -> bool:
    # Renormalizing one weight would always give 1.0; Switch keeps the raw
    # probability for K = 1, so the default is on only for K > 1.
    return self.top_k > 1 if self.renormalize is None else self.renormalize


class RouterSpec(NamedTuple):
  """A registry entry: how to route, and which options are impossible."""
  fn: Callable[[jax.Array, RouterOptions], Routing]
  validate: Callable[[RouterOptions, int], None]


ROUTERS: dict[str, RouterSpec] = {}


def register_router(name: str, fn: Callable[[jax.Array, RouterOptions], Routing],
                    validate: Optional[Callable[[RouterOptions, int], None]] = None):
  """Adds a router. `fn(probs [G, S, E], options) -> Routing`."""
  if name in ROUTERS:
    raise ValueError(f"router {name!r} is already registered")
  ROUTERS[name] = RouterSpec(fn, validate or (lambda options, num_experts: None))


def _route_token_choice(probs: jax.Array, options: RouterOptions) -> Routing:
  num_tokens, num_experts = probs.shape[1:]
  capacity = capacity_lib.token_choice_capacity(
      num_tokens=num_tokens, num_experts=num_experts, top_k=options.top_k,
      capacity_factor=options.capacity_factor, min_capacity=options.min_capacity)
  return token_choice(probs, top_k=options.top_k, capacity=capacity,
                      batch_prioritized=options.batch_prioritized,
                      renormalize=options.renormalize_weights)


def _route_expert_choice(probs: jax.Array, options: RouterOptions) -> Routing:
  num_tokens, num_experts = probs.shape[1:]
  capacity = capacity_lib.expert_choice_capacity(
      num_tokens=num_tokens, num_experts=num_experts,
      capacity_factor=options.capacity_factor, min_capacity=options.min_capacity)
  return expert_choice(probs, capacity=capacity)


def _validate_switch(options: RouterOptions, num_experts: int) -> None:
  del num_experts
  if options.top_k != 1:
    raise ValueError(f"router='switch' routes each token to 1 expert, got top_k="
                     f"{options.top_k}; use router='topk' for top_k > 1")


def _validate_expert_choice(options: RouterOptions, num_experts: int) -> None:
  del num_experts
  if capacity_lib.is_dropless(options.capacity_factor):
    raise ValueError("capacity_factor=0 (dropless) applies to token choice only; "
                     "router='expert_choice' needs capacity_factor > 0")


register_router("switch", _route_token_choice, _validate_switch)
register_router("topk", _route_token_choice)
register_router("expert_choice", _route_expert_choice, _validate_expert_choice)


def validate_router_options(router: str, num_experts: int,
                            options: RouterOptions) -> None:
  """Raises ValueError naming the argument if the combination is impossible."""
  if router not in ROUTERS:
    raise ValueError(f"unknown router {router!r}; valid routers: {sorted(ROUTERS)}")
  if not isinstance(options.top_k, int) or options.top_k < 1:
    raise ValueError(f"top_k must be a positive integer, got {options.top_k!r}")
  if options.top_k > num_experts:
    raise ValueError(f"top_k={options.top_k} exceeds num_experts={num_experts}")
  factor = options.capacity_factor
  if (isinstance(factor, bool) or not isinstance(factor, (int, float))
      or not math.isfinite(factor) or factor < 0):
    raise ValueError("capacity_factor must be a finite number >= 0 (0 = dropless), "
                     f"got {factor!r}")
  if not isinstance(options.min_capacity, int) or options.min_capacity < 1:
    raise ValueError(f"min_capacity must be an integer >= 1, got {options.min_capacity!r}")
  ROUTERS[router].validate(options, num_experts)


def _validate_noise(jitter: float, noise_std: float) -> None:
  for name, value in (("jitter", jitter), ("noise_std", noise_std)):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
      raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  if jitter >= 1:
    raise ValueError(f"jitter must be < 1 (it scales by U(1-jitter, 1+jitter)), got {jitter}")


def apply_jitter(values: jax.Array, jitter: float, rng: jax.Array) -> jax.Array:
  """Multiplicative jitter (Switch Transformer, §2.4 / Table 3): values *
  U(1 - jitter, 1 + jitter), elementwise. Switch applies it to the router input."""
  noise = jax.random.uniform(rng, values.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
  return values * noise.astype(values.dtype)


def route(logits: jax.Array, *, router: str, top_k: int = 1,
          capacity_factor: float = 1.25, min_capacity: int = 1,
          batch_prioritized: bool = False, renormalize: Optional[bool] = None,
          jitter: float = 0.0, noise_std: float = 0.0,
          rng: Optional[jax.Array] = None, deterministic: bool = True) -> Routing:
  """Routes G groups of S tokens to E experts.

  Args:
    logits: <float>[G, S, E] router logits; computed in float32 (a lower
      precision input is upcast).
    router: a name in `ROUTERS` ("switch", "topk", "expert_choice", ...).
    top_k: K, experts per token (token choice).
    capacity_factor: slots per expert relative to a perfectly even split; 0 =
      dropless (token choice only). See `routing.capacity` for the formulas.
    min_capacity: lower bound on the slots per expert per group.
    batch_prioritized: fill slots by descending top-1 probability instead of
      position within each choice rank (V-MoE BPR).
    renormalize: renormalize the K weights of a token to sum to 1; default on
      for K > 1.
    jitter: multiplicative jitter U(1-jitter, 1+jitter) on the logits. Switch
      jitters the router *input*; `nn.MoELayer` does that and passes 0 here.
    noise_std: standard deviation of Gaussian noise added to the logits before
      selection (noisy top-k, Shazeer et al. 2017, eq. 4, with a fixed scale).
    rng: PRNG key, required when noise is on and `deterministic` is False.
    deterministic: turns all noise off (evaluation).

  Returns:
    A `Routing`. Probabilities (softmax of the possibly noisy logits, float32)
    drive selection, weights and the load-balancing loss; the z-loss is taken on
    the logits as given.
  """
  if not hasattr(logits, "dtype") or not hasattr(logits, "ndim"):
    raise ValueError(f"logits must be an array, got {type(logits).__name__}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
  if logits.ndim != 3:
    raise ValueError(f"logits must have rank 3 [G, S, E], got shape {logits.shape}")
  options = RouterOptions(top_k=top_k, capacity_factor=capacity_factor,
                          min_capacity=min_capacity,
                          batch_prioritized=batch_prioritized, renormalize=renormalize)
  validate_router_options(router, logits.shape[-1], options)
  _validate_noise(jitter, noise_std)

  logits = logits.astype(jnp.float32)
  z_loss = losses.router_z_loss(logits)
  if not deterministic and (jitter > 0 or noise_std > 0):
    if rng is None:
      raise ValueError("rng is required when jitter or noise_std > 0 and "
                       "deterministic=False")
    jitter_rng, noise_rng = jax.random.split(rng)
    if jitter > 0:
      logits = apply_jitter(logits, jitter, jitter_rng)
    if noise_std > 0:
      logits = logits + noise_std * jax.random.normal(noise_rng, logits.shape)
  probs = jax.nn.softmax(logits, axis=-1)
  routing = ROUTERS[router].fn(probs, options)
  return routing.replace(z_loss=z_loss)
