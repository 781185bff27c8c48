"""Tests for moejax.train.routing_report: hand-computed goldens for I(domain; expert)
and MaxVio, joint_counts against a numpy loop, the heatmap PNG and its
TensorBoard image summary.

Letters: B sequences, L tokens per sequence, Dm domains, E experts.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.train import routing_report as rr

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# One compiled program per shape instead of one per eager op (faster on CPU).
joint_counts = jax.jit(rr.joint_counts, static_argnums=(2, 3))

# ---------------------------------------------------------------------------
# mutual_information_bits
# ---------------------------------------------------------------------------


def test_mi_each_domain_its_own_expert_is_one_bit():
  # p = [[1/2, 0], [0, 1/2]], p(d) = p(e) = [1/2, 1/2]:
  # I = 2 * 1/2 * log2((1/2) / (1/2 * 1/2)) = log2 2 = 1 bit.
  assert rr.mutual_information_bits([[5, 0], [0, 5]]) == pytest.approx(1.0, abs=1e-12)
  # The extra, never-used expert changes nothing (0 log 0 = 0).
  assert rr.mutual_information_bits(np.array([[7, 0, 0], [0, 7, 0]])) == pytest.approx(1.0)


def test_mi_independent_is_zero():
  # counts = outer([1, 3/2], [2, 4]): p(d, e) = p(d) p(e) in every cell, so each
  # log term is log2 1 = 0.
  assert rr.mutual_information_bits([[2.0, 4.0], [3.0, 6.0]]) == pytest.approx(0.0, abs=1e-12)
  # Uniform routing: every domain spread evenly over every expert.
  assert rr.mutual_information_bits(np.ones((4, 8))) == pytest.approx(0.0, abs=1e-12)


def test_mi_permutation_is_log2_of_size():
  # A 3x3 permutation of equal counts: p = 1/3 on 3 cells, marginals 1/3 each:
  # I = 3 * 1/3 * log2((1/3) / (1/9)) = log2 3 = 1.58496... bits.
  counts = np.array([[0, 4, 0], [0, 0, 4], [4, 0, 0]])
  assert rr.mutual_information_bits(counts) == pytest.approx(math.log2(3), abs=1e-12)


def test_mi_partial_golden():
  # counts [[1, 1], [0, 2]]: p = [[1/4, 1/4], [0, 1/2]], p(d) = [1/2, 1/2],
  # p(e) = [1/4, 3/4].
  # I = 1/4 log2((1/4)/(1/8)) + 1/4 log2((1/4)/(3/8)) + 1/2 log2((1/2)/(3/8))
  #   = 1/4 + 1/4 (1 - log2 3) + 1/2 (2 - log2 3) = 3/2 - 3/4 log2 3 = 0.311278...
  expected = 1.5 - 0.75 * math.log2(3)
  assert rr.mutual_information_bits([[1, 1], [0, 2]]) == pytest.approx(expected, abs=1e-12)
  # Scale-free: fractions or a jax array give the same value.
  assert rr.mutual_information_bits(jnp.array([[0.25, 0.25], [0.0, 0.5]])) == pytest.approx(
      expected, abs=1e-6)


def test_mi_zero_counts_and_bad_input():
  assert rr.mutual_information_bits(np.zeros((3, 4))) == 0.0
  with pytest.raises(ValueError):
    rr.mutual_information_bits(np.ones(4))
  with pytest.raises(ValueError):
    rr.mutual_information_bits([[1.0, -1.0], [0.0, 1.0]])


# ---------------------------------------------------------------------------
# joint_counts
# ---------------------------------------------------------------------------


def _ref_joint_counts(domain, expert, num_domains, num_experts, mask=None):
  """Per-token loop over the contract: count (domain, expert) when expert >= 0 and mask."""
  domain, expert = np.asarray(domain), np.asarray(expert)
  B, L = expert.shape
  out = np.zeros((num_domains, num_experts))
  for b in range(B):
    for t in range(L):
      d = domain[b] if domain.ndim == 1 else domain[b, t]
      e = expert[b, t]
      if e < 0 or (mask is not None and not mask[b, t]):
        continue
      out[d, e] += 1
  return out


@pytest.mark.parametrize("per_token_domain", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_joint_counts_matches_loop(per_token_domain, use_mask):
  rng = np.random.default_rng(0)
  B, L, Dm, E = 6, 10, 3, 5
  expert = rng.integers(-1, E, size=(B, L)).astype(np.int32)  # About 1/6 unrouted.
  domain_shape = (B, L) if per_token_domain else (B,)
  domain = rng.integers(0, Dm, size=domain_shape).astype(np.int32)
  mask = rng.random((B, L)) < 0.7 if use_mask else None
  got = joint_counts(domain, expert, Dm, E, mask)
  assert got.shape == (Dm, E) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), _ref_joint_counts(domain, expert, Dm, E, mask))


def test_joint_counts_excludes_unrouted_and_masked():
  # Sequence 0 is domain 1, sequence 1 domain 0.
  domain = np.array([1, 0], np.int32)
  expert = np.array([[2, -1, 0, 2],
                     [-1, -1, 1, 1]], np.int32)
  mask = np.array([[True, True, True, False],
                   [True, True, True, True]])
  got = np.asarray(joint_counts(domain, expert, 2, 3, mask))
  # Kept: (1, 2), (1, 0) from sequence 0 (the -1 and the masked last token
  # dropped); (0, 1) twice from sequence 1 (its two -1 dropped).
  expected = np.array([[0, 2, 0],
                       [1, 0, 1]], np.float32)
  np.testing.assert_array_equal(got, expected)
  assert got.sum() == 4
  # Everything unrouted: nothing counted, and MI of that is 0.
  none = joint_counts(domain, np.full((2, 4), -1, np.int32), 2, 3)
  assert float(none.sum()) == 0.0 and rr.mutual_information_bits(none) == 0.0


def test_joint_counts_feeds_mi():
  # Domain d always routed to expert d: I = log2 2 = 1 bit.
  domain = np.array([0, 1, 0, 1], np.int32)
  expert = np.repeat(domain[:, None], 8, axis=1)
  counts = joint_counts(domain, expert, 2, 4)
  assert rr.mutual_information_bits(counts) == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# dead_experts, max_violation
# ---------------------------------------------------------------------------


def test_dead_experts():
  assert rr.dead_experts(np.array([0.0, 3.0, 0.0, 1.0])) == 2
  assert rr.dead_experts(jnp.ones(8)) == 0
  assert isinstance(rr.dead_experts([0, 0, 0]), int)


def test_max_violation_goldens():
  # Balanced: max = mean = 1, so 1/1 - 1 = 0.
  assert rr.max_violation(np.array([1.0, 1.0, 1.0, 1.0])) == 0.0
  # [2, 1, 1, 0]: mean = 4/4 = 1, max = 2, so 2/1 - 1 = 1.
  assert rr.max_violation([2, 1, 1, 0]) == pytest.approx(1.0)
  assert isinstance(rr.max_violation([2, 1, 1, 0]), float)
  # Fractions give the same ratio: [1/2, 1/4, 1/4, 0] -> 1.
  assert rr.max_violation(np.array([0.5, 0.25, 0.25, 0.0])) == pytest.approx(1.0)
  # All load on one of E = 4 experts: 1 / (1/4) - 1 = E - 1 = 3.
  assert rr.max_violation(np.array([0.0, 1.0, 0.0, 0.0])) == pytest.approx(3.0)


def test_max_violation_jax_and_per_layer():
  got = jax.jit(rr.max_violation)(jnp.array([2, 1, 1, 0], jnp.int32))
  assert isinstance(got, jax.Array)
  assert float(got) == pytest.approx(1.0)
  per_layer = rr.max_violation(np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.0]]))
  np.testing.assert_allclose(per_layer, [0.0, 1.0])


# ---------------------------------------------------------------------------
# Heatmap PNG and TensorBoard image
# ---------------------------------------------------------------------------


def _few_layer_load():
  # 3 MoE layers (Transformer layers 1, 3, 5) x 8 experts; each row sums to 1.
  rng = np.random.default_rng(1)
  load = rng.random((3, 8))
  load[2] = 0.0
  load[2, 0] = 1.0  # Collapsed layer: everything on expert 0.
  return load / load.sum(axis=1, keepdims=True)


def test_save_load_heatmap_writes_png(tmp_path):
  path = tmp_path / "reports" / "nested" / "load_step100.png"  # Parents not there yet.
  rr.save_load_heatmap(str(path), _few_layer_load(), [1, 3, 5], step=100)
  assert path.is_file() and path.stat().st_size > 0
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE
  height, width, _ = rr._png_header(data)
  assert height > 0 and width > 0
  # The temporary file was renamed, not left behind.
  assert os.listdir(path.parent) == [path.name]


def test_save_load_heatmap_validates(tmp_path):
  with pytest.raises(ValueError):
    rr.save_load_heatmap(str(tmp_path / "a.png"), np.ones((2, 4)) / 4, [1], step=0)
  with pytest.raises(ValueError):
    rr.save_load_heatmap(str(tmp_path / "a.png"), np.ones(4) / 4, [1], step=0)


def test_write_heatmap_image_event_file(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  png = tmp_path / "load.png"
  rr.save_load_heatmap(str(png), _few_layer_load(), [1, 3, 5], step=40)
  logdir = tmp_path / "tensorboard" / "routing"
  tag = "routing/load_heatmap"
  # Two calls in the same second must not overwrite each other's event file.
  rr.write_heatmap_image(str(logdir), tag, str(png), step=40)
  rr.write_heatmap_image(str(logdir), tag, str(png), step=80)
  event_files = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")]
  assert len(event_files) == 2

  steps = []
  for name in sorted(event_files):
    acc = event_accumulator.EventAccumulator(
        str(logdir / name), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    assert tag in acc.Tags()[event_accumulator.IMAGES]
    (event,) = acc.Images(tag)
    assert event.encoded_image_string == png.read_bytes()
    height, width, _ = rr._png_header(png.read_bytes())
    assert (event.height, event.width) == (height, width)
    steps.append(event.step)
  assert sorted(steps) == [40, 80]
