"""Multi-device checks for tests/test_parallel.py, run in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_worker.py

(the flag must be set before jax starts; the pytest process has one device).
Prints one JSON object: case name -> {"ok": bool, ...details}. Every case
compares a mesh run against the same computation on one device.
"""

import functools
import json
import re
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import dispatch, parallel
from moejax.nn import MoELayer, NonCausalRoutingWarning, TransformerLM
from moejax.routing.config import tokamax_installed

# |got - want| <= RTOL * (|want| + ATOL_FRACTION * max|want|) per leaf: float32
# sums over devices run in another order; the floor scales with the leaf.
RTOL, ATOL_FRACTION = 1e-5, 0.1
MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "1x8x1": (1, 8, 1), "2x2x2": (2, 2, 2),
          "1x1x8": (1, 1, 8)}
ROUTERS = {
    # top-2 with drops: C = ceil(1.0 * 2 * 16 / 8) = 4 slots for 32 choices per group.
    "topk": dict(router="topk", top_k=2, capacity_factor=1.0),
    "switch": dict(router="switch", top_k=1, capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice", top_k=1, capacity_factor=1.0),
    "dropless": dict(router="topk", top_k=2, capacity_factor=0.0, dispatch="dropless"),
}
NUM_EXPERTS, D_MODEL, HIDDEN, BATCH, LENGTH = 8, 12, 16, 8, 16


def mesh_config(shape):
  """(data, expert, model) or (data, fsdp, expert, model) -> config.mesh."""
  names = parallel.AXES if len(shape) == 4 else ("data", "expert", "model")
  return dict(zip(names, shape))


def max_rel_error(a, b) -> float:
  """Largest |a - b| in units of the tolerance over all leaves; <= 1 passes."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    floor = ATOL_FRACTION * np.max(np.abs(y), initial=0) + 1e-30
    worst = max(worst, float(np.max(np.abs(x - y) / (RTOL * (np.abs(y) + floor)),
                                    initial=0)))
  return worst


def layer_loss_fn(graphdef, cotangent):
  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return jnp.sum(y * cotangent) + 10.0 * aux["weighted_loss"], aux
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


_ONE_DEVICE_CACHE = {}


def one_device(layer_kwargs, block_size=None):
  """(graphdef, params, x, cotangent, ((loss, aux), grads)) without a mesh."""
  key = json.dumps(dict(layer_kwargs, block_size=block_size), sort_keys=True)
  if key not in _ONE_DEVICE_CACHE:
    layer = MoELayer(d_model=D_MODEL, num_experts=NUM_EXPERTS, expert_hidden=HIDDEN,
                     rngs=nnx.Rngs(0), **layer_kwargs)
    if block_size is not None:  # block_size=1: ragged_dot, the GPU/TPU dropless path
      layer._dispatcher = functools.partial(dispatch.dropless_dispatch,
                                            block_size=block_size)
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, D_MODEL))
    cotangent = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, D_MODEL))
    expected = layer_loss_fn(graphdef, cotangent)(params, x)
    _ONE_DEVICE_CACHE[key] = graphdef, params, x, cotangent, expected
  return _ONE_DEVICE_CACHE[key]


def layer_case(mesh_shape, router_kwargs, axis_types, block_size=None, **layer_kwargs):
  graphdef, params, x, cotangent, expected = one_device(
      dict(router_kwargs, **layer_kwargs), block_size)

  mesh = parallel.make_mesh(mesh_config(mesh_shape), axis_types=axis_types)
  with parallel.activate(mesh):
    params = parallel.shard_like(params, parallel.param_shardings(params, mesh))
    x = parallel.shard_like(x, parallel.batch_sharding(mesh))
    compiled = layer_loss_fn(graphdef, cotangent).lower(params, x).compile()
    got = compiled(params, x)
    hlo = compiled.as_text()
  (loss, aux), grads = got
  (loss_1, aux_1), grads_1 = expected
  errors = {"loss": max_rel_error(loss, loss_1), "aux": max_rel_error(aux, aux_1),
            "grads": max_rel_error(grads, grads_1)}
  assert set(aux) == set(aux_1), (sorted(aux), sorted(aux_1))
  return {"ok": max(errors.values()) <= 1.0, "errors": errors,
          "num_all_to_all": count_all_to_all(hlo),
          "aux": {k: np.asarray(v).tolist() for k, v in aux.items()}}


def count_all_to_all(hlo: str) -> int:
  """all-to-all instructions (the op, not instruction names or their uses)."""
  return len(re.findall(r"[) ]all-to-all(-start)?\(", hlo))


def all_gathered_shapes(hlo: str) -> set[tuple[int, ...]]:
  """Result and operand array shapes of every all-gather in an HLO module."""
  shapes = set()
  for line in hlo.splitlines():
    if re.search(r"\ball-gather(-start)?\(", line):
      for dims in re.findall(r"\b(?:pred|[sfu]\d+|bf16)\[([\d,]*)\]", line):
        shapes.add(tuple(int(d) for d in dims.split(",") if d))
  return shapes


LM_VOCAB, LM_D_MODEL, LM_HEADS, LM_HIDDEN, LM_EXPERTS = 64, 32, 4, 48, 8
_LM_CACHE = {}


def lm_one_device():
  """(graphdef, params, tokens, loss, (loss, grads)) of a 2-layer LM (a dense
  layer, then an MoE layer with a shared expert) without a mesh."""
  if not _LM_CACHE:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", NonCausalRoutingWarning)
      model = TransformerLM(
          vocab_size=LM_VOCAB, num_layers=2, d_model=LM_D_MODEL, num_heads=LM_HEADS,
          moe=dict(num_experts=LM_EXPERTS, top_k=2, expert_hidden=LM_HIDDEN,
                   capacity_factor=1.0, num_shared_experts=1),
          moe_every=2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(3), (8, 16), 0, LM_VOCAB)

    def loss(params, tokens):
      logits, aux = nnx.merge(graphdef, params)(tokens)
      log_probs = jax.nn.log_softmax(logits[:, :-1])
      nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
      return jnp.mean(nll) + aux["weighted_loss"]

    expected = jax.jit(jax.value_and_grad(loss))(params, tokens)
    _LM_CACHE["lm"] = graphdef, params, tokens, loss, expected
  return _LM_CACHE["lm"]


def lm_case(axis_types, mesh_shape=(2, 4, 1)):
  """A TransformerLM train-step gradient on a mesh vs one device; expert
  kernels are never all-gathered, nor (with "model" > 1) attention heads."""
  _, params, tokens, loss, expected = lm_one_device()
  _, experts_split, model_split = mesh_shape
  mesh = parallel.make_mesh(mesh_config(mesh_shape), axis_types=axis_types)
  with parallel.activate(mesh):
    params = parallel.shard_like(params, parallel.param_shardings(params, mesh))
    tokens = parallel.shard_like(tokens, parallel.batch_sharding(mesh))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    got = compiled(params, tokens)
    hlo = compiled.as_text()
    # The detector itself: gathering an expert kernel on purpose is seen.
    kernel = params["layers"][1]["ffn"]["experts"]["wi"][...]
    gather = jax.jit(lambda w: w + 1.0, out_shardings=jax.NamedSharding(
        mesh, jax.P())).lower(kernel).compile().as_text()
  experts, d_model, hidden = LM_EXPERTS, LM_D_MODEL, LM_HIDDEN
  kernel_shapes = {(experts, d_model, hidden), (experts, hidden, d_model),
                   (experts // experts_split, d_model, hidden),
                   (experts // experts_split, hidden, d_model),
                   (experts // experts_split, d_model, hidden // model_split),
                   (experts // experts_split, hidden // model_split, d_model)}
  head_dim = d_model // LM_HEADS
  head_shapes = {(d_model, 3, LM_HEADS, head_dim), (d_model, LM_HEADS, head_dim),
                 (LM_HEADS, head_dim, d_model), (d_model, 3 * d_model)}
  gathered_shapes = all_gathered_shapes(hlo)
  gathered = sorted(gathered_shapes & kernel_shapes)
  gathered_heads = sorted(gathered_shapes & head_shapes) if model_split > 1 else []
  detector_works = (experts, d_model, hidden) in all_gathered_shapes(gather)
  errors = {"loss": max_rel_error(got[0], expected[0]),
            "grads": max_rel_error(got[1], expected[1])}
  return {"ok": (not gathered and not gathered_heads and detector_works
                 and max(errors.values()) <= 1.0),
          "errors": errors, "num_all_to_all": count_all_to_all(hlo),
          "detector_works": detector_works,
          "gathered_expert_kernels": [list(s) for s in gathered],
          "gathered_attention_kernels": [list(s) for s in gathered_heads],
          "all_gathered_shapes": sorted(list(s) for s in gathered_shapes)}


def ragged_lowering_case(mesh_shape=(2, 4, 1)):
  """The GPU/TPU dropless exchange (`jax.lax.ragged_all_to_all`) traces,
  differentiates and lowers; XLA:CPU cannot compile it, so this checks the
  lowered StableHLO: two exchanges forward, two backward, each within the
  groups of devices along the expert axis."""
  graphdef, params, x, cotangent, _ = one_device(
      dict(ROUTERS["dropless"], dropless_exchange="ragged"))
  mesh = parallel.make_mesh(mesh_config(mesh_shape))
  with parallel.activate(mesh):
    params = parallel.shard_like(params, parallel.param_shardings(params, mesh))
    x = parallel.shard_like(x, parallel.batch_sharding(mesh))
    text = layer_loss_fn(graphdef, cotangent).lower(params, x).as_text()
  calls = [line for line in text.splitlines() if "@ragged_all_to_all(" in line]
  groups = {re.search(r"replica_groups = dense<(.*?)>", line).group(1).replace(" ", "")
            for line in calls}
  expected = json.dumps(np.arange(8).reshape(mesh_shape).transpose(0, 2, 1)
                        .reshape(-1, mesh_shape[1]).tolist()).replace(" ", "")
  return {"ok": len(calls) == 4 and groups == {expected}, "calls": len(calls),
          "replica_groups": sorted(groups), "expected_groups": expected}


def ragged_reference_docstring_case():
  """`collectives.ragged_all_to_all_reference` on the example of the
  `jax.lax.ragged_all_to_all` docstring (axis of size 2)."""
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  args = [[[1, 2, 2], [3, 4, 0]], [[0, 0, 0, 0]] * 2, [[0, 1], [0, 1]], [[1, 2], [1, 1]],
          [[0, 0], [1, 2]], [[1, 1], [2, 1]]]
  args = [jax.device_put(jnp.asarray(a, jnp.float32 if i < 2 else jnp.int32).reshape(-1),
                         jax.NamedSharding(mesh, jax.P("x"))) for i, a in enumerate(args)]
  fn = jax.shard_map(functools.partial(parallel.collectives.ragged_all_to_all_reference,
                                       axis_name="x"),
                     mesh=mesh, in_specs=jax.P("x"), out_specs=jax.P("x"))
  got = np.asarray(jax.jit(fn)(*args)).reshape(2, 4).tolist()
  return {"ok": got == [[1, 3, 0, 0], [2, 2, 4, 0]], "got": got}


def indivisible_groups_case():
  """4 groups cannot split over data*expert = 8 devices in training."""
  layer = MoELayer(d_model=D_MODEL, num_experts=NUM_EXPERTS, expert_hidden=HIDDEN,
                   top_k=2, rngs=nnx.Rngs(0))
  mesh = parallel.make_mesh(mesh_config((2, 4, 1)))
  try:
    with parallel.activate(mesh):
      jax.jit(lambda x: layer(x, deterministic=False)[0])(jnp.ones((4, LENGTH, D_MODEL)))
  except ValueError as error:
    message = str(error)
    return {"ok": ("routing groups" in message and "8 devices" in message
                   and "config.train.batch_size" in message and "\n" not in message),
            "message": message}
  return {"ok": False, "message": "no error"}


def few_groups_case(mesh_shape, router_kwargs, batch=4, **layer_kwargs):
  """Inference on fewer groups than batch devices (here 4 sequences on
  data*expert = 8 devices): the groups split over the axes that divide them and
  repeat on the others; forward and gradients match one device."""
  layer = MoELayer(d_model=D_MODEL, num_experts=NUM_EXPERTS, expert_hidden=HIDDEN,
                   rngs=nnx.Rngs(0), **router_kwargs, **layer_kwargs)
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (batch, LENGTH, D_MODEL))
  cotangent = jax.random.normal(jax.random.key(2), (batch, LENGTH, D_MODEL))
  step = layer_loss_fn(graphdef, cotangent)
  expected = step(params, x)
  mesh = parallel.make_mesh(mesh_config(mesh_shape))
  with parallel.activate(mesh):
    params = parallel.shard_like(params, parallel.param_shardings(params, mesh))
    got = layer_loss_fn(graphdef, cotangent)(params, x)
  errors = {"forward": max_rel_error(got[0], expected[0]),
            "grads": max_rel_error(got[1], expected[1])}
  return {"ok": max(errors.values()) <= 1.0, "errors": errors}


DECODE_ROUTERS = {  # routing at decode time (moejax.generate builds group_by="batch")
    "capacity": dict(top_k=2, capacity_factor=1.0, group_by="batch"),
    "dropless": dict(top_k=2, capacity_factor=0.0, dispatch="dropless", group_by="batch"),
}
_DECODE_CACHE = {}


def _decode_model(router_name):
  if router_name not in _DECODE_CACHE:
    model = TransformerLM(  # 8 heads: split over 8 "model" devices
        vocab_size=LM_VOCAB, num_layers=1, d_model=LM_D_MODEL, num_heads=8,
        moe=dict(num_experts=LM_EXPERTS, expert_hidden=LM_HIDDEN, num_shared_experts=1,
                 **DECODE_ROUTERS[router_name]), rngs=nnx.Rngs(0))
    _DECODE_CACHE[router_name] = nnx.split(model)
  return _DECODE_CACHE[router_name]


def decode_case(mesh_shape, router_name, batch=8, prompt=2, length=4):
  """`TransformerLM.decode` (a prompt, then one token a step, from
  `init_cache`) under a mesh gives the logits of the full forward pass on
  one device. With batch=1 the tokens are not split (one prompt)."""
  graphdef, params = _decode_model(router_name)
  tokens = jax.random.randint(jax.random.key(4), (batch, length), 0, LM_VOCAB)

  def decode(params, tokens):
    model = nnx.merge(graphdef, params)
    logits, cache = model.decode(tokens[:, :prompt], model.init_cache(batch, length))
    steps = [logits]
    for position in range(prompt, length):
      logits, cache = model.decode(tokens[:, position:position + 1], cache)
      steps.append(logits)
    return jnp.concatenate(steps, axis=1), cache["keys"]

  want = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens)
  mesh = parallel.make_mesh(mesh_config(mesh_shape))
  with parallel.activate(mesh):
    params = parallel.shard_like(params, parallel.param_shardings(params, mesh))
    if batch % (mesh_shape[0] * mesh_shape[1]) == 0:
      tokens = parallel.shard_like(tokens, parallel.batch_sharding(mesh))
    got, keys = jax.jit(decode)(params, tokens)
  error = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
  heads_split = keys.sharding.spec[2] if len(keys.sharding.spec) > 2 else None
  return {"ok": error <= 1e-5 and (mesh_shape[2] == 1 or heads_split == "model"),
          "max_abs_error": error, "cache_spec": str(keys.sharding.spec)}


def masked_lm_case(mesh_shape):
  """Evaluation (deterministic, a padding mask that leaves the shards
  different numbers of real tokens): logits, losses and every router metric as
  on one device."""
  model = TransformerLM(vocab_size=LM_VOCAB, num_layers=1, d_model=LM_D_MODEL,
                        num_heads=LM_HEADS, rngs=nnx.Rngs(0),
                        moe=dict(num_experts=LM_EXPERTS, expert_hidden=LM_HIDDEN, top_k=2,
                                 capacity_factor=1.0, group_by="batch"))
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(5), (8, 16), 0, LM_VOCAB)
  mask = jnp.arange(16)[None, :] < jnp.array([16, 2, 16, 9, 0, 16, 5, 16])[:, None]
  forward = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, mask=m))
  expected = forward(params, tokens, mask)
  mesh = parallel.make_mesh(mesh_config(mesh_shape))
  with parallel.activate(mesh):
    params = parallel.shard_like(params, parallel.param_shardings(params, mesh))
    tokens, mask = (parallel.shard_like(a, parallel.batch_sharding(mesh))
                    for a in (tokens, mask))
    got = forward(params, tokens, mask)
  errors = {jax.tree_util.keystr(path): max_rel_error(a, b) for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected), strict=True)}
  return {"ok": max(errors.values()) <= 1.0,
          "errors": {k: v for k, v in errors.items() if v > 1.0}}


def noisy_case():
  """Router jitter and noise under a mesh: runs, finite, differs per shard."""
  layer = MoELayer(d_model=D_MODEL, num_experts=NUM_EXPERTS, expert_hidden=HIDDEN,
                   top_k=2, jitter=0.1, noise_std=1.0, rngs=nnx.Rngs(0))
  mesh = parallel.make_mesh(mesh_config((2, 4, 1)))
  # Every sequence is the same, so only the noise can make shards differ.
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, LENGTH, D_MODEL)),
                       (BATCH, LENGTH, D_MODEL))
  with parallel.activate(mesh):
    y, aux = jax.jit(lambda x, key: layer(x, deterministic=False, rng=key))(
        x, jax.random.key(0))
  y = np.asarray(y).reshape(BATCH, LENGTH, D_MODEL)
  return {"ok": bool(np.all(np.isfinite(y))) and not np.allclose(y[0], y[1]),
          "aux_loss": float(aux["aux_loss"])}


def lora_dropless_case(mesh_shape, targets="router"):
  """LoRA with the dropless dispatcher (`lora.attach` traces the adapters'
  creation as on one device over a replicated base): adapter gradients as on
  one device."""
  from moejax import model as model_lib  # pylint: disable=import-outside-toplevel
  from moejax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from moejax.train import lora  # pylint: disable=import-outside-toplevel
  config = config_lib.default_config()
  config.model.update(d_model=LM_D_MODEL, num_layers=1, num_heads=LM_HEADS)
  config.model.moe.update(num_experts=LM_EXPERTS, expert_hidden=LM_HIDDEN, group_by="batch",
                          capacity_factor=0.0, dispatch="dropless", bias_update_rate=0.01)
  config.train.update(batch_size=8, seq_len=16)
  config.finetune.base = "/unused"
  config.finetune.lora.update(rank=4, targets=targets)
  config.mesh.update(mesh_config(mesh_shape))
  config_lib.validate_config(config)
  graphdef, _ = model_lib.abstract(config, LM_VOCAB)
  params = jax.jit(lambda: nnx.split(model_lib.build(config, LM_VOCAB, nnx.Rngs(0)))[1])()
  tokens = jax.random.randint(jax.random.key(6), (8, 16), 0, LM_VOCAB)

  def loss(adapters, frozen, tokens, graphdef):
    logits, aux = nnx.merge(graphdef, adapters, frozen)(tokens)
    return jnp.mean(jnp.square(logits)) + aux["weighted_loss"]

  one = lora.apply(nnx.merge(graphdef, params), config, tokens)
  one_graphdef, one_state = nnx.split(one)
  adapters, frozen = lora.split(one_state)
  # B starts at zero (no gradient reaches A): move it so that both count.
  adapters = jax.tree.map(lambda a: a + 0.1, adapters)
  step = jax.jit(jax.value_and_grad(loss), static_argnums=3)
  expected = step(adapters, frozen, tokens, one_graphdef)
  mesh = parallel.make_mesh(mesh_config(mesh_shape))
  with parallel.activate(mesh):
    lora_graphdef, mesh_adapters, mesh_frozen = lora.attach(
        config, LM_VOCAB, mesh, graphdef, params, scanned=False)
    mesh_adapters = jax.tree.map(lambda a: a + 0.1, mesh_adapters)
    tokens = parallel.shard_like(tokens, parallel.batch_sharding(mesh))
    got = step(mesh_adapters, mesh_frozen, tokens, lora_graphdef)
  errors = {"loss": max_rel_error(got[0], expected[0]),
            "grads": max_rel_error(got[1], expected[1])}
  return {"ok": max(errors.values()) <= 1.0, "errors": errors,
          "adapters": sorted(lora.adapter_counts(mesh_adapters))}


def cases():
  for mesh_name, shape in MESHES.items():
    for router_name, router_kwargs in ROUTERS.items():
      if mesh_name == "1x1x8" and router_name != "topk":
        continue  # model parallel only: the routers are covered by 2x2x2
      yield f"layer/{mesh_name}/{router_name}/explicit", (
          lambda s=shape, r=router_kwargs: layer_case(s, r, "explicit"))
  for router_name, router_kwargs in ROUTERS.items():
    yield f"layer/2x2x2/{router_name}/auto", (
        lambda r=router_kwargs: layer_case((2, 2, 2), r, "auto"))
  yield "layer/2x4x1/dropless_ragged_dot/explicit", lambda: layer_case(
      (2, 4, 1), ROUTERS["dropless"], "explicit", block_size=1)
  ragged = dict(ROUTERS["dropless"], dropless_exchange="ragged_reference")
  for mesh_name in ("2x4x1", "1x8x1", "2x2x2"):
    yield f"layer/{mesh_name}/dropless_ragged_reference/explicit", (
        lambda s=MESHES[mesh_name]: layer_case(s, ragged, "explicit"))
  yield "layer/2x2x2/dropless_ragged_reference/auto", lambda: layer_case(
      (2, 2, 2), ragged, "auto")
  yield "layer/2x4x1/dropless_ragged_reference_ragged_dot/explicit", lambda: layer_case(
      (2, 4, 1), ragged, "explicit", block_size=1)
  if tokamax_installed():  # grouped_matmul="tokamax" inside shard_map, both exchanges
    tokamax = dict(ROUTERS["dropless"], grouped_matmul="tokamax")
    yield "layer/2x4x1/dropless_tokamax/explicit", lambda: layer_case(
        (2, 4, 1), tokamax, "explicit")
    yield "layer/2x2x2/dropless_ragged_reference_tokamax/explicit", lambda: layer_case(
        (2, 2, 2), dict(tokamax, dropless_exchange="ragged_reference"), "explicit")
  yield "ragged_reference/docstring_example", ragged_reference_docstring_case
  yield "lowered/2x4x1/dropless_ragged", ragged_lowering_case
  yield "lowered/2x2x2/dropless_ragged", lambda: ragged_lowering_case((2, 2, 2))
  yield "layer/2x4x1/einsum/explicit", lambda: layer_case(
      (2, 4, 1), dict(ROUTERS["topk"], dispatch="einsum"), "explicit")
  yield "layer/2x2x2/swiglu_shared_batch/auto", lambda: layer_case(
      (2, 2, 2), ROUTERS["topk"], "auto", activation="swiglu", num_shared_experts=1,
      group_by="batch")
  yield "layer/2x4x1/swiglu_shared_batch/explicit", lambda: layer_case(
      (2, 4, 1), ROUTERS["topk"], "explicit", activation="swiglu", num_shared_experts=1,
      group_by="batch")
  # group_by="batch" with groups of S sequences, S dividing each device's
  # rows: the groups are the device's own rows, so no transpose of the batch
  # is added (the check of the expert exchange's all-to-all count applies).
  yield "layer/2x2x2/local_position_groups/explicit", lambda: layer_case(
      (2, 2, 2), ROUTERS["topk"], "explicit", group_by="batch", group_size=2)
  yield "lm/2x4x1/auto", lambda: lm_case("auto")
  yield "lm/2x4x1/explicit", lambda: lm_case("explicit")
  yield "lm/2x2x2/auto", lambda: lm_case("auto", (2, 2, 2))
  yield "lm/2x2x2/explicit", lambda: lm_case("explicit", (2, 2, 2))
  yield "indivisible_groups", indivisible_groups_case
  yield "few_groups/2x4x1/capacity", lambda: few_groups_case((2, 4, 1), ROUTERS["topk"])
  yield "few_groups/1x8x1/dropless", lambda: few_groups_case((1, 8, 1), ROUTERS["dropless"])
  # moejax.generate's default mesh (heads split), then batch axes with one
  # group per step: repeated over the expert axis (grouped rows, then buffers).
  yield "decode/1x1x8/capacity", lambda: decode_case((1, 1, 8), "capacity")
  yield "decode/2x4x1/dropless", lambda: decode_case((2, 4, 1), "dropless")
  yield "decode/2x2x2/capacity_one_sequence", lambda: decode_case(
      (2, 2, 2), "capacity", batch=1)
  yield "masked_lm/2x2x2", lambda: masked_lm_case((2, 2, 2))
  yield "lora/2x2x2/dropless_router", lambda: lora_dropless_case((2, 2, 2))
  yield "noisy", noisy_case


def case_names() -> list[str]:
  return [name for name, _ in cases()]


def main(selected):
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  results = {}
  for name, case in cases():
    if selected and not any(re.search(pattern, name) for pattern in selected):
      continue
    start = time.perf_counter()
    try:
      results[name] = case()
    except Exception:  # pylint: disable=broad-except
      results[name] = {"ok": False, "error": traceback.format_exc(limit=-8)}
    results[name]["seconds"] = round(time.perf_counter() - start, 2)
    print(name, results[name]["ok"], results[name]["seconds"], file=sys.stderr, flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1:])
