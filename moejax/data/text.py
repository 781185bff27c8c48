"""Text datasets: build (TFDS, offline from a manual dir), tokenize once, pack.

Reading. tiny_shakespeare with a manual dir and python_stdlib are read by
`corpora` without TFDS or TensorFlow (the same splits as TFDS's build); other names go to TFDS, an
optional install (`pip install -e '.[tfds]'`).

Building. `tfds.builder(name, data_dir=data_dir).download_and_prepare(
download_config=DownloadConfig(manual_dir=manual_dir))`. TFDS's download
manager first looks for each registered download in `manual_dir` under the
file name of the dataset's checksums.tsv (and verifies the checksum), so an
offline machine builds e.g. tiny_shakespeare from a folder that holds its
`input.txt`. Before building, a manual dir that lacks one of those files is
reported at once (otherwise TFDS would retry the download for minutes).

Tokenizing. A split is read in order, each document tokenized and followed by
the tokenizer's separator, and the stream saved once as `.npy` under
`cache_dir/<dataset>/<version>/` keyed by text key, split and tokenizer
fingerprint; later runs memory-map it. A JSON sidecar holds the token count and
unigram entropy. Files appear atomically and the first writer wins, so
processes sharing a cache folder agree. A damaged cache file is reported as
`cache.CacheError`, naming the file and the folder to delete. The whole split is tokenized, which
suits datasets up to a few billion tokens (tiny_shakespeare, lm1b, wikis).

Packing. Window w holds tokens [w * L, w * L + L + 1): inputs = window[:-1],
targets = window[1:], so every token after the first is a target exactly once
per epoch; the last N - 1 mod L tokens are dropped.

Order. Training window g of the concatenated epochs (g = step * B + row) is
window `perm_e[g mod W]` of epoch e = g // W, with `perm_e` a permutation of
the W windows drawn from (seed, e). Eval batch i holds eval windows
[i * B, (i + 1) * B) in order; if the split has fewer than num_batches * B
windows, fewer batches are returned and the last one is padded with weight-0
rows, so every eval window counts exactly once.
"""

import hashlib
import json
import math
import os
import re
import tempfile
from typing import Any, Iterator, Optional

from absl import logging
import numpy as np

from moejax.data import base
from moejax.data import cache as cache_lib
from moejax.data import corpora
from moejax.data import tokenizers as tokenizers_lib

_PERMUTATION_STREAM = 3
_READ_BATCH = 256             # documents per TFDS read and tokenizer call
_COPY_CHUNK = 1 << 24         # tokens per copy from the raw stream into the .npy
SIDECAR_KEYS = ("num_tokens", "num_documents", "unigram_entropy")


def import_tfds(*, with_tensorflow: bool = False):
  """Imports TFDS, and TensorFlow (seconds) only for building and reading.

  TF is kept off accelerators (JAX owns their memory; big_vision does the same)
  and its C++ logging is quieted unless the user set TF_CPP_MIN_LOG_LEVEL.
  """
  try:
    if with_tensorflow:
      os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        f"TFDS datasets need TensorFlow Datasets ({e}): pip install -e '.[tfds]' "
        "(synthetic_mixture, python_stdlib, and tiny_shakespeare with "
        "config.data.manual_dir, need neither)") from None
  return tfds


def base_name(name: str) -> str:
  """"c4/en:3.1.0" -> "c4": the builder name without config and version."""
  return name.split("/")[0].split(":")[0]


def known_tfds_names() -> list[str]:
  """Registered TFDS builders (no community datasets: that needs a network)."""
  return sorted(import_tfds().list_builders(with_community_datasets=False))


is_local_path = corpora.is_local_path


def check_text_key(builder, text_key: str) -> None:
  """Raises ValueError unless `text_key` is a Text feature of the dataset."""
  if isinstance(builder, corpora.Corpus):
    if text_key not in builder.info.features:
      raise ValueError(f"config.data.text_key={text_key!r} is not a feature of "
                       f"{builder.info.full_name}; features: {list(builder.info.features)}")
    return
  tfds = import_tfds()
  features = builder.info.features
  names = sorted(features.keys())
  if text_key not in features:
    raise ValueError(f"config.data.text_key={text_key!r} is not a feature of "
                     f"{builder.info.full_name}; features: {names}")
  if not isinstance(features[text_key], tfds.features.Text):
    raise ValueError(f"config.data.text_key={text_key!r} is a "
                     f"{type(features[text_key]).__name__} feature of "
                     f"{builder.info.full_name}, not text; features: {names}")


def _check_manual_files(builder, manual_dir: str) -> None:
  """Fails fast when `manual_dir` lacks a file TFDS would otherwise download."""
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    return  # the builder reads dl_manager.manual_dir itself, with its own checks
  expected = {info.filename for info in (builder.url_infos or {}).values() if info.filename}
  missing = sorted(expected - set(os.listdir(manual_dir)))
  if missing:
    raise ValueError(
        f"config.data.manual_dir={manual_dir!r} lacks {missing}, the file(s) TFDS's "
        f"{builder.name!r} builder downloads; put them there (TFDS verifies their "
        "checksums) or leave manual_dir unset to download")


def prepare_builder(name: str, data_dir: Optional[str], manual_dir: Optional[str]):
  """The TFDS builder of `name`, built into `data_dir` if it is not there yet,
  or the `corpora.Corpus` read from `manual_dir` without TFDS."""
  if corpora.reads(name, manual_dir):
    return corpora.open_corpus(name, manual_dir)
  tfds = import_tfds(with_tensorflow=True)
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    if manual_dir is not None:
      if not os.path.isdir(manual_dir):
        raise ValueError(f"config.data.manual_dir={manual_dir!r} does not exist")
      _check_manual_files(builder, manual_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _check_split(builder, key: str, split: str) -> None:
  """Every split named in `split` ("train", "train[:90%]+validation") must exist."""
  if isinstance(builder, corpora.Corpus):
    builder.check_split(key, split)
    return
  available = sorted(str(name) for name in builder.info.splits.keys())
  names = [part.split("[")[0].strip() for part in split.split("+")]
  if not all(name in available for name in names):
    raise ValueError(f"config.data.{key}={split!r} is not a split of "
                     f"{builder.info.full_name}; splits: {available}")


def iter_documents(builder, split: str, text_key: str) -> Iterator[np.ndarray]:
  """Batches of documents of `split` in order: <object>[<= _READ_BATCH] of bytes."""
  if isinstance(builder, corpora.Corpus):
    yield from builder.documents(split, text_key)
    return
  tfds = import_tfds(with_tensorflow=True)
  # One pass: TFDS's auto-cache (splits under 250 MiB) would keep every document
  # read in memory until the pass ends, for nothing.
  read_config = tfds.ReadConfig(try_autocache=False)
  dataset = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
  dataset = dataset.map(lambda example: example[text_key]).batch(_READ_BATCH)
  yield from tfds.as_numpy(dataset.prefetch(2))


def publish(tmp_path: str, path: str) -> None:
  """Moves `tmp_path` to `path` unless `path` exists (then the first one wins)."""
  try:
    os.link(tmp_path, path)
  except FileExistsError:
    pass
  except OSError:  # no hard links on this filesystem
    os.replace(tmp_path, path)
  if os.path.exists(tmp_path):
    os.remove(tmp_path)


def unigram_entropy(counts: np.ndarray) -> float:
  probs = counts[counts > 0] / counts.sum()
  return float(-np.sum(probs * np.log(probs)))


def _write_token_cache(path: str, builder, split: str, text_key: str, tokenizer) -> None:
  """Tokenizes `split` into `path` (.npy) and its JSON sidecar."""
  folder = os.path.dirname(path)
  dtype = tokenizers_lib.token_dtype(tokenizer.vocab_size)
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  num_documents = 0
  with tempfile.NamedTemporaryFile(dir=folder, suffix=".raw", delete=False) as raw:
    for documents in iter_documents(builder, split, text_key):
      tokens = tokenizer.encode_documents(list(documents))
      counts += np.bincount(tokens, minlength=tokenizer.vocab_size)
      num_documents += len(documents)
      raw.write(tokens.tobytes())
  num_tokens = int(counts.sum())
  tmp_npy = f"{raw.name}.npy"
  try:
    if num_tokens == 0:  # nothing to map
      np.save(tmp_npy, np.zeros(0, dtype))
    else:  # the stream may exceed memory: copy it over in chunks
      source = np.memmap(raw.name, dtype, mode="r", shape=(num_tokens,))
      out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=dtype, shape=(num_tokens,))
      for start in range(0, num_tokens, _COPY_CHUNK):
        out[start:start + _COPY_CHUNK] = source[start:start + _COPY_CHUNK]
      out.flush()
      del out, source
    publish(tmp_npy, path)
  finally:
    os.remove(raw.name)
  meta = {"dataset": builder.info.full_name, "split": split, "text_key": text_key,
          "tokenizer": tokenizer.fingerprint, "num_tokens": num_tokens,
          "num_documents": num_documents, "unigram_entropy": unigram_entropy(counts)}
  with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".json", delete=False) as f:
    json.dump(meta, f)
  publish(f.name, _meta_path(path))


def _meta_path(npy_path: str) -> str:
  return npy_path[:-len(".npy")] + ".json"


def _file_safe(name: str) -> str:
  """`name` if it is file-name safe, else a cleaned copy plus a hash of it
  ("train[:90%]" -> "train_90_<hash>", distinct from "train[90%:]")."""
  clean = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
  if clean == name:
    return name
  return f"{clean}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def split_tag(text_key: str, split: str) -> str:
  return f"{_file_safe(text_key)}.{_file_safe(split)}"


def load_tokens(cache_folder: str, builder, split: str, text_key: str,
                tokenizer) -> tuple[np.ndarray, dict[str, Any]]:
  """Memory-mapped tokens of `split` (tokenized on first use) and their facts."""
  path = os.path.join(cache_folder,
                      f"{split_tag(text_key, split)}.{tokenizer.fingerprint}.npy")
  if not (os.path.exists(path) and os.path.exists(_meta_path(path))):
    logging.info("Tokenizing %s split %r into %s", builder.info.full_name, split, path)
    _write_token_cache(path, builder, split, text_key, tokenizer)
  meta = cache_lib.read_sidecar(_meta_path(path), SIDECAR_KEYS)
  return _map_tokens(path, meta["num_tokens"]), meta


def _map_tokens(path: str, num_tokens: int) -> np.ndarray:
  """The memory-mapped .npy stream; CacheError unless it holds `num_tokens`."""
  try:
    tokens = np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:  # a header or body cut short
    raise cache_lib.damaged(path, f"cannot be read ({cache_lib.reason(e)})") from None
  if tokens.ndim != 1 or len(tokens) != num_tokens:
    raise cache_lib.damaged(path, f"holds {tokens.size} tokens, its sidecar "
                                  f"{_meta_path(path)} says {num_tokens}")
  return tokens


def load_tokenizer(name: str, vocab_size: int, cache_folder: str, builder,
                   train_split: str, text_key: str, path: Optional[str] = None):
  """The tokenizer; SentencePiece is trained on `train_split` once and cached;
  "hf" reads the tokenizer.json at `path`."""
  if name != "sentencepiece":
    return tokenizers_lib.make_tokenizer(name, path=path, vocab_size=vocab_size)
  path = os.path.join(cache_folder, f"sentencepiece.{split_tag(text_key, train_split)}"
                                    f".v{vocab_size}.model")
  if not os.path.exists(path):
    logging.info("Training a %d-piece SentencePiece model on %s into %s",
                 vocab_size, builder.info.full_name, path)
    documents = (doc for batch in iter_documents(builder, train_split, text_key)
                 for doc in batch)
    proto = tokenizers_lib.train_sentencepiece(documents, vocab_size)
    with tempfile.NamedTemporaryFile(dir=cache_folder, suffix=".model", delete=False) as f:
      f.write(proto)
    publish(f.name, path)
  try:
    return tokenizers_lib.SentencePieceTokenizer.from_file(path)
  except (RuntimeError, ValueError) as e:  # sentencepiece: RuntimeError on garbage
    raise cache_lib.damaged(path, f"is not a usable SentencePiece model "
                                  f"({cache_lib.reason(e)})") from None


def default_cache_dir(data_dir: Optional[str]) -> str:
  if data_dir is not None and is_local_path(data_dir):
    return os.path.join(os.path.expanduser(data_dir), "moejax_cache")
  return os.path.join(tempfile.gettempdir(), "moejax_data_cache")


class TextDataset(base.Dataset):
  """Packed windows of a tokenized TFDS text dataset (see the module docstring).

  `entropy_floor` is None (unknown); `unigram_entropy` is that of the train
  split's tokens, separators included. Where the tokens live (`_load_split`,
  `_windows`) and the training order (`train_batch`) are what
  `streaming.StreamingTextDataset` (config.data.loader="grain") replaces.
  """

  def __init__(self, *, name: str, data_dir: Optional[str], manual_dir: Optional[str],
               text_key: str, train_split: str, eval_split: str, tokenizer: str,
               vocab_size: int, seq_len: int, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               cache_dir: Optional[str] = None, tokenizer_path: Optional[str] = None):
    super().__init__(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
    builder = prepare_builder(name, data_dir, manual_dir)
    check_text_key(builder, text_key)
    _check_split(builder, "train_split", train_split)
    _check_split(builder, "eval_split", eval_split)
    if cache_dir is None or not is_local_path(cache_dir):
      if cache_dir is not None:
        logging.warning("cache_dir=%r is not local (tokens are memory-mapped); "
                        "caching in a local folder instead", cache_dir)
      cache_dir = default_cache_dir(data_dir)
    folder = os.path.join(cache_dir, builder.info.full_name)
    os.makedirs(folder, exist_ok=True)

    self.tokenizer = load_tokenizer(tokenizer, vocab_size, folder, builder,
                                    train_split, text_key, tokenizer_path)
    self._train_tokens, train_meta = self._load_split(folder, builder, train_split, text_key)
    self._eval_tokens, eval_meta = self._load_split(folder, builder, eval_split, text_key)
    self.num_train_windows = max(train_meta["num_tokens"] - 1, 0) // self.seq_len
    self.num_eval_windows = max(eval_meta["num_tokens"] - 1, 0) // self.seq_len
    for key, split, meta, windows, needed in (
        ("train_split", train_split, train_meta, self.num_train_windows,
         self.global_batch_size),
        ("eval_split", eval_split, eval_meta, self.num_eval_windows, 1)):
      if windows < needed:
        raise ValueError(
            f"config.data.{key}={split!r} of {builder.info.full_name} is too small: "
            f"{meta['num_tokens']} tokens make {windows} windows of seq_len + 1 = "
            f"{self.seq_len + 1} tokens, fewer than the {needed} one batch needs")

    self.vocab_size = self.tokenizer.vocab_size
    self.entropy_floor = None
    self.unigram_entropy = train_meta["unigram_entropy"]
    self._permutations: dict[int, np.ndarray] = {}
    self.info = {
        "name": name, "full_name": builder.info.full_name, "text_key": text_key,
        "tokenizer": tokenizer, "tokenizer_fingerprint": self.tokenizer.fingerprint,
        "vocab_size": self.vocab_size, "train_split": train_split,
        "eval_split": eval_split, "num_train_tokens": train_meta["num_tokens"],
        "num_train_documents": train_meta["num_documents"],
        "num_train_windows": self.num_train_windows,
        "num_eval_tokens": eval_meta["num_tokens"],
        "num_eval_windows": self.num_eval_windows,
        "unigram_entropy": self.unigram_entropy, "entropy_floor": None,
        "cache_dir": cache_dir, "seq_len": self.seq_len,
        "global_batch_size": self.global_batch_size, "seed": self.seed,
    }

  def _load_split(self, folder: str, builder, split: str,
                  text_key: str) -> tuple[Any, dict[str, Any]]:
    """The tokens of `split` (here a memory-mapped array) and their JSON facts."""
    return load_tokens(folder, builder, split, text_key, self.tokenizer)

  def _permutation(self, epoch: int) -> np.ndarray:
    """The window order of `epoch`; the last two epochs are kept."""
    if epoch not in self._permutations:
      rng = base.philox(self.seed, _PERMUTATION_STREAM, 0, epoch)
      self._permutations[epoch] = rng.permutation(self.num_train_windows)
      for old in sorted(self._permutations)[:-2]:
        del self._permutations[old]
    return self._permutations[epoch]

  def _windows(self, tokens: np.ndarray, window_ids: np.ndarray) -> np.ndarray:
    """<int>[n, L + 1] token windows at `window_ids` <int64>[n]."""
    starts = window_ids * self.seq_len
    return tokens[starts[:, None] + np.arange(self.seq_len + 1)]

  def train_batch(self, step: int) -> base.Batch:
    positions = step * self.global_batch_size + self.local_rows
    epochs = positions // self.num_train_windows
    window_ids = np.empty_like(positions)
    for epoch in np.unique(epochs):
      mask = epochs == epoch
      window_ids[mask] = self._permutation(int(epoch))[positions[mask] % self.num_train_windows]
    return base.lm_batch(self._windows(self._train_tokens, window_ids))

  def eval_batches(self, num_batches: int) -> list[base.Batch]:
    self._check_num_batches(num_batches)
    available = math.ceil(self.num_eval_windows / self.global_batch_size)
    if available < num_batches:
      logging.warning("eval split has %d windows: %d eval batches instead of %d, the last "
                      "padded with weight-0 rows", self.num_eval_windows, available,
                      num_batches)
    batches = []
    for i in range(min(num_batches, available)):
      window_ids = i * self.global_batch_size + self.local_rows
      valid = window_ids < self.num_eval_windows
      windows = self._windows(self._eval_tokens, np.where(valid, window_ids, 0))
      weights = np.broadcast_to(valid[:, None], (len(valid), self.seq_len))
      windows = np.where(valid[:, None], windows, 0)
      batches.append(base.lm_batch(windows, weights.astype(np.float32)))
    return batches
