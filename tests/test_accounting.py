"""scaling.accounting: formula counts against built models and hand computations."""

import warnings

import jax
import pytest
from flax import nnx

from moejax.nn import NonCausalRoutingWarning, TransformerLM
from moejax.scaling import breakdown, counts_from_config, param_counts, train_flops_per_token
from moejax.scaling.accounting import COMPONENTS
from moejax.train import config as config_lib
from moejax import model as model_lib
from moejax import train as trainer


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
  # The breakdown agrees with the totals, component by component.
  parts = breakdown(seq_len=8, batch_size=4, **args)
  params, flops = parts["params"], parts["flops"]
  assert params["total"] == total
  assert params["total_nonembed"] == counts["non_embedding"]
  assert params["embedding"] + params["output"] == counts["embedding"]
  assert params["experts"] == routed
  assert sum(params[name] for name in COMPONENTS) == total
  assert round(params["active_nonembed"]) == counts["active_per_token"] - counts["embedding"]
  assert flops["total"] == pytest.approx(train_flops_per_token(seq_len=8, **args))
  assert flops["attention"] == flops["attention_projections"] + flops["attention_scores"]


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


def test_breakdown_small_case_by_hand():
  # SMALL (above), seq_len 6: one dense layer (FFN 64), one MoE layer (router
  # 16, experts 4 x 64, top-1 so 64 active).
  parts = breakdown(seq_len=6, **SMALL)
  assert parts["params"] == {"embedding": 40, "attention": 128, "router": 16,
                             "experts": 256, "shared_experts": 0, "dense_ffn": 64,
                             "norms": 20, "output": 0, "total": 524,
                             "total_nonembed": 484, "active_nonembed": 292.0}
  flops = parts["flops"]
  assert flops["router"] == 6 * 16
  assert flops["experts"] == 6 * 64
  assert flops["attention"] == 6 * 128 + 288
  assert flops["embedding_output"] == 6 * 40
  assert flops["total"] == train_flops_per_token(seq_len=6, **SMALL) == 2280
  # Capacity (default factor 1.25, S = 6 tokens per sequence group, E = 4, K = 1):
  # C = ceil(1.25 * 6 / 4) = 2 slots, E C = 8 slots for S K = 6 assignments:
  # padding = 384 * (8 / 6 - 1) = 128.
  assert flops["capacity_padding"] == pytest.approx(128)
  assert flops["total_with_padding"] == pytest.approx(2280 + 128)


@pytest.mark.parametrize("moe, padding", [
    (dict(capacity_factor=0.0, dispatch="dropless"), 0.0),     # dropless: no slots
    (dict(capacity_factor=2.0), 6 * 64 * (3 * 4 / 6 - 1)),     # C = 3: +100%
    (dict(capacity_factor=0.5), 6 * 64 * (1 * 4 / 6 - 1)),     # C = 1: 2 of 6 dropped
    # Groups of the B = 4 tokens at one position: C = ceil(1.25 * 4 / 4) = 2.
    (dict(group_by="batch"), 6 * 64 * (2 * 4 / 4 - 1)),
    # Expert choice, factor 1.5, S = 4: C = ceil(1.5) = 2, 8 slots, counted
    # as 1.5 experts per token (96 active parameters): 8 / 6 - 1 more.
    (dict(router="expert_choice", group_by="batch", capacity_factor=1.5),
     6 * 96 * (8 / 6 - 1)),
])
def test_capacity_padding(moe, padding):
  args = dict(SMALL, moe=dict(SMALL["moe"], **moe))
  flops = breakdown(seq_len=6, batch_size=4, **args)["flops"]
  assert flops["capacity_padding"] == pytest.approx(padding)
  assert flops["total"] == pytest.approx(train_flops_per_token(seq_len=6, **args))


def test_breakdown_needs_the_batch_for_batch_groups():
  with pytest.raises(ValueError, match="batch_size"):
    breakdown(seq_len=6, **dict(SMALL, moe=dict(SMALL["moe"], group_by="batch")))


def test_counts_from_config_matches_the_trainer():
  config = config_lib.default_config()
  config.model.moe.granularity = 2
  counts = counts_from_config(config)
  kwargs = model_lib.architecture(config, 512)  # the synthetic corpus's vocabulary
  assert counts["params_total"] == param_counts(**kwargs)["total"]
  assert counts["flops_per_token"] == train_flops_per_token(
      **kwargs, seq_len=config.train.seq_len)
  assert (counts["num_experts"], counts["top_k"], counts["granularity"]) == (16, 4, 2)
  config.data.name, config.data.tokenizer = "tiny_shakespeare", "byte"
  assert counts_from_config(config)["params_embedding"] == 257 * 128
