"""A Hugging Face checkpoint folder on disk, read and written with numpy.

Reading: `config.json` and the safetensors files as `save_pretrained` writes
them (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`). Tensors are read lazily and in slices
(`safetensors.safe_open(...).get_slice`), so a caller that needs a few experts
of a layer reads only those bytes. Writing: `write_tensors` shards by size and
writes the index like transformers does.
"""

import json
import os
from typing import Iterable, Optional

import numpy as np

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' default shard size is 50 GB; smaller shards restart cheaper.
MAX_SHARD_BYTES = 5 * 2**30


class CheckpointError(ValueError):
  """A checkpoint folder cannot be read or written as asked (one line)."""


class Checkpoint:
  """The checkpoint in folder `path`: `config` (the config.json dict) and its
  tensors by name (`names`, `shape`, `read`)."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isdir(path):
      raise CheckpointError(f"--hf_dir={path} is not a directory")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
      raise CheckpointError(f"{path} has no {CONFIG_FILE} (a Hugging Face checkpoint "
                            f"folder, as save_pretrained writes it)")
    try:
      with open(config_path, encoding="utf-8") as f:
        self.config = json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{config_path} is not readable JSON ({e})") from None
    if not isinstance(self.config, dict):
      raise CheckpointError(f"{config_path} does not hold a JSON object")
    self._open: dict[str, object] = {}
    self._file_of = self._tensor_files()

  def _tensor_files(self) -> dict[str, str]:
    """{tensor name: file name} from the index or the single file."""
    index_path = os.path.join(self.path, INDEX_FILE)
    if os.path.exists(index_path):
      try:
        with open(index_path, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a safetensors index ({e!r})") from None
      missing = sorted({f for f in weight_map.values()
                        if not os.path.exists(os.path.join(self.path, f))})
      if missing:
        raise CheckpointError(f"{self.path}: shard(s) {missing} named in {INDEX_FILE} "
                              f"are missing")
      return dict(weight_map)
    if os.path.exists(os.path.join(self.path, SINGLE_FILE)):
      return {name: SINGLE_FILE for name in self._keys(SINGLE_FILE)}
    others = sorted(f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth")))
    hint = (f" (it has {others[0]}: PyTorch pickles are not read; save with "
            f"safe_serialization=True)" if others else "")
    raise CheckpointError(f"{self.path} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")

  def _handle(self, file: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    if file not in self._open:
      try:
        self._open[file] = safe_open(os.path.join(self.path, file), framework="np")
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f"{os.path.join(self.path, file)} is not a readable "
                              f"safetensors file ({e})") from None
    return self._open[file]

  def _keys(self, file: str) -> list[str]:
    return list(self._handle(file).keys())

  @property
  def names(self) -> set[str]:
    return set(self._file_of)

  def has(self, name: str) -> bool:
    return name in self._file_of

  def _slice(self, name: str):
    if name not in self._file_of:
      raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
    return self._handle(self._file_of[name]).get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: Optional[tuple] = None) -> np.ndarray:
    """Tensor `name` (or its `index`, a tuple of slices and ints) as numpy."""
    part = self._slice(name)
    return np.asarray(part[index] if index is not None else part[:])


def write_tensors(path: str, tensors: Iterable[tuple[str, np.ndarray]], *,
                  max_shard_bytes: int = MAX_SHARD_BYTES, progress=None) -> list[str]:
  """Writes (name, array) pairs as safetensors in `path`: one model.safetensors,
  or `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes`
  (one larger tensor makes its own shard) with the index. Arrays are consumed
  one by one, so at most one shard is held in memory. Returns the files."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  temp_names: list[tuple[str, list[str]]] = []

  def flush():
    name = f"shard-{len(temp_names):05d}.tmp"
    save_file(shards[-1], os.path.join(path, name), metadata={"format": "pt"})
    temp_names.append((name, sorted(shards[-1])))
    shards[-1], sizes[-1] = {}, 0

  total = 0
  for name, array in tensors:
    array = np.ascontiguousarray(array)
    if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
      flush()
    shards[-1][name] = array
    sizes[-1] += array.nbytes
    total += array.nbytes
    if progress is not None:
      progress(name)
  if shards[-1] or not temp_names:
    flush()
  count = len(temp_names)
  if count == 1:
    os.replace(os.path.join(path, temp_names[0][0]), os.path.join(path, SINGLE_FILE))
    return [SINGLE_FILE]
  weight_map, files = {}, []
  for i, (temp, names) in enumerate(temp_names):
    file = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
    os.replace(os.path.join(path, temp), os.path.join(path, file))
    weight_map.update({name: file for name in names})
    files.append(file)
  with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files + [INDEX_FILE]
