"""scaling.accounting: formula counts against built models and hand computations."""

import warnings

import jax
import pytest
from flax import nnx

from moejax.nn import NonCausalRoutingWarning, TransformerLM
from moejax.scaling import param_counts, train_flops_per_token


def _moe(**overrides):
  moe = dict(num_experts=4, top_k=2, expert_hidden=16, router="topk", capacity_factor=1.25)
  moe.update(overrides)
  return moe


def _built_counts(**args) -> tuple[int, int]:
  """(all parameters, routed expert parameters) of an abstract TransformerLM."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", NonCausalRoutingWarning)
    model = nnx.eval_shape(lambda: TransformerLM(rngs=nnx.Rngs(0), **args))
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  total = sum(variable.get_value().size for _, variable in flat)
  routed = sum(variable.get_value().size for path, variable in flat if "experts" in path)
  return total, routed


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(moe_every=2),
    dict(moe_every=2, first_dense_layers=1, tie_embeddings=False),
    dict(first_dense_layers=3),                                  # no MoE layer
    dict(moe=_moe(activation="swiglu")),
    dict(moe=_moe(num_shared_experts=2)),
    dict(moe=_moe(granularity=2, activation="swiglu", num_shared_experts=1)),
    dict(moe=_moe(router="dense", num_shared_experts=1), tie_embeddings=False),
    dict(moe=_moe(router="expert_choice", group_by="batch"), moe_every=3),
    dict(head_dim=4, num_heads=3),                               # N P != D
], ids=lambda overrides: ",".join(f"{k}={v}" for k, v in overrides.items()) or "default")
def test_total_matches_the_built_model(overrides):
  args = dict(vocab_size=50, num_layers=3, d_model=24, num_heads=4, moe=_moe())
  args.update(overrides)
  counts = param_counts(**args)
  total, routed = _built_counts(**args)
  assert counts["total"] == total
  assert counts["expert"] == routed
  assert counts["embedding"] + counts["non_embedding"] == counts["total"]
  assert counts["active_per_token"] <= counts["total"]
  assert all(isinstance(value, int) for value in counts.values())


# V = 10, D = 4, N = 2 (P = 2), 2 layers, moe_every = 2: layer 0 dense, layer 1 MoE
# with E = 4 gelu experts of H = 8, top-1, tied embeddings.
SMALL = dict(vocab_size=10, num_layers=2, d_model=4, num_heads=2,
             moe=dict(num_experts=4, top_k=1, expert_hidden=8), moe_every=2)


def test_small_case_by_hand():
  # embedding 10 * 4 = 40
  # per block: norms 2 * 4 = 8, attention 4 * D * N * P = 4 * 4 * 2 * 2 = 64 -> 72; x2 = 144
  # final norm 4
  # layer 0 dense FFN of hidden K H = 8: wi 4 * 8 + wo 8 * 4 = 64
  # layer 1: router 4 * 4 = 16, experts 4 * 64 = 256 (active: 1 * 64)
  # total  = 40 + 144 + 4 + 64 + 16 + 256 = 524
  # active = 40 + 144 + 4 + 64 + 16 + 64  = 332
  assert param_counts(**SMALL) == {"total": 524, "active_per_token": 332, "embedding": 40,
                                   "non_embedding": 484, "expert": 256}
  assert _built_counts(**SMALL) == (524, 256)


def test_small_case_flops_by_hand():
  # 6 * (active non-embedding 332 - 40 + output projection 40) = 1992;
  # attention, causal: 3 * 2 * n_layer 2 * n_ctx 6 * d_attn 4 = 288 -> 2280.
  assert train_flops_per_token(seq_len=6, **SMALL) == 1992 + 288
  # The full (unmasked) score matrix: 3 * 4 * 2 * 6 * 4 = 576.
  assert train_flops_per_token(seq_len=6, causal=False, **SMALL) == 1992 + 576
  # Untied: the output projection is counted once either way (a matmul when tied).
  assert train_flops_per_token(seq_len=6, tie_embeddings=False, **SMALL) == 1992 + 288


def test_active_counts_by_router():
  base = param_counts(**SMALL)
  # Expert choice: capacity_factor 2 experts per token on average: 2 * 64 active.
  ec = dict(SMALL, moe=dict(SMALL["moe"], router="expert_choice", capacity_factor=2.0))
  assert param_counts(**ec)["active_per_token"] == base["active_per_token"] + 64
  # Granularity 2: 8 experts of hidden 4, top-2: the same active expert
  # parameters, a router twice as wide (4 * 8 instead of 4 * 4).
  fine = dict(SMALL, moe=dict(SMALL["moe"], granularity=2))
  assert param_counts(**fine)["active_per_token"] == base["active_per_token"] + 16
  assert param_counts(**fine)["expert"] == base["expert"]
  # The dense baseline: every parameter is active.
  dense = param_counts(**dict(SMALL, moe=dict(SMALL["moe"], router="dense")))
  assert dense["active_per_token"] == dense["total"] == 524 - 16 - 256 + 64
  assert dense["expert"] == 0


def test_validation():
  with pytest.raises(ValueError, match="moe_every"):
    param_counts(**dict(SMALL, moe_every=0))
  with pytest.raises(ValueError, match="granularity"):
    param_counts(**dict(SMALL, moe=dict(SMALL["moe"], granularity=3)))
  with pytest.raises(ValueError, match="seq_len"):
    train_flops_per_token(seq_len=0, **SMALL)
