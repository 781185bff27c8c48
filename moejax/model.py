"""The model of a run config: build it, lay it on a mesh, count it.

One owner for what every tool needs from `config.model` (the trainer, the
evaluator, generation, upcycling, LoRA, the studies and the benchmarks):

    cfg = model.model_config(config)                 # the typed ModelConfig
    mesh = model.make_mesh(config)                   # validated against the model
    graphdef, params = model.init_params(config, vocab_size, mesh)
    graphdef, params, opt_state = model.abstract_state(config, vocab_size, mesh, tx)

Initialization is a function of `config.seed` only: threefry random bits do
not depend on the sharding or on `scan_layers`, so every mesh and either layer
layout start from the same parameters.
"""

import math
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from moejax import parallel
from moejax import routing
from moejax.nn.config import ModelConfig
from moejax.nn.transformer import TransformerLM
from moejax.scaling import accounting
from moejax.train import steps


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The validated `ModelConfig` of a run config (ValueError names the key)."""
  return ModelConfig.from_mapping(config.model)


def tokens_per_group(config: ml_collections.ConfigDict) -> int:
  """S, the tokens of one routing group at the run's batch shape."""
  return accounting.tokens_per_group(config.model.moe, seq_len=config.train.seq_len,
                                     batch_size=config.train.batch_size)


def architecture(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Any]:
  """The keywords of the accounting (`scaling.accounting.param_counts`, ...)."""
  return model_config(config).architecture(vocab_size, tokens_per_group(config))


def build(config: ml_collections.ConfigDict, vocab_size: int,
          rngs: nnx.Rngs) -> TransformerLM:
  """The LM a run config describes. Invalid model keys raise ValueError naming
  their section."""
  try:
    cfg = model_config(config)
    kwargs = cfg.architecture(vocab_size, tokens_per_group(config))
    kwargs["moe"] = cfg.moe
    return TransformerLM(**kwargs, rope_base=cfg.rope_base, rope=cfg.rope,
                         rms_norm_eps=cfg.rms_norm_eps,
                         dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers,
                         remat=cfg.remat, rngs=rngs)
  except (ValueError, TypeError) as e:
    if str(e).startswith("config.model"):
      raise ValueError(f"invalid {e}") from e
    section = ("config.model.moe" if any(key in str(e) for key in config.model.moe)
               else "config.model")
    raise ValueError(f"invalid {section}: {e}") from e


def abstract(config: ml_collections.ConfigDict, vocab_size: int):
  """(graphdef, abstract state) of the model: shapes and dtypes only, nothing
  allocated or compiled. Also the model check of a config."""
  return nnx.split(nnx.eval_shape(lambda: build(config, vocab_size, nnx.Rngs(config.seed))))


def check(config: ml_collections.ConfigDict, vocab_size: int) -> None:
  """Builds the model abstractly: ValueError names a bad model key."""
  abstract(config, vocab_size)


def init_params(config: ml_collections.ConfigDict, vocab_size: int,
                mesh: jax.sharding.Mesh):
  """(graphdef, parameters) created directly in their shardings on `mesh`."""
  graphdef, shapes = abstract(config, vocab_size)
  shardings = parallel.param_shardings(shapes, mesh)
  params = jax.jit(lambda: nnx.split(build(config, vocab_size, nnx.Rngs(config.seed)))[1],
                   out_shardings=shardings)()
  return graphdef, params


def restore_target(config: ml_collections.ConfigDict, vocab_size: int,
                   mesh: jax.sharding.Mesh):
  """(graphdef, abstract parameters carrying their shardings on `mesh`): what
  a checkpoint restore fills."""
  graphdef, shapes = abstract(config, vocab_size)
  shardings = parallel.param_shardings(shapes, mesh)
  target = jax.tree.map(
      lambda s, variable: jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), variable),
      shardings, shapes)
  return graphdef, target


def abstract_state(config: ml_collections.ConfigDict, vocab_size: int,
                   mesh: jax.sharding.Mesh, tx) -> tuple[Any, Any, Any]:
  """(graphdef, parameters, optimizer state of `tx`) of a fresh run on
  `mesh`, as `jax.ShapeDtypeStruct`s carrying their shardings: nothing is
  allocated or computed, so `mesh` may hold compile-only devices
  (`moejax.aot`). The shapes and shardings are those the trainer creates."""
  graphdef, params = restore_target(config, vocab_size, mesh)
  with parallel.activate(mesh):
    opt_state = jax.eval_shape(lambda p: tx.init(steps.trainable(p)), params)
  return graphdef, params, opt_state


def make_mesh(config: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None, *,
              training: bool = True) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over `devices` (default: all), validated
  against the model (experts, heads and hidden widths divide over their axes)
  and the batch; for `training`, also the routing groups (a group never spans
  devices in training; inference repeats groups that do not split)."""
  moe, model = config.model.moe, config.model
  devices = list(jax.devices() if devices is None else devices)
  routed = routing.get_router(moe.router).routed
  sizes = parallel.validate_mesh_config(
      config.mesh, num_devices=len(devices),
      num_experts=moe.num_experts * moe.granularity if routed else None,
      num_heads=model.num_heads, num_kv_heads=model.get("num_kv_heads"),
      expert_hidden=moe.expert_hidden // moe.granularity)
  batch_shards = parallel.mesh.batch_shards(sizes)
  if config.train.batch_size % batch_shards:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} is not divisible "
                     f"by {parallel.mesh.batch_shards_name(sizes)} = {batch_shards}")
  if training and routed:
    parallel.check_routing_groups(sizes, moe, config.train)
  return parallel.make_mesh(config.mesh, devices=devices)


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the batch mesh axes
  (every array of a nested batch, e.g. a replay's "routes")."""
  return jax.tree.map(lambda value: jax.make_array_from_process_local_data(sharding, value),
                      local_batch)


def _reader_sizes(config, batch_size: int, num_devices: int) -> Optional[dict[str, int]]:
  """Mesh sizes over `num_devices` for a reader's batch, or None."""
  data = math.gcd(num_devices, batch_size)
  rest = num_devices // data
  moe = config.model.moe
  heads = (config.model.num_heads, config.model.get("num_kv_heads") or config.model.num_heads)
  if (all(n % rest == 0 for n in heads)
      and (moe.expert_hidden // moe.granularity) % rest == 0):
    return {"data": data, "fsdp": 1, "expert": 1, "model": rest}
  if (routing.get_router(moe.router).routed
      and (moe.num_experts * moe.granularity) % rest == 0
      and batch_size % num_devices == 0):  # the batch splits over expert too
    return {"data": data, "fsdp": 1, "expert": rest, "model": 1}
  return None


def reader_mesh(config: ml_collections.ConfigDict, batch_size: int,
                devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """The one mesh policy of the tools that read a trained model (evaluate,
  generate, the studies), for batches of `batch_size` rows: as many devices on
  `data` as divide the batch, the rest on `model` (heads and expert hidden
  units) where they divide, else on `expert`; when neither divides, the
  largest share of the devices (a divisor of their number) where they do."""
  devices = list(jax.devices() if devices is None else devices)
  for count in sorted((d for d in range(1, len(devices) + 1) if len(devices) % d == 0),
                      reverse=True):
    sizes = _reader_sizes(config, batch_size, count)
    if sizes is not None:
      mesh_config = ml_collections.ConfigDict(config.to_dict())
      mesh_config.mesh.update(sizes)
      mesh_config.train.batch_size = batch_size
      return make_mesh(mesh_config, devices[:count], training=False)
  raise AssertionError("one device always fits")
