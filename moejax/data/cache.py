"""Reading the token cache back: a damaged file is one message, not a traceback.

The cache folder `cache_dir/<dataset>/<version>/` holds the tokenized splits
(`.npy` for the memory loader, `.array_record` for Grain), their JSON
sidecars and trained SentencePiece models. Everything in it is derived from
the dataset, so the cure for any damage (a copy cut short, a full disk, a
file edited by hand) is to delete the folder: the next run rebuilds it.
`CacheError` says so, naming the file; it is a ValueError, so the CLIs print
it as one line.
"""

import json
import os
from typing import Any, Callable, Optional, Sequence

_REASON_CHARS = 300  # of a library's message (ArrayRecord's run to several lines)


class CacheError(ValueError):
  """A file of the token cache is damaged; the message names it and the folder
  to delete."""


def damaged(path: str, problem: str) -> CacheError:
  """The error for cache file `path`; `problem` completes "the file ... "."""
  folder = os.path.dirname(os.path.abspath(path))
  return CacheError(f"the token cache file {path} {problem}; the cache is damaged: delete "
                    f"the folder {folder} to rebuild it (the next run tokenizes the "
                    f"dataset again)")


def reason(error: BaseException) -> str:
  """A library's error as a short single line."""
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def read_sidecar(path: str, required: Sequence[str],
                 check: Optional[Callable[[dict], Optional[str]]] = None) -> dict[str, Any]:
  """The JSON facts of a cached split; CacheError when the file is garbage,
  lacks a key of `required`, or `check(facts)` returns a problem."""
  try:
    with open(path, encoding="utf-8") as f:
      facts = json.load(f)
  except (UnicodeDecodeError, ValueError) as e:
    raise damaged(path, f"is not valid JSON ({reason(e)})") from None
  if not isinstance(facts, dict):
    raise damaged(path, "does not hold a JSON object")
  missing = [key for key in required if key not in facts]
  if missing:
    raise damaged(path, f"lacks {', '.join(missing)}")
  problem = check(facts) if check else None
  if problem:
    raise damaged(path, problem)
  return facts
