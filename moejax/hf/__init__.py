"""Hugging Face checkpoints in and out: `from_pretrained`, `save_pretrained`.

    model, config = moejax.hf.from_pretrained("path/to/olmoe")   # a TransformerLM
    logits, aux = model(token_ids)                                 # float32 [B, L, V]
    moejax.hf.save_pretrained(model, config, "path/to/out")        # transformers loads it

`from_pretrained` reads config.json and the safetensors (one file or shards
with an index; experts one tensor per expert as on the Hub, or transformers
5's fused [E, ...] tensors) with numpy, maps them per family
(`families.FAMILIES`: OLMoE, Qwen3-MoE, Mixtral, DeepSeek-V3; dense Llama and
Qwen3) and
places every parameter directly in its sharding on `mesh`: each device's
block is read from the files on its own (`jax.make_array_from_callback`), so
an expert-parallel placement reads only that device's experts and no whole
expert tensor is stacked on the host. The model routes as the family does
(dropless top-K over softmax probabilities, renormalized or not), in float32
unless the checkpoint is bfloat16.

`python -m moejax.hf import|export` (see `moejax/hf/__main__.py`) turns a
checkpoint into an ordinary moejax workdir and back.
"""

import json
import os
import shutil
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from moejax import model as model_lib
from moejax import parallel
from moejax.hf import families
from moejax.hf.checkpoint import Checkpoint, CheckpointError, write_tensors
from moejax.hf.families import FAMILIES, Unsupported
from moejax.nn.transformer import convert_layout
from moejax.parallel.rules import key_name
from moejax.train import config as config_lib

__all__ = ["FAMILIES", "Checkpoint", "CheckpointError", "Unsupported", "check_out_folder",
           "export_plan", "from_pretrained", "hf_run_config", "save_pretrained"]

# Tensors of a checkpoint that hold no weights (buffers some versions saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Conversions larger than this show a progress bar by default.
_PROGRESS_BYTES = 2**30


def _checkpoint_dtype(hf: dict[str, Any]) -> str:
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  return "bfloat16" if dtype == "bfloat16" else "float32"


def hf_run_config(hf: dict[str, Any], base: Optional[ml_collections.ConfigDict] = None,
                  dtype: Optional[str] = None) -> ml_collections.ConfigDict:
  """A moejax run config whose model is the checkpoint's (config.json `hf`):
  `base` (default: the default config) with config.model replaced, unscanned,
  in `dtype` (default: the checkpoint's, float32 or bfloat16)."""
  config = (config_lib.default_config() if base is None
            else base.copy_and_resolve_references())
  options = families.model_options(hf)
  moe = options.pop("moe")
  with config.unlocked():
    config.model.update(options)
    config.model.moe.update(moe)
    dtype = dtype or _checkpoint_dtype(hf)
    config.model.dtype = config.model.param_dtype = dtype
    config.model.scan_layers = False
    config.data.vocab_size = int(hf["vocab_size"])
  return config


def _path(keys) -> str:
  """"layers/0/attention/qkv" of a pytree path into an nnx state."""
  return "/".join(name for name in map(key_name, keys) if name != "value")


def _progress(total: int, unit: str, show: Optional[bool], size: int, what: str):
  """A tqdm bar (or None) over `total` items."""
  if show is None:
    show = size > _PROGRESS_BYTES
  if not show:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, unit=unit, desc=what)


def from_pretrained(path: str, *, mesh: Optional[jax.sharding.Mesh] = None,
                    config: Optional[ml_collections.ConfigDict] = None,
                    dtype: Optional[str] = None, progress: Optional[bool] = None):
  """(TransformerLM, run config) of the Hugging Face checkpoint folder `path`.

  Args:
    path: a folder with config.json and safetensors.
    mesh: where to place the parameters, laid out as the trainer lays them
      (call the model under `parallel.activate(mesh)`); each device reads
      its own block of every parameter from the files. Default: the first
      device, no mesh.
    config: a run config whose data/train/mesh sections to keep (default:
      the default config); its model section is replaced.
    dtype: "float32" or "bfloat16" for the parameters and the compute
      (default: the checkpoint's).
    progress: a progress bar over the parameters (default: above 1 GiB).

  Raises:
    CheckpointError: the folder is not a readable checkpoint.
    Unsupported: what the checkpoint has that moejax cannot compute exactly,
      by name (before any tensor is read).
  """
  checkpoint = Checkpoint(path)
  config = hf_run_config(checkpoint.config, config, dtype)
  family = families.family_of(checkpoint.config)
  model = config.model.to_dict()
  sources = families.tensors(model, family,
                             fused_experts=families.uses_fused_experts(checkpoint, family))
  _check_names(checkpoint, sources)
  target_graphdef, target = _target(config, mesh)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  size = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for _, leaf in leaves)
  bar = _progress(len(leaves), "tensor", progress, size, f"import {os.path.basename(path)}")
  arrays = []
  for keys, leaf in leaves:
    name = _path(keys)
    if name not in sources:
      raise Unsupported(f"moejax parameter {name} has no Hugging Face tensor in "
                        f"{family.model_type}")
    arrays.append(jax.make_array_from_callback(
        leaf.shape, leaf.sharding, _reader(checkpoint, sources[name], leaf, name)))
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  params = jax.tree_util.tree_unflatten(treedef, arrays)
  return nnx.merge(target_graphdef, params), config


def _target(config: ml_collections.ConfigDict, mesh: Optional[jax.sharding.Mesh]):
  """(graphdef, abstract parameters with their shardings): on `mesh` as the
  trainer lays them out, or on the first device without a mesh."""
  vocab = config.data.vocab_size
  if mesh is not None:
    with parallel.activate(mesh):
      return model_lib.restore_target(config, vocab, mesh)
  graphdef, shapes = model_lib.abstract(config, vocab)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return graphdef, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def _reader(checkpoint: Checkpoint, source: families.Tensor, leaf, name: str):
  """The callback that reads a device's block of parameter `name`."""
  def read(index):
    block = source.read(checkpoint, index)
    expected = tuple(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
    if block.shape != expected:
      raise CheckpointError(f"{checkpoint.path}: {', '.join(source.names)} give {name} the "
                            f"shape {list(block.shape)}, config.json implies {list(expected)}")
    return block.astype(leaf.dtype)
  return read


def _check_names(checkpoint: Checkpoint, sources: dict[str, families.Tensor]) -> None:
  """Every tensor a source needs exists, and every tensor of the checkpoint
  is used (an unused one would be a weight silently dropped)."""
  needed = set()
  for source in sources.values():
    for name in source.names:
      names = ([name.format(e=e) for e in range(source.experts)] if source.experts
               else [name])
      needed.update(names)
  missing = sorted(needed - checkpoint.names)
  if missing:
    raise CheckpointError(f"{checkpoint.path}: tensor(s) {missing[:3]}"
                          f"{' ...' if len(missing) > 3 else ''} are missing "
                          f"({len(missing)} in all) for the layout config.json describes")
  layers = int(checkpoint.config.get("num_hidden_layers", 0))
  unused = sorted(n for n in checkpoint.names - needed
                  if not n.endswith(_IGNORED_SUFFIXES) and not _beyond_layers(n, layers))
  if unused:
    raise Unsupported(f"{checkpoint.path}: tensor(s) {unused[:3]}"
                      f"{' ...' if len(unused) > 3 else ''} have no place in moejax's "
                      f"{checkpoint.config.get('model_type')} mapping ({len(unused)} in all)")


def _beyond_layers(name: str, layers: int) -> bool:
  """A tensor of a layer past the decoder's (DeepSeek-V3's multi-token-
  prediction module, which transformers does not load either)."""
  parts = name.split(".")
  return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
          and int(parts[2]) >= layers)


def _host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def export_plan(config: ml_collections.ConfigDict, family: Optional[str] = None):
  """(family, config.json dict, tensors) of exporting a model of `config`;
  Unsupported names what cannot be carried (nothing is read or written)."""
  model = config.model.to_dict()
  if family and family not in FAMILIES:
    raise Unsupported(f"--family={family!r}; supported: {', '.join(sorted(FAMILIES))}")
  chosen = FAMILIES[family] if family else families.guess_family(model)
  families.check_exportable(model, chosen)
  hf = families.hf_config(model, chosen, int(config.data.vocab_size),
                          int(config.train.seq_len))
  return chosen, hf, families.tensors(model, chosen)


def save_pretrained(model, config: ml_collections.ConfigDict, path: str, *,
                    family: Optional[str] = None, vocab_size: Optional[int] = None,
                    max_positions: Optional[int] = None,
                    progress: Optional[bool] = None) -> list[str]:
  """Writes `model` (a TransformerLM, or its nnx state) as a Hugging Face
  checkpoint folder `path` that transformers loads: config.json and
  safetensors (experts one tensor per expert, as on the Hub; shards with an
  index above 5 GiB). `family` (a model_type) defaults to the one the model's
  options match. The folder must not exist or be empty; files are written
  into a temporary folder beside it and moved in when complete.

  Raises Unsupported, before anything is written, for what the family has no
  place for (expert choice, Soft MoE, finite capacity, GELU experts, shared
  experts, a balancing bias, ...). Returns the files written.
  """
  if vocab_size is not None or max_positions is not None:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.vocab_size = vocab_size or config.data.vocab_size
      config.train.seq_len = max_positions or config.train.seq_len
  chosen, hf, sources = export_plan(config, family)
  flat = _flat_params(model, config)
  extra = sorted(set(flat) - set(sources))
  if extra:
    raise Unsupported(f"cannot export as {chosen.model_type}: moejax parameter(s) "
                      f"{extra[:3]} have no Hugging Face tensor")
  vocab = int(config.data.vocab_size)
  if flat["embed/embedding"].shape[0] != vocab:
    raise Unsupported(f"the embedding has {flat['embed/embedding'].shape[0]} rows, "
                      f"config.data.vocab_size is {vocab}")
  check_out_folder(path)
  size = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in flat.values())
  bar = _progress(len(sources), "parameter", progress, size, f"export {os.path.basename(path)}")

  def hf_tensors():
    for name, source in sources.items():
      yield from source.hf_tensors(_host(flat[name]))
      if bar is not None:
        bar.update(1)
  try:
    return _write_folder(path, hf, hf_tensors())
  finally:
    if bar is not None:
      bar.close()


def check_out_folder(path: str) -> None:
  """CheckpointError unless `path` can become a new checkpoint folder: it is
  absent or empty, and its parent exists."""
  if os.path.exists(path) and os.listdir(path):
    raise CheckpointError(f"--out={path} exists and is not empty; choose a new folder")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise CheckpointError(f"--out={path}: the folder {parent} does not exist")


def _flat_params(model, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"layers/0/attention/qkv": array} of a model or its state, unscanned."""
  state = nnx.state(model) if isinstance(model, nnx.Module) else model
  flat = {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}
  flat = {k: v[...] if isinstance(v, nnx.Variable) else v for k, v in flat.items()}
  if not config.model.scan_layers:
    return flat
  nested = convert_layout(traverse_util.unflatten_dict(flat, sep="/"), scanned=False,
                          **model_lib.model_config(config).layout_args)
  return {"/".join(map(str, key)): v
          for key, v in traverse_util.flatten_dict(nested).items()}


def _write_folder(path: str, hf: dict[str, Any], tensors) -> list[str]:
  """Writes config.json and the (name, array) pairs into a temporary folder
  beside `path`, then moves it to `path`; returns the files."""
  temp = os.path.join(os.path.dirname(os.path.abspath(path)),
                      f".{os.path.basename(path)}.tmp{os.getpid()}")
  shutil.rmtree(temp, ignore_errors=True)
  os.makedirs(temp)
  try:
    files = write_tensors(temp, tensors)
    with open(os.path.join(temp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf, f, indent=2)
    if os.path.exists(path):
      os.rmdir(path)
    os.replace(temp, path)
  finally:
    shutil.rmtree(temp, ignore_errors=True)
  return files + ["config.json"]
