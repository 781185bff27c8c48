"""Sparse upcycling (Komatsuzaki et al. 2023): an MoE run initialized from a dense one.

`config.init.upcycle_from=DIR` starts a new run (a workdir without
checkpoints) from the newest checkpoint of the dense run in DIR:

  dense parameter                         MoE parameter
  embed, output_kernel, final_norm        the same (copied)
  layer i: attention, both norms          the same (copied)
  layer i dense FFN (ffn/ffn/wi, wo, ...) MoE layer i: every expert
                                          (ffn/experts/wi, wo, ...) a copy, plus
                                          noise if config.init.upcycle_noise > 0;
                                          dense layer i (moe_every, first
                                          dense layers): the same (copied;
                                          its width top_k * expert_hidden
                                          must equal the dense run's, so
                                          top_k=1 there)
  —                                       routers: the MoE model's own fresh
                                          initialization (config.seed)

With `granularity` G > 1 the dense hidden units are cut into G slices and
fine-grained expert e * G + g copies slice g (its hidden width is the slice's).
The source must be dense everywhere (`model.moe.router="dense"`) with a hidden
width of `top_k * expert_hidden` equal to the target's `expert_hidden` (a
dense run with `top_k=1` and the MoE run's `expert_hidden`); every other
shape must match (vocabulary, width, heads, layers), and every dense weight
must have a place (an untied output kernel is not dropped into a tied model,
nor a dense run's shared FFN into a model without one). Shared experts are not
mapped (the paper has none): a target with `num_shared_experts > 0` is refused.
Either layer layout (`model.scan_layers`) works on either side.

Noise: each copied expert kernel gets `upcycle_noise * std(kernel) * N(0, 1)`,
independently per expert (keys from config.seed), so that experts can differ
from step 0; 0 (the default, and the paper's choice) copies exactly.

The optimizer state and the data iterator start fresh (step 0), as for any new
run; the learning-rate schedule is the new run's. A resumed upcycled run
resumes from its own checkpoints and never reads DIR again.
"""

import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moejax import run as run_lib
from moejax.nn import transformer as transformer_lib
from moejax.nn.config import ModelConfig
from moejax.train import checkpoints

# Written into the new run's workdir when it is upcycled: the dense run and step.
RECORD_FILE = "upcycled_from.json"
_EXPERTS = re.compile(r"^(layers/\d+/ffn)/experts/(\w+)$")


def source_config(workdir: str) -> tuple[int, ml_collections.ConfigDict]:
  """(newest step, its config) of the dense run to upcycle; ValueError names
  what is missing."""
  # Checked here, not in validate_config: a resumed upcycled run never reads it.
  if not os.path.isdir(workdir):
    raise ValueError(f"config.init.upcycle_from={workdir!r} is not a directory (a dense "
                     f"run's workdir)")
  try:
    return run_lib.Run(workdir).newest()
  except run_lib.RunError as e:
    raise ValueError(f"config.init.upcycle_from={workdir!r}: {e}") from None


def check_source(source: ml_collections.ConfigDict, target: ml_collections.ConfigDict,
                 workdir: str) -> None:
  """ValueError unless `source` is a dense model whose FFN an expert of
  `target` can copy."""
  where = f"config.init.upcycle_from={workdir!r}"
  moe = source.model.moe
  if moe.router != "dense":
    raise ValueError(f"{where} is not a dense run (its model.moe.router={moe.router!r}); "
                     f"upcycling copies a dense FFN into every expert")
  dense_hidden = moe.top_k * moe.expert_hidden
  if dense_hidden != target.model.moe.expert_hidden:
    raise ValueError(f"{where}: its dense FFN hidden width top_k * expert_hidden = "
                     f"{moe.top_k} * {moe.expert_hidden} = {dense_hidden} differs from "
                     f"config.model.moe.expert_hidden={target.model.moe.expert_hidden}; "
                     f"an expert copies the dense FFN, so they must be equal")
  if target.model.moe.num_shared_experts:
    raise ValueError("config.init.upcycle_from: upcycling maps the dense FFN to the routed "
                     "experts only; set config.model.moe.num_shared_experts=0")


def _flat(tree) -> dict[str, Any]:
  return {"/".join(map(str, k)): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _layout_args(config) -> dict[str, Any]:
  return ModelConfig.from_mapping(config.model, check=False).layout_args


def _expert_copies(name: str, value, dense_flat: dict, dense_name: str, granularity: int,
                   noise: float, key) -> jax.Array:
  """<float32>[E, ...] the experts of `name`: expert e is slice e % granularity
  (of the hidden units) of the dense kernel `dense_name`, plus noise."""
  if dense_name not in dense_flat:
    raise ValueError(f"upcycling: the dense checkpoint has no {dense_name} to copy into "
                     f"{name}")
  source = jnp.asarray(dense_flat[dense_name], jnp.float32)  # [in, out]
  hidden_axis = 0 if dense_name.endswith("/wo") else 1  # the FFN hidden units
  slices = jnp.split(source, granularity, axis=hidden_axis)
  copies = jnp.stack([slices[e % granularity] for e in range(value.shape[0])])
  if copies.shape != value.shape:
    raise ValueError(f"upcycling: {name} has shape {tuple(value.shape)}, but copies of "
                     f"{dense_name} {tuple(source.shape)} cut into {granularity} slices "
                     f"make {tuple(copies.shape)}")
  if noise:
    copies = copies + noise * jnp.std(source) * jax.random.normal(key, copies.shape)
  return copies


def upcycle_params(dense: dict, fresh: dict, *, granularity: int = 1, noise: float = 0.0,
                   key: jax.Array | None = None) -> dict:
  """The MoE parameters (a pure nested dict, unscanned layout) from a dense
  model's (same layout) and the MoE model's fresh ones (for the routers);
  see the module docstring. ValueError names a parameter that does not fit."""
  dense_flat, fresh_flat = _flat(dense), _flat(fresh)
  if noise and key is None:
    raise ValueError("upcycling: noise > 0 needs a key")
  dense_layers, fresh_layers = _num_layers(dense_flat), _num_layers(fresh_flat)
  if dense_layers != fresh_layers:
    raise ValueError(f"upcycling: config.model.num_layers={fresh_layers}, but the dense "
                     f"checkpoint has {dense_layers} layers (layer i is upcycled from dense "
                     f"layer i)")
  used = set()  # dense parameters that went somewhere
  out = {}
  for index, (name, value) in enumerate(sorted(fresh_flat.items())):
    match = _EXPERTS.match(name)
    if "/ffn/router/" in name:
      out[name] = value
      continue
    if match is None:
      if name not in dense_flat:
        raise ValueError(f"upcycling: the dense checkpoint has no parameter {name} "
                         f"(shape {tuple(value.shape)})")
      source = dense_flat[name]
      if source.shape != value.shape:
        hint = ("; a dense layer of an MoE model has top_k * expert_hidden hidden units "
                "(moe_every > 1 or first_dense_layers upcycle with top_k=1)"
                if "/ffn/ffn/" in name else "")
        raise ValueError(f"upcycling: parameter {name} has shape {tuple(source.shape)} in "
                         f"the dense checkpoint and {tuple(value.shape)} in this model{hint}")
      out[name] = jnp.asarray(source, value.dtype)
      used.add(name)
      continue
    dense_name = f"{match.group(1)}/ffn/{match.group(2)}"
    copies = _expert_copies(name, value, dense_flat, dense_name, granularity,
                            noise, None if not noise else jax.random.fold_in(key, index))
    out[name] = copies.astype(value.dtype)
    used.add(dense_name)
  # A dense weight left out would change the function the model computes
  # (an untied output kernel into a tied model, a shared FFN into none).
  unused = sorted(set(dense_flat) - used)
  if unused:
    shown = ", ".join(f"{name} {tuple(dense_flat[name].shape)}" for name in unused[:3])
    more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
    raise ValueError(f"upcycling: the dense checkpoint's {shown}{more} has no counterpart "
                     f"in this model (config.model.tie_embeddings, "
                     f"config.model.moe.num_shared_experts or activation differ?)")
  return flax.traverse_util.unflatten_dict({tuple(_key(p) for p in k.split("/")): v
                                            for k, v in out.items()})


def _num_layers(flat: dict[str, Any]) -> int:
  return len({name.split("/")[1] for name in flat if name.startswith("layers/")})


def _key(part: str):
  return int(part) if part.isdigit() else part


def upcycle(params: nnx.State, config: ml_collections.ConfigDict, vocab_size: int,
            mesh) -> tuple[nnx.State, int]:
  """`params` (the fresh MoE parameters of `config`, in their shardings) with
  everything but the routers taken from the dense run `config.init.upcycle_from`;
  returns them and the dense step they came from. Call under
  `parallel.activate(mesh)`."""
  workdir = config.init.upcycle_from
  step, source = source_config(workdir)
  check_source(source, config, workdir)
  source.mesh.update(config.mesh.to_dict())
  try:
    step, _, dense = run_lib.Run(workdir).restore_params(source, vocab_size, mesh)
  except checkpoints.IncompatibleCheckpointError as e:
    raise ValueError(f"config.init.upcycle_from={workdir!r}: {e}") from None
  dense = nnx.to_pure_dict(dense)
  if source.model.scan_layers:
    dense = transformer_lib.convert_layout(dense, scanned=False, **_layout_args(source))
  fresh = nnx.to_pure_dict(params)
  if config.model.scan_layers:
    fresh = transformer_lib.convert_layout(fresh, scanned=False, **_layout_args(config))
  moe = config.model.moe
  mapped = upcycle_params(dense, fresh, granularity=moe.granularity,
                          noise=config.init.upcycle_noise,
                          key=jax.random.fold_in(jax.random.key(config.seed), 0x0C1C1E))
  if config.model.scan_layers:
    mapped = transformer_lib.convert_layout(mapped, scanned=True, **_layout_args(config))
  shardings = jax.tree.map(lambda x: x.sharding, nnx.to_pure_dict(params))
  mapped = jax.tree.map(lambda x, s: jax.device_put(x, s), mapped, shardings)
  state = jax.tree.map(lambda x: x, params)
  nnx.replace_by_pure_dict(state, mapped)
  return state, step
