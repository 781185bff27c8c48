"""Tests for moejax.routing: route() against a slow loop reference of the
contract in DESIGN.md ("Routing semantics"), hand-computed golden cases,
metrics, noise, validation, jit and gradients.

Letters: G groups, S tokens per group, E experts, C capacity, K choices per token.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from moejax.routing import route

# ---------------------------------------------------------------------------
# Slow reference, written from DESIGN.md only (no moejax code).
# ---------------------------------------------------------------------------


def _ref_softmax(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _ref_z_loss(logits):
  """Mean over the G*S tokens of logsumexp(logits)^2."""
  x = np.asarray(logits, np.float64)
  top = x.max(axis=-1)
  log_z = top + np.log(np.exp(x - top[..., None]).sum(axis=-1))
  return float(np.mean(log_z ** 2))


def _ref_ceil(value):
  # Same float-noise handling as the contract's capacity rule (1.1 * 10 = 11).
  return math.ceil(round(value, 9))


def _ref_token_choice_capacity(S, E, k, capacity_factor, min_capacity):
  if capacity_factor == 0:  # dropless
    return S
  return max(min_capacity, _ref_ceil(capacity_factor * k * S / E))


def _ref_expert_choice_capacity(S, E, capacity_factor, min_capacity):
  return min(S, max(min_capacity, _ref_ceil(capacity_factor * S / E)))


def reference_token_choice(logits, *, top_k, capacity_factor, min_capacity=1,
                           batch_prioritized=False, renormalize=None):
  """Per-token loop implementation of token-choice routing (switch / topk)."""
  probs = _ref_softmax(logits)
  G, S, E = probs.shape
  k = top_k
  renormalize = k > 1 if renormalize is None else renormalize
  capacity = _ref_token_choice_capacity(S, E, k, capacity_factor, min_capacity)
  combine = np.zeros((G, S, E))
  aux_per_group = []
  requested = np.zeros(E)
  dropped = 0
  for g in range(G):
    p = probs[g]
    # Each token's k most probable experts; ties go to the lower expert index.
    picks = [sorted(range(E), key=lambda e: (-p[s, e], e))[:k] for s in range(S)]
    weights = []
    for s in range(S):
      w = [p[s, e] for e in picks[s]]
      if renormalize:
        total = sum(w)
        w = [x / total for x in w]
      weights.append(w)
    if batch_prioritized:
      order = sorted(range(S), key=lambda s: (-p[s, picks[s][0]], s))
    else:
      order = list(range(S))
    filled = [0] * E
    for rank in range(k):  # all 1st choices before any 2nd choice
      for s in order:
        e = picks[s][rank]
        if filled[e] < capacity:
          filled[e] += 1
          combine[g, s, e] = weights[s][rank]
        else:
          dropped += 1
    counts = np.zeros(E)
    for s in range(S):
      for e in picks[s]:
        counts[e] += 1
    requested += counts
    f = counts / (S * k)
    mean_prob = p.mean(axis=0)
    aux_per_group.append(E * float(np.sum(f * mean_prob)))
  return dict(
      combine=combine, capacity=capacity, aux_loss=float(np.mean(aux_per_group)),
      z_loss=_ref_z_loss(logits), dropped_fraction=dropped / (G * S * k),
      expert_load=requested / requested.sum())


def reference_expert_choice(logits, *, capacity_factor, min_capacity=1):
  """Per-expert loop implementation of expert-choice routing."""
  probs = _ref_softmax(logits)
  G, S, E = probs.shape
  capacity = _ref_expert_choice_capacity(S, E, capacity_factor, min_capacity)
  combine = np.zeros((G, S, E))
  for g in range(G):
    for e in range(E):
      # The C tokens with highest probability for e; ties to lower position.
      for s in sorted(range(S), key=lambda s: (-probs[g, s, e], s))[:capacity]:
        combine[g, s, e] = probs[g, s, e]
  unrouted = float(np.mean((combine > 0).sum(axis=-1) == 0))
  return dict(
      combine=combine, capacity=capacity, aux_loss=0.0, z_loss=_ref_z_loss(logits),
      dropped_fraction=0.0, expert_load=np.full(E, 1.0 / E), unrouted_fraction=unrouted)


def reference(logits, *, router, top_k=1, capacity_factor=1.25, min_capacity=1,
              batch_prioritized=False, renormalize=None):
  if router == "expert_choice":
    return reference_expert_choice(logits, capacity_factor=capacity_factor,
                                   min_capacity=min_capacity)
  return reference_token_choice(
      logits, top_k=top_k, capacity_factor=capacity_factor, min_capacity=min_capacity,
      batch_prioritized=batch_prioritized, renormalize=renormalize)


# ---------------------------------------------------------------------------
# route() under jit: one compilation per (shape, static options).
# ---------------------------------------------------------------------------

_STATIC = ("router", "top_k", "capacity_factor", "min_capacity", "batch_prioritized",
           "renormalize", "jitter", "noise_std", "deterministic")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _route_jit(logits, rng=None, **options):
  routing = route(logits, rng=rng, **options)
  return routing, routing.combine_weights()


def _run(logits, **options):
  routing, combine = _route_jit(jnp.asarray(logits, jnp.float32), **options)
  return routing, np.asarray(combine)


# ---------------------------------------------------------------------------
# 2. Randomized equivalence with the reference.
# ---------------------------------------------------------------------------


def _canonicalize_equal_rows(logits):
  """Rows of a group whose softmax is mathematically equal up to a permutation
  (same multiset of logit - max) are made identical, so equal probabilities
  are also bitwise equal and ties are exact rather than float noise."""
  out = logits.copy()
  for g in range(out.shape[0]):
    first = {}
    for s in range(out.shape[1]):
      key = tuple(np.sort(out[g, s] - out[g, s].max()))
      if key in first:
        out[g, s] = out[g, first[key]]
      else:
        first[key] = s
  return out


def _tied_logits(rng, G, S, E):
  """Continuous logits with copied columns (experts tied in every row), copied
  rows and constant rows (tokens tied for every expert): exact ties."""
  scale = rng.uniform(0.1, 5.0)
  tied = (scale * rng.standard_normal((G, S, E))).astype(np.float32)
  for _ in range(rng.integers(0, E // 2 + 1)):  # equal experts in every row
    src, dst = rng.integers(0, E, size=2)
    tied[..., dst] = tied[..., src]
  for g in range(G):
    for _ in range(rng.integers(0, S // 2 + 1)):  # equal tokens in a group
      src, dst = rng.integers(0, S, size=2)
      tied[g, dst] = tied[g, src]
    for s in rng.choice(S, size=rng.integers(0, S // 4 + 1), replace=False):
      tied[g, s] = rng.choice([0.0, 1.5])  # all experts tie for this token
  return tied


def _grid_logits(rng, G, S, E):
  """Logits on a coarse grid (multiples of 0.5): many ties within rows."""
  grid = np.round(rng.standard_normal((G, S, E)) * rng.uniform(0.5, 2.0) * 2) / 2
  return grid.astype(np.float32)


def _random_logits(rng, G, S, E):
  """Logit variants for one shape (one compilation): continuous, tied, grid."""
  variants = {"continuous": (rng.uniform(0.1, 5.0)
                             * rng.standard_normal((G, S, E))).astype(np.float32)}
  for i in range(2):
    variants[f"tied{i}"] = _tied_logits(rng, G, S, E)
    variants[f"grid{i}"] = _grid_logits(rng, G, S, E)
  return {name: _canonicalize_equal_rows(x) for name, x in variants.items()}


def _random_options(rng, router, batch_prioritized):
  small = rng.random() < 0.5  # small S, E make overflow and ties common
  G = int(rng.integers(1, 5))
  S = int(rng.integers(1, 17 if small else 65))
  E = int(rng.integers(1, 9 if small else 65))
  if router == "topk":
    k = int(rng.integers(1, min(4, E) + 1))
    renormalize = [None, True, False][rng.integers(0, 3)]
  else:
    k, renormalize = 1, None
  if rng.random() < 0.3:  # values where cf * K * S / E often lands on an integer
    capacity_factor = float(rng.choice([0.25, 0.5, 1.0, 1.25, 1.1, 2.0, 4.0]))
  else:
    capacity_factor = float(rng.uniform(0.25, 4.0))
  options = dict(router=router, top_k=k, capacity_factor=capacity_factor,
                 min_capacity=int(rng.choice([1, 1, 1, 2, 4])),
                 batch_prioritized=batch_prioritized, renormalize=renormalize)
  return (G, S, E), options


def _assert_routing_layout(routing, msg):
  """The `Routing` contract (types.py) that dispatchers rely on."""
  token, expert = np.asarray(routing.token), np.asarray(routing.expert)
  slot, weight = np.asarray(routing.slot), np.asarray(routing.weight)
  capacity = routing.capacity
  kept = slot < capacity
  # Slots are in [0, C]; C marks a dropped assignment, whose weight is 0.
  assert np.all((slot >= 0) & (slot <= capacity)), msg
  assert np.all(weight[~kept] == 0), msg
  # No two kept assignments share an expert slot.
  for g in range(token.shape[0]):
    used = list(zip(expert[g][kept[g]], slot[g][kept[g]]))
    assert len(used) == len(set(used)), msg
  positions = np.arange(token.shape[1])
  if routing.choices_per_token is not None:  # token-major: a // K
    np.testing.assert_array_equal(token, np.broadcast_to(
        positions // routing.choices_per_token, token.shape), err_msg=msg)
  else:  # expert-major: expert a // C, slot a % C
    np.testing.assert_array_equal(expert, np.broadcast_to(
        positions // capacity, expert.shape), err_msg=msg)
    np.testing.assert_array_equal(slot, np.broadcast_to(
        positions % capacity, slot.shape), err_msg=msg)


def _assert_matches_reference(logits, options, routing, combine, label):
  want = reference(logits, **options)
  msg = f"{label}: shape={logits.shape} options={options}"
  _assert_routing_layout(routing, msg)
  assert routing.capacity == want["capacity"], msg
  np.testing.assert_allclose(combine, want["combine"], rtol=0, atol=1e-6, err_msg=msg)
  np.testing.assert_allclose(float(routing.aux_loss), want["aux_loss"], rtol=1e-5,
                             atol=1e-5, err_msg=msg)
  np.testing.assert_allclose(float(routing.z_loss), want["z_loss"], rtol=1e-5,
                             atol=1e-5, err_msg=msg)
  np.testing.assert_allclose(float(routing.metrics["dropped_fraction"]),
                             want["dropped_fraction"], atol=1e-6, err_msg=msg)
  np.testing.assert_allclose(np.asarray(routing.metrics["expert_load"]),
                             want["expert_load"], atol=1e-6, err_msg=msg)
  if "unrouted_fraction" in want:
    np.testing.assert_allclose(float(routing.metrics["unrouted_fraction"]),
                               want["unrouted_fraction"], atol=1e-6, err_msg=msg)


_RANDOM_CASES = (
    [("topk", bp, seed) for bp in (False, True) for seed in range(8)]
    + [("switch", bp, seed) for bp in (False, True) for seed in range(5)]
    + [("expert_choice", False, seed) for seed in range(8)])


@pytest.mark.parametrize("router,batch_prioritized,seed", _RANDOM_CASES)
def test_route_matches_loop_reference(router, batch_prioritized, seed):
  rng = np.random.default_rng([seed, len(router), batch_prioritized])
  shape, options = _random_options(rng, router, batch_prioritized)
  for label, logits in _random_logits(rng, *shape).items():
    routing, combine = _run(logits, **options)
    _assert_matches_reference(logits, options, routing, combine, label)


@pytest.mark.parametrize("router,batch_prioritized,seed", [
    ("topk", False, 0), ("topk", True, 1), ("topk", False, 2), ("topk", True, 3),
    ("switch", False, 0), ("switch", True, 1)])
def test_dropless_drops_nothing(router, batch_prioritized, seed):
  rng = np.random.default_rng([seed, 7, batch_prioritized])
  shape, options = _random_options(rng, router, batch_prioritized)
  options["capacity_factor"] = 0.0
  G, S, E = shape
  # (Nearly) every token wants expert 0 first: with a capacity this would drop.
  logits = _random_logits(rng, *shape)["continuous"]
  logits[..., 0] += 10.0
  routing, combine = _run(logits, **options)
  _assert_matches_reference(logits, options, routing, combine, "dropless")
  assert routing.capacity == S
  assert bool(jnp.all(routing.kept))
  assert abs(float(routing.metrics["dropped_fraction"])) < 1e-6
  # Each token keeps all K of its choices.
  np.testing.assert_array_equal((combine > 0).sum(-1), options["top_k"])


def test_dropped_fraction_is_exactly_zero_when_nothing_is_dropped():
  # Switch, dropless (C = S = 3): every assignment is kept.
  routing, _ = _run(np.zeros((1, 3, 4)), router="switch", capacity_factor=0.0)
  assert bool(jnp.all(routing.kept))
  assert float(routing.metrics["dropped_fraction"]) == 0.0


# ---------------------------------------------------------------------------
# 3./4. Hand-built cases with golden values.
# ---------------------------------------------------------------------------


def _logits_from_probs(probs):
  """Logits whose softmax is `probs` (rows sum to 1)."""
  return np.log(np.asarray(probs, np.float32))


# Three tokens all wanting expert 0; switch, S=3, E=2, capacity_factor=1:
# C = ceil(1 * 1 * 3 / 2) = ceil(1.5) = 2.
_OVERFLOW_PROBS = [[[0.7, 0.3],
                    [0.6, 0.4],
                    [0.8, 0.2]]]


def test_overflow_drops_the_last_token_by_position():
  routing, combine = _run(_logits_from_probs(_OVERFLOW_PROBS), router="switch",
                          capacity_factor=1.0)
  assert routing.capacity == 2
  # Tokens 0 and 1 fill expert 0's 2 slots; token 2 is dropped. Switch (K=1)
  # keeps the raw probability as weight.
  np.testing.assert_allclose(combine[0], [[0.7, 0.0],
                                          [0.6, 0.0],
                                          [0.0, 0.0]], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(routing.kept), [[True, True, False]])
  np.testing.assert_array_equal(np.asarray(routing.slot), [[0, 1, 2]])  # 2 == C: dropped
  # The dropped assignment's own weight is 0 too, not only its combine row.
  np.testing.assert_allclose(np.asarray(routing.weight), [[0.7, 0.6, 0.0]], atol=1e-6)
  # 1 of 3 assignments dropped.
  np.testing.assert_allclose(float(routing.metrics["dropped_fraction"]), 1 / 3, atol=1e-6)


@pytest.mark.parametrize("router", ["switch", "expert_choice"])
def test_capacity_ignores_float_noise(router):
  # S=45, E=3, capacity_factor=2.2: 2.2 * 45 / 3 = 33.00000000000001 in binary
  # floating point, but C = 33, not 34 (for switch K=1 the product is the same).
  logits = np.zeros((1, 45, 3))
  logits[..., 0] = 1.0  # every token wants expert 0, all tied for it
  routing, combine = _run(logits, router=router, capacity_factor=2.2)
  assert routing.capacity == 33
  # Expert 0 serves tokens 0..32 (by position / lower position wins ties).
  np.testing.assert_array_equal(combine[0, :, 0] > 0, np.arange(45) < 33)


def test_batch_prioritized_changes_who_is_dropped():
  routing, combine = _run(_logits_from_probs(_OVERFLOW_PROBS), router="switch",
                          capacity_factor=1.0, batch_prioritized=True)
  # Served by descending top-1 probability: token 2 (0.8), token 0 (0.7),
  # token 1 (0.6); the 2 slots go to tokens 2 and 0, token 1 is dropped.
  np.testing.assert_allclose(combine[0], [[0.7, 0.0],
                                          [0.0, 0.0],
                                          [0.8, 0.0]], atol=1e-6)
  np.testing.assert_allclose(float(routing.metrics["dropped_fraction"]), 1 / 3, atol=1e-6)


def test_overflow_metrics_and_imbalanced_aux_loss():
  routing, _ = _run(_logits_from_probs(_OVERFLOW_PROBS), router="switch",
                    capacity_factor=1.0)
  # Every choice picked expert 0: f = [1, 0]; P_0 = (0.7 + 0.6 + 0.8) / 3 = 0.7.
  # aux = E * sum_e f_e P_e = 2 * (1 * 0.7 + 0 * 0.3) = 1.4.
  np.testing.assert_allclose(float(routing.aux_loss), 1.4, rtol=1e-6)
  # Load counts requested choices (before drops): expert 0 got all 3 of 3.
  np.testing.assert_allclose(np.asarray(routing.metrics["expert_load"]), [1.0, 0.0],
                             atol=1e-7)
  # max load / mean load = 1.0 / 0.5 = 2.0.
  np.testing.assert_allclose(float(routing.metrics["load_max_over_mean"]), 2.0, rtol=1e-6)


# Top-2, S=4, E=4, capacity_factor=0.5: C = ceil(0.5 * 2 * 4 / 4) = 1.
_PRIORITY_PROBS = [[[0.6, 0.3, 0.05, 0.05],   # token 0: 1st e0, 2nd e1
                    [0.05, 0.05, 0.6, 0.3],   # token 1: 1st e2, 2nd e3
                    [0.05, 0.05, 0.3, 0.6],   # token 2: 1st e3, 2nd e2
                    [0.3, 0.6, 0.05, 0.05]]]  # token 3: 1st e1, 2nd e0


@pytest.mark.parametrize("renormalize,kept_weight", [
    (None, 0.6 / 0.9),  # default for K=2: renormalized over the 2 picks = 2/3
    (False, 0.6),       # raw probability
])
def test_first_choices_fill_before_second_choices(renormalize, kept_weight):
  routing, combine = _run(_logits_from_probs(_PRIORITY_PROBS), router="topk", top_k=2,
                          capacity_factor=0.5, renormalize=renormalize)
  assert routing.capacity == 1
  w = kept_weight
  # 1st choices take every slot (e0<-t0, e2<-t1, e3<-t2, e1<-t3). Token 0's
  # 2nd choice (e1) comes after token 3's 1st choice (e1) although token 0 is
  # earlier in the group, so it is dropped; so are all other 2nd choices.
  np.testing.assert_allclose(combine[0], [[w, 0, 0, 0],
                                          [0, 0, w, 0],
                                          [0, 0, 0, w],
                                          [0, w, 0, 0]], atol=1e-6)
  # 4 of 8 assignments dropped.
  np.testing.assert_allclose(float(routing.metrics["dropped_fraction"]), 0.5, atol=1e-6)
  # Each expert requested twice: loads 2/8 each, max/mean = 1.
  np.testing.assert_allclose(np.asarray(routing.metrics["expert_load"]), [0.25] * 4,
                             atol=1e-7)
  np.testing.assert_allclose(float(routing.metrics["load_max_over_mean"]), 1.0, rtol=1e-6)


def test_ties_go_to_lower_expert_and_lower_position():
  # All logits equal: S=3, E=4, top-2, capacity_factor=1: C = ceil(2*3/4) = 2.
  # Every token picks experts 0 and 1 (lowest indices among equal probs),
  # renormalized weights 0.25 / 0.5 = 0.5. Expert 0 takes tokens 0 and 1 (lower
  # positions), token 2 is dropped from it; same for expert 1.
  expected = [[0.5, 0.5, 0.0, 0.0],
              [0.5, 0.5, 0.0, 0.0],
              [0.0, 0.0, 0.0, 0.0]]
  for batch_prioritized in (False, True):  # equal top-1 probs: ties by position
    _, combine = _run(np.zeros((1, 3, 4)), router="topk", top_k=2, capacity_factor=1.0,
                      batch_prioritized=batch_prioritized)
    np.testing.assert_allclose(combine[0], expected, atol=1e-6)


def test_batch_prioritized_ties_are_broken_by_position():
  # Switch, S=3, E=2, capacity_factor=0.5: C = ceil(0.5 * 3 / 2) = ceil(0.75) = 1.
  # All tokens want expert 0. Tokens 1 and 2 tie on top-1 probability 0.9.
  probs = [[[0.6, 0.4], [0.9, 0.1], [0.9, 0.1]]]
  logits = _logits_from_probs(probs)
  # By position: token 0 takes the slot.
  _, combine = _run(logits, router="switch", capacity_factor=0.5)
  np.testing.assert_allclose(combine[0], [[0.6, 0], [0, 0], [0, 0]], atol=1e-6)
  # Batch prioritized: order 1, 2 (tie, by position), 0: token 1 takes the slot.
  _, combine = _run(logits, router="switch", capacity_factor=0.5, batch_prioritized=True)
  np.testing.assert_allclose(combine[0], [[0, 0], [0.9, 0], [0, 0]], atol=1e-6)


def test_expert_choice_unrouted_tokens_and_position_ties():
  # S=4, E=2, capacity_factor=0.5: C = min(4, max(1, ceil(0.5 * 4 / 2))) = 1.
  probs = [[[0.9, 0.1],
            [0.2, 0.8],
            [0.5, 0.5],
            [0.9, 0.1]]]
  routing, combine = _run(_logits_from_probs(probs), router="expert_choice",
                          capacity_factor=0.5)
  assert routing.capacity == 1
  # Expert 0: tokens 0 and 3 tie at 0.9, the lower position (0) wins.
  # Expert 1: token 1 (0.8). Tokens 2 and 3 are taken by no expert.
  np.testing.assert_allclose(combine[0], [[0.9, 0.0],
                                          [0.0, 0.8],
                                          [0.0, 0.0],
                                          [0.0, 0.0]], atol=1e-6)
  # 2 of 4 tokens unrouted.
  np.testing.assert_allclose(float(routing.metrics["unrouted_fraction"]), 0.5, atol=1e-6)
  assert float(routing.aux_loss) == 0.0
  assert abs(float(routing.metrics["dropped_fraction"])) < 1e-6


def test_expert_choice_token_taken_by_several_experts():
  # S=2, E=3, capacity_factor=1: C = ceil(1 * 2 / 3) = 1.
  probs = [[[0.45, 0.45, 0.1],
            [0.1, 0.1, 0.8]]]
  routing, combine = _run(_logits_from_probs(probs), router="expert_choice",
                          capacity_factor=1.0)
  # Experts 0 and 1 both take token 0 (0.45 > 0.1); expert 2 takes token 1.
  np.testing.assert_allclose(combine[0], [[0.45, 0.45, 0.0],
                                          [0.0, 0.0, 0.8]], atol=1e-6)
  assert float(routing.metrics["unrouted_fraction"]) == 0.0


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_is_one_when_balanced(top_k):
  # S = E = 4; token s has logit 2 on expert s and (for K=2) 1 on expert s+1.
  # Choices: token s picks s (and s+1): f_e = K / (S*K) = 1/4 for every e.
  # The logits are circulant, so every column has the same multiset of
  # probabilities: P_e = 1/4. aux = 4 * sum_e (1/4)(1/4) = 1.0 for every K
  # (a per-token rather than per-choice f would give K).
  logits = 2.0 * np.eye(4) + (top_k - 1) * np.roll(np.eye(4), 1, axis=1)
  routing, _ = _run(logits[None], router="topk", top_k=top_k, capacity_factor=1.0)
  np.testing.assert_allclose(float(routing.aux_loss), 1.0, rtol=1e-6)
  # Nothing dropped (each expert requested K times, C = K), loads 1/4 each.
  assert abs(float(routing.metrics["dropped_fraction"])) < 1e-6
  np.testing.assert_allclose(float(routing.metrics["load_max_over_mean"]), 1.0, rtol=1e-6)


def test_aux_loss_uniform_probabilities_and_z_loss_of_zeros():
  # Uniform probabilities: P_e = 1/E, so aux = E * sum_e f_e / E = 1.0.
  # z-loss: logsumexp(0, ..., 0) = log E for every token -> (log 8)^2.
  routing, _ = _run(np.zeros((2, 5, 8)), router="topk", top_k=2)
  np.testing.assert_allclose(float(routing.aux_loss), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(routing.z_loss), math.log(8) ** 2, rtol=1e-6)


def test_z_loss_hand_value():
  # logsumexp per token: (0, log 3) -> log(1 + 3) = log 4; (log 2, log 2) ->
  # log(2 + 2) = log 4; (1, 1) -> 1 + log 2.
  # z = ((log 4)^2 + (log 4)^2 + (1 + log 2)^2) / 3.
  logits = np.array([[[0.0, math.log(3)], [math.log(2), math.log(2)], [1.0, 1.0]]])
  expected = (2 * math.log(4) ** 2 + (1 + math.log(2)) ** 2) / 3
  for router in ("switch", "expert_choice"):
    routing, _ = _run(logits, router=router)
    np.testing.assert_allclose(float(routing.z_loss), expected, rtol=1e-6)


def test_metrics_aggregate_over_groups():
  # G=2, S=3, E=3, switch, capacity_factor=1: C = ceil(3/3) = 1.
  # Group 0 top-1: e0, e0, e1; group 1: e0, e2, e0.
  hi, lo = 0.8, 0.1
  probs = [[[hi, lo, lo], [hi, lo, lo], [lo, hi, lo]],
           [[hi, lo, lo], [lo, lo, hi], [hi, lo, lo]]]
  routing, combine = _run(_logits_from_probs(probs), router="switch",
                          capacity_factor=1.0)
  # Requests: e0 = 2 + 2 = 4, e1 = 1, e2 = 1 of 6 -> load [4/6, 1/6, 1/6].
  load = np.asarray(routing.metrics["expert_load"])
  np.testing.assert_allclose(load, [4 / 6, 1 / 6, 1 / 6], atol=1e-6)
  np.testing.assert_allclose(load.sum(), 1.0, atol=1e-6)
  # max / mean = (4/6) / (1/3) = 2.0.
  np.testing.assert_allclose(float(routing.metrics["load_max_over_mean"]), 2.0, rtol=1e-6)
  # Group 0 drops token 1 (e0 full), group 1 drops token 2: 2 of 6.
  np.testing.assert_allclose(float(routing.metrics["dropped_fraction"]), 2 / 6, atol=1e-6)
  np.testing.assert_allclose(combine.sum(-1), [[hi, 0, hi], [hi, hi, 0]],
                             atol=1e-6)
  # aux per group: group 0: f = [2/3, 1/3, 0], P = [(0.8+0.8+0.1)/3, (0.1+0.1+0.8)/3, 0.1]
  #   = 3 * (2/3 * 1.7/3 + 1/3 * 1.0/3) = 3 * (3.4 + 1.0) / 9 = 4.4 / 3;
  # group 1: f = [2/3, 0, 1/3], P = [1.7/3, 0.1, 1.0/3] -> the same 4.4 / 3.
  np.testing.assert_allclose(float(routing.aux_loss), 4.4 / 3, rtol=1e-5)


# ---------------------------------------------------------------------------
# 5. Noise.
# ---------------------------------------------------------------------------

# Nearly tied logits: any noise of the size below reorders the experts.
_NOISY_LOGITS = 1.0 + 1e-3 * np.random.default_rng(0).standard_normal((2, 16, 8))


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_noise_is_off_when_deterministic_and_on_otherwise(router):
  top_k = 2 if router == "topk" else 1
  logits = jnp.asarray(_NOISY_LOGITS, jnp.float32)
  key = jax.random.PRNGKey(0)
  clean_routing, clean = _run(logits, router=router, top_k=top_k)
  _, det = _route_jit(logits, key, router=router, top_k=top_k, jitter=0.5,
                      noise_std=1.0, deterministic=True)
  np.testing.assert_array_equal(np.asarray(det), clean)
  for noise in (dict(jitter=0.5), dict(noise_std=1.0)):
    noisy_routing, noisy = _route_jit(logits, key, router=router, top_k=top_k,
                                      deterministic=False, **noise)
    noisy = np.asarray(noisy)
    # Noise changes which experts are chosen, not just the weights.
    assert np.any((noisy > 0) != (clean > 0)), noise
    # The z-loss is taken on the logits as given, before noise.
    np.testing.assert_allclose(float(noisy_routing.z_loss), float(clean_routing.z_loss),
                               rtol=1e-6)


def test_noise_without_rng_raises():
  with pytest.raises(ValueError, match="rng"):
    route(np.zeros((1, 2, 2), np.float32), router="topk", noise_std=1.0,
          deterministic=False)
  with pytest.raises(ValueError, match="rng"):
    route(np.zeros((1, 2, 2), np.float32), router="switch", jitter=0.1,
          deterministic=False)


# ---------------------------------------------------------------------------
# 6. Validation.
# ---------------------------------------------------------------------------

_GOOD = np.zeros((1, 4, 4), np.float32)


def test_unknown_router_lists_valid_routers():
  with pytest.raises(ValueError) as err:
    route(_GOOD, router="no_such_router")
  for name in ("switch", "topk", "expert_choice"):
    assert name in str(err.value)


@pytest.mark.parametrize("logits,kwargs,names_arg", [
    (_GOOD, dict(router="switch", top_k=2), "top_k"),
    (_GOOD, dict(router="topk", top_k=5), "top_k"),      # > E = 4
    (_GOOD, dict(router="topk", top_k=0), "top_k"),
    (_GOOD, dict(router="topk", capacity_factor=float("nan")), "capacity_factor"),
    (_GOOD, dict(router="topk", capacity_factor=float("inf")), "capacity_factor"),
    (_GOOD, dict(router="topk", capacity_factor=-1.0), "capacity_factor"),
    (_GOOD, dict(router="switch", capacity_factor=-1e-9), "capacity_factor"),
    (_GOOD, dict(router="expert_choice", capacity_factor=0.0), "capacity_factor"),
    (_GOOD, dict(router="topk", min_capacity=0), "min_capacity"),
    (_GOOD, dict(router="topk", jitter=1.0), "jitter"),
    (_GOOD, dict(router="topk", noise_std=-1.0), "noise_std"),
    (np.zeros((1, 4, 4), np.int32), dict(router="topk"), "logits"),
    (np.zeros((4, 4), np.float32), dict(router="topk"), "logits"),
    (np.zeros((1, 1, 4, 4), np.float32), dict(router="topk"), "logits"),
])
def test_invalid_arguments_raise_naming_the_argument(logits, kwargs, names_arg):
  with pytest.raises(ValueError, match=names_arg):
    route(logits, **kwargs)


# ---------------------------------------------------------------------------
# 7. jit and gradients.
# ---------------------------------------------------------------------------

_JIT_CASES = [
    dict(router="topk", top_k=2, capacity_factor=1.0, batch_prioritized=True),
    dict(router="switch", capacity_factor=1.0),
    dict(router="expert_choice", capacity_factor=1.0),
]


@pytest.mark.parametrize("options", _JIT_CASES, ids=lambda o: o["router"])
def test_jit_matches_eager(options):
  logits = jnp.asarray(
      np.random.default_rng(1).standard_normal((2, 8, 4)).astype(np.float32))
  eager = route(logits, **options)
  jitted = jax.jit(functools.partial(route, **options))(logits)
  assert jitted.capacity == eager.capacity
  for name in ("token", "expert", "slot"):
    np.testing.assert_array_equal(getattr(jitted, name), getattr(eager, name), err_msg=name)
  chex.assert_trees_all_close(
      (jitted.weight, jitted.aux_loss, jitted.z_loss, jitted.metrics),
      (eager.weight, eager.aux_loss, eager.z_loss, eager.metrics), rtol=1e-6, atol=1e-6)
  # And both match the reference.
  np.testing.assert_allclose(np.asarray(jitted.combine_weights()),
                             reference(np.asarray(logits), **options)["combine"], atol=1e-6)


@pytest.mark.parametrize("options", _JIT_CASES, ids=lambda o: o["router"])
def test_gradient_of_combine_weights(options):
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.standard_normal((2, 6, 4)).astype(np.float32))
  cotangent = jnp.asarray(rng.standard_normal((2, 6, 4)).astype(np.float32))

  @jax.jit
  def objective(x):
    return jnp.sum(route(x, **options).combine_weights() * cotangent)

  grad = np.asarray(jax.grad(objective)(logits))
  chex.assert_shape(grad, (2, 6, 4))
  assert np.all(np.isfinite(grad))
  assert np.any(np.abs(grad) > 1e-3)
  # Away from ties the routing is locally constant, so the gradient is that
  # of the kept softmax weights: compare with finite differences.
  jtu.check_grads(objective, (logits,), order=1, modes=["rev"], eps=1e-3,
                  atol=1e-2, rtol=1e-2)
