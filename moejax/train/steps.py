"""The compiled steps: train and the health check run before a save (the eval
step is `moejax.train.evaluator`'s).

Every function of the step number only (router noise, learning rate), so a
resumed run computes exactly what an uninterrupted one does.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec

from moejax.nn.attention import explicit_spec
from moejax.parallel.mesh import current_mesh


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted token cross-entropies (nats) and the sum of weights."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


# Logged on every run (0.0 without MoE layers); every other scalar the model
# reports passes through by its own name, per layer too.
_ALWAYS = ("aux_loss", "z_loss", "dropped_fraction", "load_max_over_mean", "router_entropy")
_LOGGED_AS = {"load_max_over_mean": "expert_load_max_over_mean"}
_NOT_LOGGED = ("layers", "weighted_loss", "attention_max_logits")


def trainable(params: nnx.State) -> nnx.State:
  """The parameters the optimizer trains (`nnx.Param`), without router state
  updated outside it (`routing.RouterState`)."""
  return nnx.split_state(params, nnx.Param, ...)[0]


def padding_mask(batch) -> jax.Array:
  """<bool>[B, L] real positions: those whose target counts in the loss."""
  return batch["weights"] > 0


def _scalar_aux(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """train/<name> for the model's scalars (means over the MoE layers) and
  train/layer{i}/<name> for each MoE layer's (its MaxVio from this step's
  load; the load vector and first choices are not scalars)."""
  zero = jnp.zeros((), jnp.float32)
  out = {f"train/{_LOGGED_AS.get(name, name)}": value
         for name, value in {**dict.fromkeys(_ALWAYS, zero), **aux}.items()
         if name not in _NOT_LOGGED}
  for index, layer in aux.get("layers", {}).items():
    for name, value in layer.items():
      if jnp.ndim(value) == 0 and name not in _LOGGED_AS:
        out[f"train/layer{index}/{name}"] = value
  return out


def layer_loads(aux: dict[str, jax.Array]) -> jax.Array:
  """<float32>[MoE layers, E] expert load of each MoE layer ([0, 0] if none)."""
  loads = [layer["expert_load"] for layer in aux.get("layers", {}).values()
           if "expert_load" in layer]
  if not loads:
    return jnp.zeros((0, 0), jnp.float32)
  return jnp.stack(loads).astype(jnp.float32)


def _loss_and_grads(graphdef, params, batch, rng, frozen=None, max_logits=False):
  weights, fixed = nnx.split_state(params, nnx.Param, ...)
  rest = (fixed,) if frozen is None else (fixed, frozen)

  def loss_fn(weights):
    model = nnx.merge(graphdef, weights, *rest)
    # Training batches hold no padding (both datasets train on full windows),
    # so routing runs unmasked (the exact, cheaper path); eval batches are
    # padded and pass their mask (`make_eval_step`), as do a replayed trace's
    # batches (config.train.replay_trace), whose "routes" replace routing.
    routes = batch.get("routes")
    logits, aux = model(batch["inputs"], deterministic=False, rng=rng, routes=routes,
                        mask=None if routes is None else padding_mask(batch),
                        max_logits=max_logits)
    total_ce, count = cross_entropy(logits, batch["targets"], batch["weights"])
    ce = total_ce / jnp.maximum(count, 1.0)
    return ce + aux["weighted_loss"], (ce, aux)
  (total, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights)
  return (total, (ce, aux)), grads, weights, fixed


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# The metrics entry holding <float32>[MoE layers, E] loads (not a scalar).
LOADS_KEY = "routing/expert_load"


def jit_with_frozen(step_fn, frozen, donate: tuple[int, ...] = ()):
  """`step_fn(params, frozen, *args)` jitted as `f(params, *args)`. The frozen
  state is an argument of the compiled function, not a constant baked into
  it; `donate` indexes f's arguments. Without `frozen`, f is the jitted
  function itself (`f.lower` works)."""
  if frozen is None:
    return jax.jit(lambda params, *args: step_fn(params, None, *args),
                   donate_argnums=donate)
  jitted = jax.jit(step_fn, donate_argnums=tuple(i + (i > 0) for i in donate))
  return lambda params, *args: jitted(params, frozen, *args)


def make_train_step(graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int, frozen: Any = None,
                    qk_clip_tau: float = 0.0):
  """A jitted (params, opt_state, batch, step) -> (params, opt_state, metrics, finite).

  `params` is the model's whole state (what checkpoints hold); the optimizer
  sees only its `nnx.Param`s (`trainable`). metrics[LOADS_KEY] is the
  per-layer expert load, the rest are scalars.

  With `frozen` (a LoRA run, `moejax.train.lora`): `params` are the adapters
  only and `frozen` the rest of the model's state, which no step changes
  (router state included: `after_step` does not run). The router-noise key
  is made inside the step (no array exists before the step is traced), so
  the step can be lowered for compile-only devices (`moejax.aot`).

  qk_clip_tau > 0 (config.train.qk_clip_tau): QK-clip after the update
  (`TransformerLM.clip_logits`, from this step's forward pass), and the
  largest attention logit of the step is logged as train/max_attention_logit
  (before the clip)."""
  def train_step(params, frozen, opt_state, batch, step):
    rng = jax.random.fold_in(jax.random.key(seed), step)
    (total, (ce, aux)), grads, weights, fixed = _loss_and_grads(
        graphdef, params, batch, rng, frozen, max_logits=qk_clip_tau > 0)
    updates, opt_state = tx.update(grads, opt_state, weights)
    weights = optax.apply_updates(weights, updates)
    if frozen is None:
      # Router state outside the optimizer (e.g. the balancing bias) moves
      # after the step, from this step's routing.
      model = nnx.merge(graphdef, weights, fixed)
      model.after_step(aux)
      if qk_clip_tau > 0:
        model.clip_logits(aux["attention_max_logits"], qk_clip_tau)
      params = nnx.state(model)
    else:
      params = nnx.merge_state(weights, fixed)
    grad_norm = optax.tree.norm(grads)
    metrics = {"train/loss": ce, "train/total_loss": total, "train/grad_norm": grad_norm,
               "train/learning_rate": schedule(step), **_scalar_aux(aux),
               LOADS_KEY: replicated(layer_loads(aux))}
    if qk_clip_tau > 0:
      metrics["train/max_attention_logit"] = jnp.max(aux["attention_max_logits"])
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    return params, opt_state, metrics, finite

  return jit_with_frozen(train_step, frozen, donate=(0, 1))


def make_health_check(graphdef, seed: int, frozen: Any = None):
  """A jitted (params, opt_state, batch, step, unigram_entropy) -> (finite,
  alive): whether the state is fit to be saved as a checkpoint to resume from.

  finite: every parameter and optimizer moment is finite and the loss and
  gradient that the next step (`step`, on its batch) computes from these
  parameters are finite. A finite loss at step s does not make the state after
  step s safe: measured with learning_rate=1000, the loss at step 6 was finite
  but its gradient was not, so a checkpoint of step 5 diverged on every resume,
  whatever the learning rate.
  alive: that loss is below `unigram_entropy` (nats; what predicting the
  token frequencies alone scores), or the gradient is not exactly zero. A
  collapsed state after a divergence (every logit equal, loss ln V, gradient
  exactly 0) is finite but can learn nothing: resuming from it "finishes"
  without training. Pass -inf when the entropy is unknown (alive = a gradient).
  The check costs one forward and backward pass per save (and one compilation).
  """
  def health_check(params, frozen, opt_state, batch, step, unigram_entropy):
    rng = jax.random.fold_in(jax.random.key(seed), step)
    (total, (ce, _)), grads, _, _ = _loss_and_grads(graphdef, params, batch, rng, frozen)
    grad_norm = optax.tree.norm(grads)
    finite = (_all_finite(params) & _all_finite(opt_state) & jnp.isfinite(total)
              & jnp.isfinite(grad_norm))
    return finite, (ce < unigram_entropy) | (grad_norm > 0)

  return jit_with_frozen(health_check, frozen)


def replicated(x: jax.Array) -> jax.Array:
  """`x` on every device (small per-token arrays reduced on one device, and
  readable by every process)."""
  if explicit_spec(x) is not None:
    return jax.sharding.reshard(x, PartitionSpec())
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))
