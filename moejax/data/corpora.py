"""Text corpora read from their files, without TFDS or TensorFlow.

`tiny_shakespeare` with `config.data.manual_dir` set is read here: TFDS's
builder (tensorflow_datasets/datasets/tiny_shakespeare, version 1.0.0) reads
karpathy's `input.txt` (its size and SHA-256 are checked, as TFDS does), cuts the
text by characters into train (the first 90%), validation (half of the rest)
and test (the remainder), and stores each split as one document. This module
cuts the same three documents, so the tokens, the token caches (under
`tiny_shakespeare/1.0.0`, the folder name of the TFDS build) and every number
trained on them are those of the TFDS build (tests/test_data.py compares the
two where TFDS is installed). Without `manual_dir` the name goes to TFDS,
which downloads.

A corpus offers what `text.TextDataset` asks of a TFDS builder: `info`
(`full_name`, `splits`, `features`) and `documents(split, text_key)`.
"""

import dataclasses
import hashlib
import os
from typing import Callable, Iterator, Optional

import numpy as np

# tiny_shakespeare: TFDS's checksums.tsv entry for the file.
_SHAKESPEARE_FILE = "input.txt"
_SHAKESPEARE_SIZE = 1115394
_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclasses.dataclass(frozen=True)
class Info:
  full_name: str                  # "<name>/<version>": the token cache folder
  splits: tuple[str, ...]
  features: tuple[str, ...]       # the text features (text_key values)


class Corpus:
  """A corpus held as one document per split."""

  def __init__(self, info: Info, texts: dict[str, str]):
    self.info = info
    self.name = info.full_name.split("/")[0]
    self._texts = texts

  def check_split(self, key: str, split: str) -> None:
    """`split` is a split name or names joined by "+" (no TFDS slices)."""
    names = [part.strip() for part in split.split("+")]
    if not all(name in self.info.splits for name in names):
      raise ValueError(f"config.data.{key}={split!r} is not a split of "
                       f"{self.info.full_name}; splits: {sorted(self.info.splits)} (read from "
                       "config.data.manual_dir without TFDS: whole splits, joined by '+')")

  def documents(self, split: str, text_key: str) -> Iterator[np.ndarray]:
    """Batches of documents (<object>[n] of UTF-8 bytes), as `text.iter_documents`."""
    del text_key  # checked by text.check_text_key
    for name in split.split("+"):
      yield np.array([self._texts[name.strip()].encode("utf-8")], dtype=object)


def _read_checked(path: str, size: int, sha256: str) -> str:
  if not os.path.isfile(path):
    raise ValueError(f"config.data.manual_dir={os.path.dirname(path)!r} lacks "
                     f"[{os.path.basename(path)!r}], the file the dataset is read from")
  with open(path, "rb") as f:
    data = f.read()
  if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
    raise ValueError(f"{path} is not the expected file ({len(data)} bytes, expected {size} "
                     f"with SHA-256 {sha256[:12]}...): replace it with the original")
  return data.decode("utf-8")


def tiny_shakespeare(manual_dir: str) -> Corpus:
  """TFDS's tiny_shakespeare 1.0.0 splits from `manual_dir`/input.txt."""
  text = _read_checked(os.path.join(manual_dir, _SHAKESPEARE_FILE), _SHAKESPEARE_SIZE,
                       _SHAKESPEARE_SHA256)
  cut = int(len(text) * 0.9)
  train, rest = text[:cut], text[cut:]
  cut = int(len(rest) * 0.5)
  texts = {"train": train, "validation": rest[:cut], "test": rest[cut:]}
  return Corpus(Info("tiny_shakespeare/1.0.0", tuple(texts), ("text",)), texts)


READERS: dict[str, Callable[[str], Corpus]] = {"tiny_shakespeare": tiny_shakespeare}


def reads(name: str, manual_dir: Optional[str]) -> bool:
  """Whether `config.data.name` is read here: a corpus of `READERS` (its bare
  name, or with the one version read, "tiny_shakespeare:1.0.0") and a local
  manual_dir holding its files."""
  bare = name.split(":")[0]
  version = name.split(":")[1] if ":" in name else None
  return (bare in READERS and version in (None, "1.0.0") and manual_dir is not None
          and "://" not in manual_dir)


def open_corpus(name: str, manual_dir: str) -> Corpus:
  if not os.path.isdir(manual_dir):
    raise ValueError(f"config.data.manual_dir={manual_dir!r} does not exist")
  return READERS[name.split(":")[0]](manual_dir)
