"""Runs every notebook in colabs/ top to bottom (their asserts are the test)."""

import json
import pathlib

import pytest

COLABS = sorted((pathlib.Path(__file__).resolve().parents[1] / "colabs").glob("*.ipynb"))


def test_there_are_notebooks():
  assert COLABS


@pytest.mark.parametrize("path", COLABS, ids=lambda p: p.name)
def test_notebook_runs(path):
  notebook = json.loads(path.read_text())
  namespace = {"__name__": "__colab__"}
  for index, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    # Shell and magic lines (!pip, %matplotlib) are Colab set-up, not code under test.
    source = "\n".join(line for line in source.splitlines()
                       if not line.lstrip().startswith(("!", "%")))
    exec(compile(source, f"{path.name}[cell {index}]", "exec"), namespace)  # pylint: disable=exec-used
