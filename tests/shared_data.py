"""The ../shared data folder beside the clone (CI has it): where tests find tiny_shakespeare."""

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE_DIR = REPO.parent / "shared" / "data" / "tiny_shakespeare"
_MISSING = f"no {SHAKESPEARE_DIR}/input.txt (the ../shared data folder beside the clone)"


def has_shakespeare() -> bool:
  return (SHAKESPEARE_DIR / "input.txt").exists()


needs_shakespeare = pytest.mark.skipif(not has_shakespeare(), reason=_MISSING)


def skip_without_shakespeare() -> None:
  """In a fixture: skips its tests where the file is absent."""
  if not has_shakespeare():
    pytest.skip(_MISSING)
