"""Tokenizers: text documents -> one flat token stream with a separator id.

Both tokenizers turn a list of documents into `<uint16|int32>[N]`, each
document followed by `eos_id`, so packing into fixed windows (see `text.py`)
never has to look at document boundaries again.

* `ByteTokenizer`: token = byte value of the UTF-8 text (0..255), separator 256,
  so `vocab_size` = 257 (`config.data.vocab_size` is ignored). No training, no
  unknown tokens; the model may pad its embedding table beyond 257.
* `HFTokenizer`: a Hugging Face checkpoint's own tokenizer (its tokenizer.json,
  read with the `tokenizers` package; `config.data.tokenizer_path`), with the
  checkpoint's eos token as the separator; ids as the checkpoint's model
  expects them (`python -m moejax.hf import` sets it up).
* `SentencePieceTokenizer`: a unigram SentencePiece model (Kudo 2018) trained by
  `train_sentencepiece` on a bounded prefix of the train split, with identity
  normalization so newlines and repeated spaces survive (they carry structure
  in code, verse and markup). Ids: 0 = unk, 1 = eos (the separator), no bos/pad.
"""

import hashlib
import io
import json
import os
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

TOKENIZERS = ("byte", "sentencepiece", "hf")

Document = Union[bytes, str]

# SentencePiece training reads at most this many characters of the train split
# (a prefix: deterministic, and enough to estimate piece frequencies for 32k
# vocabularies), and splits them into "sentences" of at most this many bytes
# (longer ones are skipped by the trainer otherwise).
SENTENCEPIECE_SAMPLE_CHARS = 20_000_000
_SENTENCEPIECE_MAX_SENTENCE_BYTES = 1 << 14
# Trained models differ with the thread count (EM statistics are summed per
# thread), so it is pinned: every host that trains on the same text gets the
# same model, whatever its number of cores.
_SENTENCEPIECE_TRAIN_THREADS = 16


def _as_bytes(document: Document) -> bytes:
  return document.encode("utf-8") if isinstance(document, str) else bytes(document)


def _as_str(document: Document) -> str:
  if isinstance(document, str):
    return document
  return bytes(document).decode("utf-8", errors="replace")


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest dtype of the cached token stream (uint16 halves the disk)."""
  return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _join_with_separator(pieces: Sequence[np.ndarray], separator: int,
                         dtype: np.dtype) -> np.ndarray:
  """Concatenates token arrays, each followed by `separator`: <dtype>[sum(len + 1)]."""
  lengths = np.fromiter((len(p) for p in pieces), np.int64, count=len(pieces))
  out = np.empty(int(lengths.sum()) + len(pieces), dtype)
  ends = np.cumsum(lengths + 1) - 1             # position of each separator
  is_text = np.ones(out.shape, bool)
  is_text[ends] = False
  out[ends] = separator
  if len(pieces):
    out[is_text] = np.concatenate(pieces).astype(dtype, copy=False)
  return out


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255, separator 256, vocab_size 257."""

  name = "byte"
  vocab_size = 257
  eos_id = 256
  fingerprint = "byte"

  def encode_documents(self, documents: Sequence[Document]) -> np.ndarray:
    """`documents` -> <uint16>[sum(num_bytes + 1)], `eos_id` after each one."""
    pieces = [np.frombuffer(_as_bytes(d), np.uint8) for d in documents]
    return _join_with_separator(pieces, self.eos_id, token_dtype(self.vocab_size))

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; the separator is shown as a newline."""
    data = bytes(ord("\n") if i == self.eos_id else i for i in map(int, ids))
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A trained SentencePiece model; `eos_id` separates documents."""

  name = "sentencepiece"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = int(self._processor.vocab_size())
    self.eos_id = int(self._processor.eos_id())
    if self.eos_id < 0:
      raise ValueError("the SentencePiece model has no eos id (document separator)")
    # The token cache is keyed by this: a retrained model never reuses stale ids.
    digest = hashlib.sha1(model_proto).hexdigest()[:12]
    self.fingerprint = f"sp{self.vocab_size}-{digest}"

  @classmethod
  def from_file(cls, path: str) -> "SentencePieceTokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def encode_documents(self, documents: Sequence[Document]) -> np.ndarray:
    """`documents` -> <uint16|int32>[N], `eos_id` after each one."""
    ids = self._processor.encode([_as_str(d) for d in documents])
    pieces = [np.asarray(x, np.int64) for x in ids]
    return _join_with_separator(pieces, self.eos_id, token_dtype(self.vocab_size))

  def decode(self, ids: Iterable[int]) -> str:
    return self._processor.decode([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face tokenizer.json; `eos_id` (the checkpoint's eos token)
  separates documents.

  `vocab_size` is the larger of the tokenizer's (added tokens included) and
  `min_vocab_size` (a checkpoint's embedding is often padded beyond it).
  The eos token is read from tokenizer_config.json ("eos_token"), else
  config.json or generation_config.json ("eos_token_id") beside the file.
  """

  name = "hf"

  def __init__(self, path: str, min_vocab_size: int = 0):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    file = tokenizer_file(path)
    with open(file, "rb") as f:
      data = f.read()
    try:
      self._tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"config.data.tokenizer_path: {file} is not a readable tokenizer.json "
                       f"({e})") from None
    own = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
    self.vocab_size = max(own, int(min_vocab_size or 0))
    self.eos_id = _eos_id(os.path.dirname(file), self._tokenizer)
    self.fingerprint = f"hf{own}-{hashlib.sha1(data).hexdigest()[:12]}"

  def encode_documents(self, documents: Sequence[Document]) -> np.ndarray:
    """`documents` -> <uint16|int32>[N], `eos_id` after each one (no other
    special tokens are added)."""
    encodings = self._tokenizer.encode_batch([_as_str(d) for d in documents],
                                             add_special_tokens=False)
    pieces = [np.asarray(e.ids, np.int64) for e in encodings]
    return _join_with_separator(pieces, self.eos_id, token_dtype(self.vocab_size))

  def decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_file(path: Optional[str]) -> str:
  """The tokenizer.json of `path` (the file, or a folder holding it)."""
  if not path:
    raise ValueError("config.data.tokenizer='hf' needs config.data.tokenizer_path (a "
                     "tokenizer.json, or the checkpoint folder holding it)")
  file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise ValueError(f"config.data.tokenizer_path={path!r}: no tokenizer.json there")
  return file


def _eos_id(folder: str, tokenizer) -> int:
  """The eos token id named beside a tokenizer.json (see `HFTokenizer`)."""
  def read(name):
    try:
      with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}
  token = read("tokenizer_config.json").get("eos_token")
  if isinstance(token, dict):
    token = token.get("content")
  if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
    return int(tokenizer.token_to_id(token))
  for name in ("config.json", "generation_config.json"):
    value = read(name).get("eos_token_id")
    if isinstance(value, list) and value:
      value = value[0]
    if isinstance(value, int):
      return value
  raise ValueError(f"the tokenizer in {folder} names no eos token (tokenizer_config.json "
                   f"eos_token, or eos_token_id in config.json): moejax separates documents "
                   f"with it")


def _pieces(text: str, limit: int) -> Iterator[str]:
  """`text` cut into pieces of at most `limit` characters, at line ends if possible."""
  piece = ""
  for line in text.splitlines(keepends=True):
    for start in range(0, len(line), limit):
      part = line[start:start + limit]
      if len(piece) + len(part) > limit:
        yield piece
        piece = ""
      piece += part
  if piece:
    yield piece


def _training_sentences(documents: Iterable[Document], max_chars: int) -> Iterator[str]:
  """Training "sentences" from the first `max_chars` characters of `documents`.

  Lines are packed into pieces that fit `_SENTENCEPIECE_MAX_SENTENCE_BYTES`
  (4 bytes per character at most, twice: see the carry). The trainer drops a
  trailing newline of each sentence (it expects lines), so trailing newlines
  move to the start of the next sentence, where they are learned like any
  other character.
  """
  limit = _SENTENCEPIECE_MAX_SENTENCE_BYTES // 8
  remaining = max_chars
  carry = ""
  for document in documents:
    text = _as_str(document)[:remaining]
    remaining -= len(text)
    for piece in _pieces(text, limit):
      body = piece.rstrip("\n")
      if not body:
        carry = (carry + piece)[-limit:]
        continue
      yield carry + body
      carry = piece[len(body):]
    if remaining <= 0:
      return


def train_sentencepiece(documents: Iterable[Document], vocab_size: int, *,
                        max_chars: int = SENTENCEPIECE_SAMPLE_CHARS) -> bytes:
  """Trains a unigram SentencePiece model; returns the serialized model proto.

  Args:
    documents: training text (str or UTF-8 bytes), read up to `max_chars`.
    vocab_size: the number of pieces, including unk (0) and eos (1).
    max_chars: how many characters of `documents` to read.

  Raises:
    ValueError: the vocabulary cannot hold every character of the sample, or
      there is no text.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sentences = list(_training_sentences(documents, max_chars))
  if not sentences:
    raise ValueError("no text to train the SentencePiece model on")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=False,
        unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
        max_sentence_length=_SENTENCEPIECE_MAX_SENTENCE_BYTES,
        shuffle_input_sentence=False, num_threads=_SENTENCEPIECE_TRAIN_THREADS,
        minloglevel=2)
  except RuntimeError as e:
    # e.g. "Vocabulary size is smaller than required_chars" or "Vocabulary size
    # too high": both are about the requested size.
    raise ValueError(f"config.data.vocab_size={vocab_size} does not fit the SentencePiece "
                     f"training text: {e}") from e
  return model.getvalue()


def make_tokenizer(name: str, model_proto: Optional[bytes] = None,
                   path: Optional[str] = None, vocab_size: int = 0):
  """`ByteTokenizer()` for "byte"; a `SentencePieceTokenizer` from
  `model_proto`; an `HFTokenizer` from `path` (at least `vocab_size` ids)."""
  if name == "byte":
    return ByteTokenizer()
  if name == "hf":
    return HFTokenizer(path, vocab_size)
  if name == "sentencepiece":
    if model_proto is None:
      raise ValueError("tokenizer 'sentencepiece' needs a trained model (model_proto)")
    return SentencePieceTokenizer(model_proto)
  raise ValueError(f"config.data.tokenizer={name!r} is not a known tokenizer; "
                   f"valid: {', '.join(TOKENIZERS)}")
