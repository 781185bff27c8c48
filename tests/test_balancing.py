"""Tests for moejax.routing.balancing: hand-computed goldens, NumPy loop
references on random masked inputs, mask invariance, balanced inputs,
gradients, the dispatcher, and equality across 8 host devices (a subprocess,
since the device count is fixed when jax starts).

Letters: G groups, S tokens per group, E experts, K choices per token, B sequences.
"""

import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routing import balancing, losses
from moejax.routing.balancing import AUX_LOSS_TYPES, balancing_loss

import host_devices  # tests/host_devices.py: the environment of N host devices

# Jitted once per shape: eager op-by-op dispatch would dominate the run time.
switch_loss = jax.jit(balancing.switch_loss, static_argnames="axis_name")
importance_loss = jax.jit(balancing.importance_loss, static_argnames="axis_name")
sequence_loss = jax.jit(balancing.sequence_loss,
                        static_argnames=("num_sequences", "top_k", "axis_name"))
global_batch_loss = jax.jit(balancing.global_batch_loss, static_argnames=("top_k", "axis_name"))
masked_z_loss = jax.jit(balancing.masked_z_loss)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------
# NumPy loop references, written from the papers' formulas (no moejax code).
# ---------------------------------------------------------------------------


def _real_tokens(mask, where=lambda g, s: True):
  G, S = mask.shape
  return [(g, s) for g in range(G) for s in range(S) if mask[g, s] and where(g, s)]


def _switch_ref(scores, choices, mask):
  """Fedus et al. eq. 4-6 per group; mean over groups with a real token."""
  G, _, E = scores.shape
  per_group = []
  for g in range(G):
    tokens = _real_tokens(mask, lambda gg, s: gg == g)
    if not tokens:
      continue
    total = sum(choices[t][e] for t in tokens for e in range(E))
    loss = 0.0
    for e in range(E):
      f = sum(choices[t][e] for t in tokens) / total
      p = sum(scores[t][e] for t in tokens) / len(tokens)
      loss += f * p
    per_group.append(E * loss)
  return float(np.mean(per_group)) if per_group else 0.0


def _importance_ref(scores, mask):
  """Shazeer et al. CV^2 of the per-expert score sums, per group."""
  G, _, E = scores.shape
  per_group = []
  for g in range(G):
    tokens = _real_tokens(mask, lambda gg, s: gg == g)
    if not tokens:
      continue
    importance = [sum(scores[t][e] for t in tokens) for e in range(E)]
    mean = sum(importance) / E
    var = sum((x - mean) ** 2 for x in importance) / E
    per_group.append(var / mean ** 2)
  return float(np.mean(per_group)) if per_group else 0.0


def _sequence_ref(scores, choices, sequence, num_sequences, top_k, mask):
  """DeepSeek-V3 eq. 17-20 per sequence; mean over sequences with a real token."""
  E = scores.shape[-1]
  per_sequence = []
  for b in range(num_sequences):
    tokens = _real_tokens(mask, lambda g, s: sequence[g, s] == b)
    if not tokens:
      continue
    T = len(tokens)
    loss = 0.0
    for e in range(E):
      f = E / (top_k * T) * sum(choices[t][e] for t in tokens)
      p = sum(scores[t][e] for t in tokens) / T
      loss += f * p
    per_sequence.append(loss)
  return float(np.mean(per_sequence)) if per_sequence else 0.0


def _global_batch_ref(scores, choices, top_k, mask):
  """Qiu et al.: the Switch form over every real token of every group."""
  E = scores.shape[-1]
  tokens = _real_tokens(mask)
  if not tokens:
    return 0.0
  loss = 0.0
  for e in range(E):
    f = sum(choices[t][e] for t in tokens) / (top_k * len(tokens))
    p = sum(scores[t][e] for t in tokens) / len(tokens)
    loss += f * p
  return E * loss


def _z_ref(logits, mask):
  """ST-MoE eq. 5 over real tokens."""
  values = [math.log(sum(math.exp(x) for x in logits[t])) ** 2 for t in _real_tokens(mask)]
  return float(np.mean(values)) if values else 0.0


def _random_case(seed, G=4, S=6, E=5, K=2, seq_len=5, pad=0.3, empty_group=True):
  """Softmax scores, K distinct random choices per token, a random mask (group
  0 fully padded when empty_group), and sequences of seq_len consecutive
  tokens that straddle group boundaries."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(G, S, E)).astype(np.float32)
  scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  picks = np.argsort(rng.random((G, S, E)), axis=-1)[..., :K]
  choices = np.zeros((G, S, E), np.float32)
  np.put_along_axis(choices, picks, 1.0, axis=-1)
  mask = rng.random((G, S)) > pad
  if empty_group:
    mask[0] = False
  sequence = (np.arange(G * S) // seq_len).reshape(G, S).astype(np.int32)
  num_sequences = int(sequence.max()) + 1
  return dict(logits=logits, scores=scores.astype(np.float32), choices=choices, mask=mask,
              sequence=sequence, num_sequences=num_sequences, top_k=K)


@functools.partial(jax.jit, static_argnames=("num_sequences", "top_k"))
def _jit_losses(logits, scores, choices, sequence, mask, *, num_sequences, top_k):
  return {
      "switch": switch_loss(scores, choices, mask),
      "importance": importance_loss(scores, mask),
      "sequence": sequence_loss(scores, choices, sequence, num_sequences, top_k, mask),
      "global_batch": global_batch_loss(scores, choices, top_k, mask),
      "z": masked_z_loss(logits, mask),
  }


def _all_losses(case, mask):
  """{name: value} of every loss on `case` with `mask` (one jit call)."""
  c = case
  return _jit_losses(c["logits"], c["scores"], c["choices"], c["sequence"], mask,
                     num_sequences=c["num_sequences"], top_k=c["top_k"])


# ---------------------------------------------------------------------------
# Hand-computed goldens.
# ---------------------------------------------------------------------------

# One group, two tokens, two experts, K = 1, both tokens choose expert 0.
SCORES_1x2 = np.array([[[0.7, 0.3], [0.6, 0.4]]], np.float32)
CHOICES_1x2 = np.array([[[1, 0], [1, 0]]], np.float32)


def test_switch_golden():
  # f = [2/2, 0/2] = [1, 0]; P = [(0.7+0.6)/2, (0.3+0.4)/2] = [0.65, 0.35]
  # loss = E * (1*0.65 + 0*0.35) = 2 * 0.65 = 1.3
  np.testing.assert_allclose(switch_loss(SCORES_1x2, CHOICES_1x2), 1.3, rtol=1e-6)


def test_importance_golden():
  # importance = [0.7+0.6, 0.3+0.4] = [1.3, 0.7]; mean = 1.0;
  # population var = ((0.3)^2 + (-0.3)^2) / 2 = 0.09; CV^2 = 0.09 / 1.0^2 = 0.09
  np.testing.assert_allclose(importance_loss(SCORES_1x2), 0.09, rtol=1e-5)


def test_sequence_golden():
  # One sequence of the two tokens above: f = E/(K T) * counts = 2/2 * [2, 0] = [2, 0];
  # P = [0.65, 0.35]; L = 2*0.65 = 1.3.
  one = np.zeros((1, 2), np.int32)
  np.testing.assert_allclose(sequence_loss(SCORES_1x2, CHOICES_1x2, one, 1, 1), 1.3,
                             rtol=1e-6)
  # Four tokens, two sequences of two, K = 1.
  #   b=0: tokens [0.7,0.3] [0.6,0.4], both pick 0: f = [2, 0], P = [0.65, 0.35], L_0 = 1.3
  #   b=1: tokens [0.2,0.8] [0.5,0.5], pick 1 then 0: f = [1, 1], P = [0.35, 0.65], L_1 = 1.0
  #   loss = (1.3 + 1.0) / 2 = 1.15
  # The per-group Switch loss of the same group is balanced overall:
  #   f = [3/4, 1/4], P = [(0.7+0.6+0.2+0.5)/4, ...] = [0.5, 0.5]: 2 * 0.5 * 1 = 1.0
  scores = np.array([[[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]]], np.float32)
  choices = np.array([[[1, 0], [1, 0], [0, 1], [1, 0]]], np.float32)
  sequence = np.array([[0, 0, 1, 1]], np.int32)
  np.testing.assert_allclose(sequence_loss(scores, choices, sequence, 2, 1), 1.15, rtol=1e-6)
  np.testing.assert_allclose(switch_loss(scores, choices), 1.0, rtol=1e-6)
  # A third, empty sequence id changes nothing (T_b = 0 is left out of the mean).
  np.testing.assert_allclose(sequence_loss(scores, choices, sequence, 3, 1), 1.15, rtol=1e-6)


def test_global_batch_golden():
  # One group: the same as Switch, 1.3.
  np.testing.assert_allclose(global_batch_loss(SCORES_1x2, CHOICES_1x2, 1), 1.3, rtol=1e-6)


def test_switch_and_global_batch_differ_on_opposite_imbalance():
  # Group A: both tokens [0.7, 0.3] choose expert 0; group B: both [0.3, 0.7] choose 1.
  # Switch per group: A: f = [1, 0], P = [0.7, 0.3] -> 2*0.7 = 1.4; B: 1.4; mean 1.4.
  # Global batch: f = [2/4, 2/4], P = [(0.7*2+0.3*2)/4, ...] = [0.5, 0.5] -> 2*0.5 = 1.0.
  scores = np.array([[[0.7, 0.3], [0.7, 0.3]], [[0.3, 0.7], [0.3, 0.7]]], np.float32)
  choices = np.array([[[1, 0], [1, 0]], [[0, 1], [0, 1]]], np.float32)
  np.testing.assert_allclose(switch_loss(scores, choices), 1.4, rtol=1e-6)
  np.testing.assert_allclose(global_batch_loss(scores, choices, 1), 1.0, rtol=1e-6)
  # Importance per group: A: [1.4, 0.6], mean 1, var 0.16 -> 0.16; B the same.
  np.testing.assert_allclose(importance_loss(scores), 0.16, rtol=1e-5)


def test_masked_golden():
  # Three tokens, the third padded (garbage): the same as the two-token golden.
  scores = np.array([[[0.7, 0.3], [0.6, 0.4], [0.0, 1.0]]], np.float32)
  choices = np.array([[[1, 0], [1, 0], [0, 1]]], np.float32)
  mask = np.array([[True, True, False]])
  np.testing.assert_allclose(switch_loss(scores, choices, mask), 1.3, rtol=1e-6)
  np.testing.assert_allclose(importance_loss(scores, mask), 0.09, rtol=1e-5)
  np.testing.assert_allclose(global_batch_loss(scores, choices, 1, mask), 1.3, rtol=1e-6)
  np.testing.assert_allclose(
      sequence_loss(scores, choices, np.zeros((1, 3), np.int32), 1, 1, mask), 1.3, rtol=1e-6)


def test_z_loss_golden():
  # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2.
  # Both real: ((ln 2)^2 + (2 ln 2)^2) / 2 = 2.5 (ln 2)^2 = 1.2011325; second padded: (ln 2)^2.
  logits = np.array([[[0.0, 0.0], [math.log(3.0), 0.0]]], np.float32)
  np.testing.assert_allclose(masked_z_loss(logits), 2.5 * math.log(2) ** 2, rtol=1e-6)
  np.testing.assert_allclose(masked_z_loss(logits, np.array([[True, False]])),
                             math.log(2) ** 2, rtol=1e-6)


# ---------------------------------------------------------------------------
# References, mask invariance, balance, existing losses.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed, top_k", [(0, 1), (1, 2), (2, 3)])
def test_matches_numpy_reference(seed, top_k):
  c = _random_case(seed, K=top_k)
  got = _all_losses(c, c["mask"])
  want = {
      "switch": _switch_ref(c["scores"], c["choices"], c["mask"]),
      "importance": _importance_ref(c["scores"], c["mask"]),
      "sequence": _sequence_ref(c["scores"], c["choices"], c["sequence"],
                                c["num_sequences"], top_k, c["mask"]),
      "global_batch": _global_batch_ref(c["scores"], c["choices"], top_k, c["mask"]),
      "z": _z_ref(c["logits"], c["mask"]),
  }
  for name in want:
    assert got[name].dtype == jnp.float32 and got[name].shape == ()
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)


def test_mask_none_matches_all_real_and_existing_losses():
  c = _random_case(3, K=2, empty_group=False)
  all_real = np.ones(c["mask"].shape, bool)
  unmasked, masked = _all_losses(c, None), _all_losses(c, all_real)
  for name in unmasked:
    np.testing.assert_allclose(unmasked[name], masked[name], rtol=1e-6, err_msg=name)
  for top_k in (1, 2):
    ck = _random_case(4 + top_k, K=top_k)
    counts = ck["choices"].sum(axis=1).astype(np.int32)
    np.testing.assert_allclose(switch_loss(ck["scores"], ck["choices"]),
                               losses.load_balancing_loss(ck["scores"], counts), rtol=1e-6)
  np.testing.assert_allclose(masked_z_loss(c["logits"]), losses.router_z_loss(c["logits"]),
                             rtol=1e-6)


def test_cross_checks_between_losses():
  c = _random_case(7, G=3, S=8, K=2, empty_group=False)
  s, ch, mask = c["scores"], c["choices"], c["mask"]
  # One sequence per group: the sequence loss is the Switch loss.
  per_group = np.repeat(np.arange(3, dtype=np.int32)[:, None], 8, axis=1)
  np.testing.assert_allclose(sequence_loss(s, ch, per_group, 3, 2, mask),
                             switch_loss(s, ch, mask), rtol=1e-6)
  # One sequence in all: the sequence loss is the global-batch loss.
  np.testing.assert_allclose(sequence_loss(s, ch, np.zeros_like(per_group), 1, 2, mask),
                             global_batch_loss(s, ch, 2, mask), rtol=1e-6)
  # One group: the global-batch loss is the Switch loss.
  np.testing.assert_allclose(global_batch_loss(s[:1], ch[:1], 2, mask[:1]),
                             switch_loss(s[:1], ch[:1], mask[:1]), rtol=1e-6)


def test_padding_with_garbage_changes_nothing():
  c = _random_case(8, K=2)
  G, S, E = c["scores"].shape
  pad = 3
  garbage = np.full((G, pad, E), np.nan, np.float32)
  padded = dict(c)
  padded["scores"] = np.concatenate([c["scores"], garbage], axis=1)
  padded["logits"] = np.concatenate([c["logits"], garbage], axis=1)
  padded["choices"] = np.concatenate([c["choices"], np.full((G, pad, E), 7.0, np.float32)],
                                     axis=1)
  padded["sequence"] = np.concatenate([c["sequence"], np.zeros((G, pad), np.int32)], axis=1)
  mask = np.concatenate([c["mask"], np.zeros((G, pad), bool)], axis=1)
  before, after = _all_losses(c, c["mask"]), _all_losses(padded, mask)
  for name in before:
    np.testing.assert_allclose(after[name], before[name], rtol=1e-6, err_msg=name)
  # The garbage gets zero gradient (and no NaN leaks into the real tokens').
  grad = jax.jit(jax.grad(lambda x: switch_loss(x, padded["choices"], mask)
                  + importance_loss(x, mask) + global_batch_loss(x, padded["choices"], 2, mask)
                  + sequence_loss(x, padded["choices"], padded["sequence"],
                                  c["num_sequences"], 2, mask)))(padded["scores"])
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[:, S:] == 0)
  z_grad = jax.jit(jax.grad(lambda x: masked_z_loss(x, mask)))(padded["logits"])
  assert np.all(np.isfinite(z_grad)) and np.all(np.asarray(z_grad)[:, S:] == 0)


def test_balanced_inputs():
  # E = 4, K = 2: token t picks experts (t mod 4, t+1 mod 4), so every 4
  # consecutive tokens (one sequence) choose each expert exactly twice.
  G, S, E, K = 2, 8, 4, 2
  t = np.arange(G * S).reshape(G, S)
  choices = np.zeros((G, S, E), np.float32)
  for k in range(K):
    np.put_along_axis(choices, ((t + k) % E)[..., None], 1.0, axis=-1)
  sequence = (t // 4).astype(np.int32)
  uniform = np.full((G, S, E), 1.0 / E, np.float32)
  rng = np.random.default_rng(9)
  other = rng.random((G, S, E)).astype(np.float32)
  other /= other.sum(-1, keepdims=True)
  # f uniform -> E * sum_e (1/E) P_e = sum_e P_e = 1 for any normalized scores.
  for scores in (uniform, other):
    np.testing.assert_allclose(switch_loss(scores, choices), 1.0, rtol=1e-6)
    np.testing.assert_allclose(sequence_loss(scores, choices, sequence, 4, K), 1.0, rtol=1e-6)
    np.testing.assert_allclose(global_batch_loss(scores, choices, K), 1.0, rtol=1e-6)
  np.testing.assert_allclose(importance_loss(uniform), 0.0, atol=1e-7)


def test_empty_groups_and_empty_input():
  c = _random_case(10, K=2)
  assert not c["mask"][0].any()
  # Group 0 is empty: the same as leaving it out.
  rest = {k: (v[1:] if isinstance(v, np.ndarray) else v) for k, v in c.items()}
  with_empty, without = _all_losses(c, c["mask"]), _all_losses(rest, c["mask"][1:])
  for name in with_empty:
    np.testing.assert_allclose(with_empty[name], without[name], rtol=1e-6, err_msg=name)
  # No real token at all: 0, with a zero (finite) gradient.
  none = np.zeros_like(c["mask"])
  for name, value in _all_losses(c, none).items():
    assert float(value) == 0.0, name
  grad = jax.jit(jax.grad(lambda x: global_batch_loss(x, c["choices"], 2, none)
                          + sequence_loss(x, c["choices"], c["sequence"],
                                          c["num_sequences"], 2, none)))(c["scores"])
  assert np.all(np.asarray(grad) == 0)


# ---------------------------------------------------------------------------
# Gradients, jit, dispatcher.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["switch", "sequence", "global_batch", "importance"])
def test_gradients_finite(kind):
  c = _random_case(11, K=2)
  fn = lambda x: balancing_loss(kind, scores=x, choices=c["choices"], mask=c["mask"],  # noqa: E731
                                sequence=c["sequence"], num_sequences=c["num_sequences"],
                                top_k=2, axis_name=None)
  grad = jax.jit(jax.grad(fn))(jnp.asarray(c["scores"]))
  assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)
  z_grad = jax.jit(jax.grad(lambda x: masked_z_loss(x, c["mask"])))(jnp.asarray(c["logits"]))
  assert np.all(np.isfinite(z_grad))


def test_dispatcher_jit_and_errors():
  c = _random_case(12, K=2)
  direct = _all_losses(c, c["mask"])
  for kind in AUX_LOSS_TYPES:
    fn = jax.jit(lambda s, ch, m, q, kind=kind: balancing_loss(
        kind, scores=s, choices=ch, mask=m, sequence=q, num_sequences=c["num_sequences"],
        top_k=2, axis_name=None))
    value = fn(c["scores"], c["choices"], c["mask"], c["sequence"])
    assert value.dtype == jnp.float32 and value.shape == ()
    np.testing.assert_allclose(value, 0.0 if kind == "none" else direct[kind], rtol=1e-6)
  with pytest.raises(ValueError, match="switch, sequence, global_batch, importance, none"):
    balancing_loss("gshard", scores=c["scores"], choices=c["choices"], mask=None,
                   sequence=None, num_sequences=None, top_k=2, axis_name=None)
  with pytest.raises(ValueError, match="sequence, num_sequences"):
    balancing_loss("sequence", scores=c["scores"], choices=c["choices"], mask=None,
                   sequence=None, num_sequences=None, top_k=2, axis_name=None)
  with pytest.raises(ValueError, match="mask has shape"):
    switch_loss(c["scores"], c["choices"], c["mask"][:, :2])
  assert balancing.AUX_LOSS_TYPES == ("switch", "sequence", "global_batch", "importance",
                                      "none")


# ---------------------------------------------------------------------------
# 8 host devices: shard_map over groups equals the one-device value.
# ---------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from moejax.routing import balancing

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    G, S, E, K = 16, 12, 4, 2  # 2 groups of 12 tokens per device
    logits = rng.normal(size=(G, S, E)).astype(np.float32)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    picks = np.argsort(rng.random((G, S, E)), axis=-1)[..., :K]
    choices = np.zeros((G, S, E), np.float32)
    np.put_along_axis(choices, picks, 1.0, axis=-1)
    mask = rng.random((G, S)) > 0.4
    mask[6:8] = False   # device 3 holds no real token
    mask[8:10] = True   # device 4 holds only real tokens
    # Sequences of 20 tokens: they straddle groups and devices (24 tokens each).
    sequence = (np.arange(G * S) // 20).reshape(G, S).astype(np.int32)
    B = int(sequence.max()) + 1

    def loss(name, s, c, q, m, axis_name):
      if name == "sequence":
        return balancing.sequence_loss(s, c, q, B, K, m, axis_name=axis_name)
      if name == "global_batch":
        return balancing.global_batch_loss(s, c, K, m, axis_name=axis_name)
      if name == "switch":
        return balancing.switch_loss(s, c, m, axis_name=axis_name)
      return balancing.importance_loss(s, m, axis_name=axis_name)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, sharding) for a in (scores, choices, sequence, mask)]
    results = {}
    for name in ("sequence", "global_batch", "switch", "importance"):
      one_device = lambda s, name=name: loss(name, s, choices, sequence, mask, None)
      local = lambda s, c, q, m, name=name: loss(name, s, c, q, m, "data")
      sharded = jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P())
      want, want_grad = jax.jit(jax.value_and_grad(one_device))(scores)
      got, got_grad = jax.jit(jax.value_and_grad(sharded))(*args)
      results[name] = {
          "want": float(want), "got": float(got),
          "grad_err": float(np.max(np.abs(np.asarray(got_grad) - np.asarray(want_grad)))),
          "grad_finite": bool(np.all(np.isfinite(np.asarray(got_grad)))),
      }
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def eight_devices():
  env = host_devices.subprocess_env(8)
  proc = subprocess.run([sys.executable, "-c", _WORKER], capture_output=True, text=True,
                        env=env, timeout=300, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sequence", "global_batch", "switch", "importance"])
def test_eight_devices_match_one_device(eight_devices, name):
  r = eight_devices[name]
  assert abs(r["got"] - r["want"]) <= 1e-6, r
  assert r["grad_finite"] and r["grad_err"] <= 1e-6, r
