"""The compiled steps: train, eval, and the health check run before a save.

Every function of the step number only (router noise, learning rate), so a
resumed run computes exactly what an uninterrupted one does.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted token cross-entropies (nats) and the sum of weights."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def _scalar_aux(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  zero = jnp.zeros((), jnp.float32)
  return {"train/aux_loss": aux.get("aux_loss", zero),
          "train/z_loss": aux.get("z_loss", zero),
          "train/dropped_fraction": aux.get("dropped_fraction", zero),
          "train/expert_load_max_over_mean": aux.get("load_max_over_mean", zero),
          "train/router_entropy": aux.get("router_entropy", zero)}


def _loss_and_grads(graphdef, params, batch, rng):
  def loss_fn(params):
    logits, aux = nnx.merge(graphdef, params)(batch["inputs"], deterministic=False, rng=rng)
    total_ce, count = cross_entropy(logits, batch["targets"], batch["weights"])
    ce = total_ce / jnp.maximum(count, 1.0)
    return ce + aux["weighted_loss"], (ce, aux)
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int):
  """A jitted (params, opt_state, batch, step) -> (params, opt_state, metrics, finite)."""
  base_key = jax.random.key(seed)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch, step):
    rng = jax.random.fold_in(base_key, step)
    (total, (ce, aux)), grads = _loss_and_grads(graphdef, params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {"train/loss": ce, "train/total_loss": total, "train/grad_norm": grad_norm,
               "train/learning_rate": schedule(step), **_scalar_aux(aux)}
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    return params, opt_state, metrics, finite

  return train_step


def make_health_check(graphdef, seed: int):
  """A jitted (params, opt_state, batch, step) -> bool: the state is fit to be
  saved as a checkpoint to resume from.

  True when every parameter and optimizer moment is finite and the loss and
  gradient that the next step (`step`, on its batch) computes from these
  parameters are finite. A finite loss at step s does not make the state after
  step s safe: measured with learning_rate=1000, the loss at step 6 was finite
  but its gradient was not, so a checkpoint of step 5 diverged on every resume,
  whatever the learning rate. The check costs one forward and backward pass
  per save (and one compilation).
  """
  base_key = jax.random.key(seed)

  @jax.jit
  def health_check(params, opt_state, batch, step):
    rng = jax.random.fold_in(base_key, step)
    (total, _), grads = _loss_and_grads(graphdef, params, batch, rng)
    return (_all_finite(params) & _all_finite(opt_state) & jnp.isfinite(total)
            & jnp.isfinite(optax.tree.norm(grads)))

  return health_check


def make_eval_step(graphdef):
  @jax.jit
  def eval_step(params, batch):
    logits, _ = nnx.merge(graphdef, params)(batch["inputs"])
    return cross_entropy(logits, batch["targets"], batch["weights"])
  return eval_step


def evaluate(eval_step, params, batches) -> float:
  """Mean cross-entropy (nats per target token) over the held-out batches."""
  total, count = 0.0, 0.0
  for batch in batches:
    batch_total, batch_count = eval_step(params, batch)
    total += float(batch_total)
    count += float(batch_count)
  return total / max(count, 1.0)
