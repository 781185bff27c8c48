"""The optimizer: AdamW with linear warmup, cosine decay and gradient clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate` over `warmup_steps`, then cosine decay to
  `learning_rate * final_lr_fraction` at `schedule_steps` (default `steps`;
  Loshchilov & Hutter 2017), constant after. A function of the step only, so a
  resumed run follows the same curve.

  When `warmup_steps` reaches the end of the schedule (a short smoke test of a
  config with the default warmup), the run is all warmup: the rate rises by
  `learning_rate / warmup_steps` per step, as in the first steps of the
  configured run, never decays, and holds at `learning_rate` after
  `warmup_steps`.
  """
  schedule_steps = train.schedule_steps if train.get("schedule_steps") else train.steps
  if train.warmup_steps >= schedule_steps:
    return optax.linear_schedule(init_value=0.0, end_value=train.learning_rate,
                                 transition_steps=train.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=schedule_steps, end_value=train.learning_rate * train.final_lr_fraction)


def _decay_mask(params):
  """Decay matrices (kernels, embeddings), not RMSNorm scales or vectors. A
  scanned stack's leading "layers" axis does not count, so the scanned and
  unscanned layouts decay the same parameters (`scan_layers` changes no
  number)."""
  def decays(path, p):
    stacked = bool(path) and getattr(path[0], "key", None) == "stack"
    return p.ndim - stacked >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm (off when grad_clip = 0), then AdamW (decoupled weight
  decay on matrices only, Loshchilov & Hutter 2019). The state has the same
  structure whatever the options, so a run can resume with other values."""
  adamw = optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                      weight_decay=train.weight_decay, mask=_decay_mask)
  max_norm = train.grad_clip if train.grad_clip else float("inf")
  tx = optax.chain(optax.clip_by_global_norm(max_norm), adamw)
  moment_dtype = train.get("moment_dtype", "float32")
  return tx if moment_dtype == "float32" else stored_in(tx, jnp.dtype(moment_dtype))


def stored_in(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`tx` whose floating-point state is stored in `dtype` (bfloat16 halves the
  memory of Adam's two moments) and computed in float32: each update reads
  the state up to float32, runs `tx`, and rounds the new state back.

  optax's `mu_dtype` covers the first moment only; this covers both. Rounding
  the second moment to bfloat16 (8 bits of mantissa) perturbs each update's
  denominator by at most ~0.2% relative (half of 2^-8 under the square
  root), and the count stays an integer.
  """
  def cast(tree, to):
    return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)

  def init(params):
    return cast(tx.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = tx.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(init, update)
