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

`python_stdlib` is the source of this interpreter's standard library (its .py
files, without site-packages and the test suites), one document per file, a
code corpus every machine has (11 MB on CPython 3.11). A file's split follows
from a hash of its path (validation and test: 1/20 of the files each); the
version is the Python version and a digest of the files' contents
("python_stdlib/3.11.7-<8 hex>"), so token caches and results name the exact
text they were trained on.

A corpus offers what `text.TextDataset` asks of a TFDS builder: `info`
(`full_name`, `splits`, `features`) and `documents(split, text_key)`.
"""

import dataclasses
import hashlib
import os
import platform
import sysconfig
from typing import Callable, Iterator, Optional

import numpy as np

_READ_BATCH = 256  # documents per batch of `Corpus.documents`
# python_stdlib: folders left out (installed packages; test suites, whose data
# files include deliberately malformed source).
_STDLIB_SKIP_TOP = ("site-packages", "dist-packages")
_STDLIB_SKIP_ANY = ("test", "tests", "idle_test", "__pycache__")
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
  """A corpus held in memory: per split, one text or a list of documents (bytes)."""

  def __init__(self, info: Info, texts: dict[str, str | list[bytes]]):
    self.info = info
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
      texts = self._texts[name.strip()]
      if isinstance(texts, str):
        texts = [texts.encode("utf-8")]
      for start in range(0, len(texts), _READ_BATCH):
        yield np.array(texts[start:start + _READ_BATCH], dtype=object)


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


def _stdlib_files(root: str) -> list[str]:
  """The standard library's .py files (paths relative to `root`, sorted),
  without installed packages and the test suites."""
  found = []
  for folder, subfolders, files in os.walk(root):
    relative = os.path.relpath(folder, root)
    parts = [] if relative == "." else relative.split(os.sep)
    if parts and (parts[0] in _STDLIB_SKIP_TOP or parts[-1] in _STDLIB_SKIP_ANY):
      subfolders[:] = []
      continue
    subfolders.sort()
    found.extend(os.path.join(relative, name) if parts else name
                 for name in files if name.endswith(".py"))
  return sorted(found)


def _stdlib_split(relative_path: str) -> str:
  """validation and test: 1/20 of the files each, by a hash of the path."""
  bucket = hashlib.sha256(relative_path.encode("utf-8")).digest()[0] % 20
  return {0: "validation", 1: "test"}.get(bucket, "train")


def python_stdlib(manual_dir: Optional[str]) -> Corpus:
  """This interpreter's standard library source as a code corpus, one document per file."""
  if manual_dir is not None:
    raise ValueError(f"config.data.manual_dir={manual_dir!r} does not apply to "
                     "python_stdlib: it reads this interpreter's standard library "
                     f"({sysconfig.get_paths()['stdlib']}); leave manual_dir unset")
  root = sysconfig.get_paths()["stdlib"]
  texts: dict[str, list[bytes]] = {"train": [], "validation": [], "test": []}
  digest = hashlib.sha256()
  for relative in _stdlib_files(root):
    with open(os.path.join(root, relative), "rb") as f:
      data = f.read()
    digest.update(relative.encode("utf-8") + b"\0" + data + b"\0")
    texts[_stdlib_split(relative)].append(data)
  if not texts["train"]:
    raise ValueError(f"python_stdlib: no .py files under {root}")
  version = f"{platform.python_version()}-{digest.hexdigest()[:8]}"
  return Corpus(Info(f"python_stdlib/{version}", tuple(texts), ("text",)), texts)


@dataclasses.dataclass(frozen=True)
class Reader:
  read: Callable[[Optional[str]], Corpus]
  versions: tuple[str, ...]  # accepted after "name:"; empty: any
  from_manual_dir: bool      # read only with a manual_dir (without one, TFDS)


READERS: dict[str, Reader] = {
    "tiny_shakespeare": Reader(tiny_shakespeare, ("1.0.0",), from_manual_dir=True),
    "python_stdlib": Reader(python_stdlib, (), from_manual_dir=False),
}


def is_local_path(path: str) -> bool:
  return "://" not in path


def reads(name: str, manual_dir: Optional[str]) -> bool:
  """Whether `config.data.name` is read here: a corpus of `READERS` (its bare
  name, or with a version it reads, "tiny_shakespeare:1.0.0"), and for a
  corpus read from files, a local manual_dir."""
  bare, _, version = name.partition(":")
  reader = READERS.get(bare)
  if reader is None or (version and reader.versions and version not in reader.versions):
    return False
  if not reader.from_manual_dir:
    return True
  return manual_dir is not None and is_local_path(manual_dir)


def open_corpus(name: str, manual_dir: Optional[str]) -> Corpus:
  reader = READERS[name.partition(":")[0]]
  if reader.from_manual_dir and not os.path.isdir(manual_dir):
    raise ValueError(f"config.data.manual_dir={manual_dir!r} does not exist")
  corpus = reader.read(manual_dir)
  version = name.partition(":")[2]
  if version and not corpus.info.full_name.endswith("/" + version):
    raise ValueError(f"config.data.name={name!r}: this machine's corpus is "
                     f"{corpus.info.full_name}")
  return corpus
