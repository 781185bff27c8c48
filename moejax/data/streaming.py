"""Streaming TFDS text (`config.data.loader="grain"`): ArrayRecord tokens read by Grain.

The memory loader (`text.py`) keeps one `.npy` token stream per split and draws
each epoch's window order as an in-memory permutation of all W windows. This
loader keeps memory flat as the corpus grows:

Tokenizing (one pass, bounded memory). The split's documents are read in
order (`text.iter_documents`), tokenized exactly as for the memory loader
(each document followed by the separator), and the stream is cut into records
of `CHUNK_TOKENS` tokens (the last one shorter), written to one ArrayRecord
file (`group_size:1`, uncompressed, so any record is one seek) plus a JSON
sidecar. The process holds one batch of documents and one chunk, never the
split. The file does not depend on seq_len: any window length reads it.

Reading (random access). `TokenWindows` is a Grain random-access data source
of windows: window w = tokens [w * L, w * L + L + 1), the memory loader's
packing, read from the one or two records that hold it.

Order. The training pipeline is a Grain `MapDataset`:

    source(TokenWindows).shuffle(seed).repeat().batch(B / P)[p::P].map(lm_batch)

so training window g = step * B + row of the concatenated epochs is window
`shuffle_e(g mod W)` of epoch e = g // W, where Grain's `index_shuffle` (a
4-round Feistel-style bijection of [0, W)) computes one index at a time in
O(1) memory. Batch `step` of process p holds rows [p * B / P, (p + 1) * B / P)
of global batch `step`: a pure function of (seed, step), so the iterator
state is `{"step": s}` as for every moejax dataset. Each epoch holds the same
windows as the memory loader's epoch, in another order. Eval batches are the
memory loader's (eval windows in order, padded with weight-0 rows).

Damage. Opening a split checks that its ArrayRecord file opens and holds the
records its sidecar counts; a damaged file or sidecar (then or mid-run) is a
`cache.CacheError` naming the file and the folder to delete to rebuild it.

Memory that remains: ArrayRecord's in-memory record index (one entry per
CHUNK_TOKENS tokens: ~0.1 M entries for 800 M tokens) and, as for any file
read, the OS page cache (reclaimable, outside the process's anonymous memory).
"""

import json
import os
import tempfile
import threading
from typing import Any, Iterable, Optional, Sequence

from absl import logging
from array_record.python import array_record_module
import grain
import numpy as np

from moejax.data import base
from moejax.data import cache as cache_lib
from moejax.data import text
from moejax.data import tokenizers as tokenizers_lib

# Tokens per ArrayRecord record (16 KiB of uint16): a window read touches one or
# two records; the in-memory record index has num_tokens / CHUNK_TOKENS entries.
CHUNK_TOKENS = 1 << 13
_SHUFFLE_STREAM = 4
_WRITER_OPTIONS = "group_size:1,uncompressed"
# ArrayRecordReader.read([i]) hands every call to a thread pool (milliseconds
# per call on a loaded 2-core host); seek + read() is a plain positioned read
# (microseconds), so windows are read that way, under a lock.
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
_SUFFIX = ".array_record"
SIDECAR_KEYS = ("num_tokens", "num_documents", "num_records", "chunk_tokens", "dtype",
                "unigram_entropy")


def write_token_records(path: str, document_batches: Iterable[Sequence[Any]],
                        tokenizer) -> dict[str, Any]:
  """Tokenizes documents into the ArrayRecord file `path`, in bounded memory.

  Args:
    path: the file to write (overwritten).
    document_batches: batches of documents (bytes or str), in order.
    tokenizer: `encode_documents` appends `eos_id` after each document.

  Returns:
    Facts for the JSON sidecar: num_tokens, num_documents, num_records,
    chunk_tokens, dtype, unigram_entropy (nats/token, separators included).
  """
  dtype = tokenizers_lib.token_dtype(tokenizer.vocab_size)
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  num_documents = num_records = 0
  pending = np.zeros(0, dtype)  # fewer than CHUNK_TOKENS tokens not yet written
  writer = array_record_module.ArrayRecordWriter(path, _WRITER_OPTIONS)
  try:
    for documents in document_batches:
      tokens = tokenizer.encode_documents(list(documents)).astype(dtype, copy=False)
      counts += np.bincount(tokens, minlength=tokenizer.vocab_size)
      num_documents += len(documents)
      stream = np.concatenate([pending, tokens])
      full = len(stream) - len(stream) % CHUNK_TOKENS
      for start in range(0, full, CHUNK_TOKENS):
        writer.write(stream[start:start + CHUNK_TOKENS].tobytes())
        num_records += 1
      pending = stream[full:].copy()  # drops the reference to `stream`
    if len(pending):
      writer.write(pending.tobytes())
      num_records += 1
  finally:
    writer.close()
  num_tokens = int(counts.sum())
  return {"num_tokens": num_tokens, "num_documents": num_documents,
          "num_records": num_records, "chunk_tokens": CHUNK_TOKENS, "dtype": dtype.name,
          "unigram_entropy": text.unigram_entropy(counts)}


def _meta_path(path: str) -> str:
  return path[:-len(_SUFFIX)] + ".json"


def load_token_records(folder: str, builder, split: str, text_key: str,
                       tokenizer) -> tuple[str, dict[str, Any]]:
  """The ArrayRecord token file of `split` (written on first use) and its facts.

  Like `text.load_tokens`: files appear atomically and the first writer wins,
  so processes sharing the cache folder agree.
  """
  name = (f"{text.split_tag(text_key, split)}.{tokenizer.fingerprint}"
          f".c{CHUNK_TOKENS}{_SUFFIX}")
  path = os.path.join(folder, name)
  if not (os.path.exists(path) and os.path.exists(_meta_path(path))):
    logging.info("Tokenizing %s split %r into %s", builder.info.full_name, split, path)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=_SUFFIX, delete=False) as f:
      tmp_path = f.name
    try:
      facts = write_token_records(
          tmp_path, text.iter_documents(builder, split, text_key), tokenizer)
      text.publish(tmp_path, path)
    finally:
      if os.path.exists(tmp_path):
        os.remove(tmp_path)
    meta = {"dataset": builder.info.full_name, "split": split, "text_key": text_key,
            "tokenizer": tokenizer.fingerprint, **facts}
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".json", delete=False) as f:
      json.dump(meta, f)
    text.publish(f.name, _meta_path(path))
  meta = cache_lib.read_sidecar(_meta_path(path), SIDECAR_KEYS, _sidecar_problem)
  check_token_records(path, meta)
  return path, meta


def _sidecar_problem(meta: dict[str, Any]) -> Optional[str]:
  try:
    np.dtype(meta["dtype"])
  except TypeError:
    return f"names no dtype ({meta['dtype']!r})"
  return None


def _unreadable(path: str, error: BaseException) -> cache_lib.CacheError:
  # ArrayRecord raises a bare RuntimeError for some damage (a file cut short).
  detail = cache_lib.reason(error) if str(error).strip() else "not a whole ArrayRecord file"
  return cache_lib.damaged(path, f"cannot be read ({detail})")


def _open_reader(path: str):
  """An ArrayRecord reader of `path`; CacheError when the file is damaged."""
  try:
    reader = array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
    if not reader.ok():  # some damage only shows here; close() raises its status
      reader.close()
      raise RuntimeError("")
  except (OSError, RuntimeError, ValueError) as e:  # "Corrupted Riegeli/records file"
    raise _unreadable(path, e) from None
  return reader


def check_token_records(path: str, meta: dict[str, Any]) -> None:
  """CacheError unless the ArrayRecord file opens and holds the records its
  sidecar counts (a file cut short fails here, before training, not mid-run)."""
  reader = _open_reader(path)
  found = reader.num_records()
  reader.close()
  if found != meta["num_records"]:
    raise cache_lib.damaged(path, f"holds {found} records, its sidecar "
                                  f"{_meta_path(path)} says {meta['num_records']}")


class TokenWindows:
  """Grain random-access source: window w -> <dtype>[L + 1] tokens [w L, w L + L + 1).

  Reads the ArrayRecord file of `write_token_records`; the reader opens on
  first use (and again after unpickling, e.g. in a Grain worker process).
  """

  def __init__(self, path: str, meta: dict[str, Any], seq_len: int):
    self.path = path
    self.seq_len = seq_len
    self.num_tokens = int(meta["num_tokens"])
    self.chunk_tokens = int(meta["chunk_tokens"])
    self.dtype = np.dtype(meta["dtype"])
    self._reader = None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return max(self.num_tokens - 1, 0) // self.seq_len

  def _records(self, first: int, last: int) -> list[np.ndarray]:
    with self._lock:
      if self._reader is None:
        self._reader = _open_reader(self.path)
      chunks = []
      try:
        for record in range(first, last + 1):
          self._reader.seek(record)
          chunks.append(np.frombuffer(self._reader.read(), self.dtype))
      except (OSError, RuntimeError, ValueError) as e:  # damaged after it was checked
        raise _unreadable(self.path, e) from None
    return chunks

  def __getitem__(self, window: int) -> np.ndarray:
    window = int(window)
    if not 0 <= window < len(self):
      raise IndexError(f"window {window} is outside [0, {len(self)})")
    start = window * self.seq_len
    first = start // self.chunk_tokens
    last = (start + self.seq_len) // self.chunk_tokens  # holds the window's last token
    chunks = self._records(first, last)
    tokens = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    offset = start - first * self.chunk_tokens
    return tokens[offset:offset + self.seq_len + 1].copy()

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_reader"] = state["_lock"] = None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"TokenWindows({self.path!r}, seq_len={self.seq_len})"


def shuffle_seed(seed: int) -> int:
  """Grain's shuffle seed for `config.seed`, in [0, 2**32).

  Grain shuffles epoch e with seed (s + e) mod 2**32, so seeds s and s + 1
  would share every epoch but one, shifted by one; a Philox draw makes the
  seeds of different config seeds unrelated.
  """
  return int(base.philox(seed, _SHUFFLE_STREAM).integers(2**32))


class StreamingTextDataset(text.TextDataset):
  """`text.TextDataset` with ArrayRecord tokens and a Grain pipeline (module docstring).

  Takes TextDataset's arguments; everything but the token files and the
  training order (build, checks, eval batches, info) is TextDataset's.
  """

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    windows = grain.MapDataset.source(self._train_tokens)
    self._train_batches = (
        windows.shuffle(seed=shuffle_seed(self.seed)).repeat()
        .batch(self.local_batch_size, drop_remainder=True)
        .slice(slice(self.process_index, None, self.process_count))
        .map(base.lm_batch))
    self.info.update({"loader": "grain", "chunk_tokens": CHUNK_TOKENS})

  def _load_split(self, folder: str, builder, split: str,
                  text_key: str) -> tuple[TokenWindows, dict[str, Any]]:
    path, meta = load_token_records(folder, builder, split, text_key, self.tokenizer)
    return TokenWindows(path, meta, self.seq_len), meta

  def _windows(self, tokens: TokenWindows, window_ids: np.ndarray) -> np.ndarray:
    return np.stack([tokens[w] for w in window_ids])

  def train_batch(self, step: int) -> base.Batch:
    return self._train_batches[step]

