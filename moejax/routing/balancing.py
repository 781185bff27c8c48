"""Load-balancing auxiliary losses with padding masks and cross-device sums.

Letters: G groups, S tokens per group, E experts, K choices per token, B
sequences. Every loss takes

  scores <float32>[G, S, E]: the per-token expert scores the loss uses (softmax
    probabilities, or for sigmoid routers the scores normalized to sum to 1
    over experts; the caller provides them),
  choices <float32>[G, S, E]: 1 where token s of group g chose expert e among
    its K choices (before capacity drops), else 0,
  mask <bool>[G, S] or None: True for real tokens. Padded tokens count in no
    sum or mean, exactly as if absent; their scores and choices may hold any
    value (even NaN) and get zero gradient. A group (or sequence) with no real
    token contributes nothing, and an input with no real token at all gives 0.

`axis_name` (None, a shard_map axis name or a tuple of names) is the mesh axis
over which the groups are split. The losses psum *sums* (counts, score sums,
token counts) over it before dividing, never means of means, so the value
equals the one computed on all groups on one device even when devices hold
different numbers of real tokens, and it is the same on every device.

The masked Switch loss and z-loss reduce to `moejax.routing.losses` when mask
is None; the formulas follow the conventions written there (balanced = 1.0 for
every K: f_e sums to 1 over experts).
"""

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

AxisName = Union[None, str, Sequence[str]]

AUX_LOSS_TYPES = ("switch", "sequence", "global_batch", "importance", "none")


def _prepare(scores, choices, mask):
  """Casts to float32 and zeroes padded tokens (with `where`, not a product, so
  NaN/inf garbage in padding neither leaks into the value nor the gradient).

  Returns scores <float32>[G, S, E], choices <float32>[G, S, E] (or None) and
  real <float32>[G, S] (1.0 for real tokens)."""
  scores = jnp.asarray(scores, jnp.float32)
  if mask is None:
    real = jnp.ones(scores.shape[:2], jnp.float32)
  else:
    mask = jnp.asarray(mask, bool)
    if mask.shape != scores.shape[:2]:
      raise ValueError(f"mask has shape {mask.shape}, expected {scores.shape[:2]} "
                       "(the [G, S] of scores)")
    real = mask.astype(jnp.float32)
    scores = jnp.where(mask[..., None], scores, 0.0)
  if choices is not None:
    choices = jnp.asarray(choices, jnp.float32)
    if choices.shape != scores.shape:
      raise ValueError(f"choices has shape {choices.shape}, expected {scores.shape} "
                       "(the shape of scores)")
    if mask is not None:
      choices = jnp.where(mask[..., None], choices, 0.0)
  return scores, choices, real


def _psum(x, axis_name: AxisName):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _safe_div(num, den):
  """num / den where den > 0, else 0 (den is a count, so never negative)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _mean_over_valid(values, valid, axis_name: AxisName):
  """Mean of values[i] over the i with valid[i], across all devices."""
  total = _psum(jnp.sum(jnp.where(valid, values, 0.0)), axis_name)
  count = _psum(jnp.sum(valid.astype(jnp.float32)), axis_name)
  return _safe_div(total, count).astype(jnp.float32)


def switch_loss(scores: jax.Array, choices: jax.Array, mask: Optional[jax.Array] = None,
                axis_name: AxisName = None) -> jax.Array:
  """Switch Transformer load-balancing loss per group (Fedus et al. 2021, eq. 4-6).

      loss_g = E * sum_e f_ge * P_ge,   loss = mean of loss_g over the groups
  that hold at least one real token, with f_ge the fraction of group g's real
  choices that picked e (before capacity drops) and P_ge the mean score of e
  over g's real tokens. Balanced = 1.0 for every K.

  Which variant: f counts *choices* (sum_e f_e = 1), as in
  `losses.load_balancing_loss`, which this equals when mask is None;
  flaxformer counts tokens instead (sum_e f_e = K, K times this loss), vmoe's
  `gshard_loss` only first choices (balanced = 1, later choices ignored).

  Args:
    scores: <float32>[G, S, E] per-token expert scores.
    choices: <float32>[G, S, E] 1 where the token chose the expert, else 0.
    mask: <bool>[G, S] True for real tokens, or None (all real).
    axis_name: mesh axis the groups are split over, or None. The loss is still
      per group; only the mean over groups runs across devices.

  Returns:
    <float32>[] the loss.
  """
  scores, choices, real = _prepare(scores, choices, mask)
  num_experts = scores.shape[-1]
  tokens = jnp.sum(real, axis=1)                                     # [G]
  counts = jnp.sum(choices, axis=1)                                  # [G, E]
  # Fedus et al. 2021, eq. 5: f_i = (1/T) sum_x 1{argmax p(x) = i}, here over
  # the group's K real choices per token.
  choice_fraction = _safe_div(counts, jnp.sum(counts, axis=-1, keepdims=True))
  # Fedus et al. 2021, eq. 6: P_i = (1/T) sum_x p_i(x), over real tokens.
  mean_score = _safe_div(jnp.sum(scores, axis=1), tokens[:, None])  # [G, E]
  # Fedus et al. 2021, eq. 4: loss = alpha * N * sum_i f_i P_i (no alpha here).
  per_group = num_experts * jnp.sum(choice_fraction * mean_score, axis=-1)
  return _mean_over_valid(per_group, tokens > 0, axis_name)


def importance_loss(scores: jax.Array, mask: Optional[jax.Array] = None,
                    axis_name: AxisName = None) -> jax.Array:
  """Importance loss (Shazeer et al. 2017, eq. 6-7), per group.

      Importance_ge = sum over g's real tokens of scores[g, s, e]
      loss_g = CV(Importance_g)^2 = Var_e(Importance_ge) / Mean_e(Importance_ge)^2
  (population variance over the E experts), and loss = mean of loss_g over the
  groups with at least one real token. Balanced (equal importance) = 0.0. No
  w_importance inside (the caller weights it).

  Which variant: per group, like V-MoE (google-research/vmoe,
  vmoe/nn/routing.py, `_importance_auxiliary_loss` is jax.vmap-ed over groups
  in `NoisyTopExpertsPerItemRouter`, and vmoe/train/trainer.py `train_step`
  averages the per-group values with jnp.mean). Shazeer et al. take it over
  the whole batch. The squared CV is computed as var / mean^2, never through a
  std, whose gradient is undefined at 0.

  Args:
    scores: <float32>[G, S, E] per-token expert scores (CV^2 is scale-free, so
      unnormalized scores give the same value).
    mask, axis_name: as in `switch_loss`.

  Returns:
    <float32>[] the loss.
  """
  scores, _, real = _prepare(scores, None, mask)
  tokens = jnp.sum(real, axis=1)                                    # [G]
  # Shazeer et al. 2017, eq. 6: Importance(X) = sum_{x in X} G(x).
  importance = jnp.sum(scores, axis=1)                              # [G, E]
  mean = jnp.mean(importance, axis=-1)                              # [G]
  var = jnp.mean(jnp.square(importance - mean[:, None]), axis=-1)   # [G]
  # Shazeer et al. 2017, eq. 7: L_importance = w * CV(Importance(X))^2 (no w here).
  per_group = _safe_div(var, jnp.square(mean))
  return _mean_over_valid(per_group, tokens > 0, axis_name)


def sequence_loss(scores: jax.Array, choices: jax.Array, sequence: jax.Array,
                  num_sequences: int, top_k: int, mask: Optional[jax.Array] = None,
                  axis_name: AxisName = None) -> jax.Array:
  """Complementary sequence-wise balance loss (DeepSeek-V3, arXiv 2412.19437,
  §2.1.2, eq. 17-20).

  For each sequence b with T_b real tokens (wherever its tokens lie: several
  groups, several devices):
      f_be = E / (K T_b) * sum_{t in b} choices[t, e]           (eq. 18)
      P_be = (1 / T_b) * sum_{t in b} scores[t, e]              (eq. 20)
      L_b = sum_e f_be P_be                                      (eq. 17)
  and loss = mean of L_b over the sequences with T_b > 0. Balanced = 1.0.

  Which variant: eq. 19 (normalizing the sigmoid affinities to sum to 1 per
  token) is the caller's: `scores` must already be normalized. The balance
  factor alpha of eq. 17 is left to the caller. The mean over sequences is
  ours (eq. 17 is written for one sequence); it weights sequences equally, not
  by length.

  Args:
    scores: <float32>[G, S, E] per-token expert scores, normalized over E.
    choices: <float32>[G, S, E] 1 where the token chose the expert, else 0.
    sequence: <int32>[G, S] each token's global sequence id in
      [0, num_sequences) (ids outside it are dropped, like padding; padded
      tokens may hold any id).
    num_sequences: B, the number of sequences in the global batch (static).
    top_k: K, the choices per token.
    mask: <bool>[G, S] True for real tokens, or None (all real).
    axis_name: mesh axis the groups are split over, or None. The per-sequence
      sums <float32>[B, E] are psum-ed over it, so sequences split across
      devices are whole again before dividing.

  Returns:
    <float32>[] the loss.
  """
  scores, choices, real = _prepare(scores, choices, mask)
  num_experts = scores.shape[-1]
  sequence = jnp.asarray(sequence, jnp.int32)
  if sequence.shape != scores.shape[:2]:
    raise ValueError(f"sequence has shape {sequence.shape}, expected {scores.shape[:2]}")
  ids = sequence.reshape(-1)
  per_sequence = lambda x: jax.ops.segment_sum(  # noqa: E731  [B, ...]
      x.reshape(ids.shape[0], *x.shape[2:]), ids, num_segments=num_sequences)
  tokens = _psum(per_sequence(real), axis_name)        # [B]     T_b
  counts = _psum(per_sequence(choices), axis_name)     # [B, E]  sum_t 1(e in TopK_t)
  score_sums = _psum(per_sequence(scores), axis_name)  # [B, E]  sum_t s'_{e,t}
  # DeepSeek-V3 eq. 18: f_i = N_r / (K_r T) sum_t 1(s_{i,t} in TopK).
  f = _safe_div(num_experts * counts, top_k * tokens[:, None])
  # DeepSeek-V3 eq. 20: P_i = (1/T) sum_t s'_{i,t}.
  p = _safe_div(score_sums, tokens[:, None])
  # DeepSeek-V3 eq. 17: L_Bal = alpha sum_i f_i P_i (no alpha here).
  per_sequence_loss = jnp.sum(f * p, axis=-1)          # [B]
  # Already summed over devices: the mean needs no further psum.
  return _mean_over_valid(per_sequence_loss, tokens > 0, None)


def global_batch_loss(scores: jax.Array, choices: jax.Array, top_k: int,
                      mask: Optional[jax.Array] = None,
                      axis_name: AxisName = None) -> jax.Array:
  """Global-batch load-balancing loss (Qiu et al. 2025, "Demons in the Detail",
  arXiv 2501.11873): the Switch form (Fedus et al. 2021, eq. 4-6) with f and P
  taken over the whole global batch (all groups on all devices).

      f_e = (1 / (K N)) * sum over all N real tokens of choices[..., e]
      P_e = (1 / N) * sum over all N real tokens of scores[..., e]
      loss = E * sum_e f_e P_e
  f_e is the fraction of all real choices that picked e, since each real token
  has exactly K. Balanced = 1.0.

  Which variant: Qiu et al. all-reduce only the selection counts f across data
  parallel groups and average the per-micro-batch losses, which keeps P local;
  that equals this when every device holds the same number of real tokens.
  Here the score sums and token counts are psum-ed as well, so the value is the
  one-device global-batch loss for any padding. Their buffer across gradient
  accumulation steps is the caller's.

  Args:
    scores: <float32>[G, S, E] per-token expert scores.
    choices: <float32>[G, S, E] 1 where the token chose the expert, else 0.
    top_k: K, the choices per token.
    mask: <bool>[G, S] True for real tokens, or None (all real).
    axis_name: mesh axis the groups are split over, or None.

  Returns:
    <float32>[] the loss.
  """
  scores, choices, real = _prepare(scores, choices, mask)
  num_experts = scores.shape[-1]
  tokens = _psum(jnp.sum(real), axis_name)                    # N
  counts = _psum(jnp.sum(choices, axis=(0, 1)), axis_name)    # [E]
  score_sums = _psum(jnp.sum(scores, axis=(0, 1)), axis_name) # [E]
  # Fedus et al. 2021, eq. 5, over the global batch (Qiu et al. 2025, §3).
  f = _safe_div(counts, top_k * tokens)
  # Fedus et al. 2021, eq. 6, over the global batch.
  p = _safe_div(score_sums, tokens)
  # Fedus et al. 2021, eq. 4 (no alpha here).
  return (num_experts * jnp.sum(f * p)).astype(jnp.float32)


def balancing_loss(kind: str, *, scores: jax.Array, choices: jax.Array,
                   mask: Optional[jax.Array] = None, sequence: Optional[jax.Array] = None,
                   num_sequences: Optional[int] = None, top_k: Optional[int] = None,
                   axis_name: AxisName = None) -> jax.Array:
  """The auxiliary balance loss named by `kind` (one of AUX_LOSS_TYPES).

  "switch": `switch_loss`; "sequence": `sequence_loss` (needs sequence,
  num_sequences, top_k); "global_batch": `global_batch_loss` (needs top_k);
  "importance": `importance_loss` (ignores choices); "none": 0.0.

  Args:
    kind: the loss name.
    scores: <float32>[G, S, E] per-token expert scores.
    choices: <float32>[G, S, E] 1 where the token chose the expert, else 0.
    mask: <bool>[G, S] True for real tokens, or None (all real).
    sequence: <int32>[G, S] global sequence ids (for "sequence").
    num_sequences: B (for "sequence").
    top_k: K (for "sequence" and "global_batch").
    axis_name: mesh axis the groups are split over, or None.

  Returns:
    <float32>[] the loss.

  Raises:
    ValueError: for an unknown kind, or a missing argument the kind needs.
  """
  if kind not in AUX_LOSS_TYPES:
    raise ValueError(f"unknown balancing loss {kind!r}; valid names: "
                     f"{', '.join(AUX_LOSS_TYPES)}")

  def need(**kwargs):
    missing = [name for name, value in kwargs.items() if value is None]
    if missing:
      raise ValueError(f"balancing loss {kind!r} needs {', '.join(missing)}")

  if kind == "none":
    return jnp.zeros((), jnp.float32)
  if kind == "switch":
    return switch_loss(scores, choices, mask, axis_name=axis_name)
  if kind == "importance":
    return importance_loss(scores, mask, axis_name=axis_name)
  if kind == "global_batch":
    need(top_k=top_k)
    return global_batch_loss(scores, choices, top_k, mask, axis_name=axis_name)
  need(sequence=sequence, num_sequences=num_sequences, top_k=top_k)
  return sequence_loss(scores, choices, sequence, num_sequences, top_k, mask,
                       axis_name=axis_name)


def masked_z_loss(logits: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """Router z-loss over real tokens (ST-MoE, Zoph et al. 2022, eq. 5).

      loss = mean over the real tokens of logsumexp_e(logits)^2
  (0 when there is none). Equals `losses.router_z_loss` when mask is None.

  Args:
    logits: <float32>[G, S, E] router logits (before noise).
    mask: <bool>[G, S] True for real tokens, or None (all real).

  Returns:
    <float32>[] the loss.
  """
  logits, _, real = _prepare(logits, None, mask)
  # ST-MoE eq. 5: L_z = (1/B) sum_i (log sum_j exp(x_j^(i)))^2, B = real tokens.
  log_z = jax.nn.logsumexp(logits, axis=-1)                  # [G, S]
  return _safe_div(jnp.sum(real * jnp.square(log_z)), jnp.sum(real)).astype(jnp.float32)
