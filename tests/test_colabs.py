"""Executes every notebook in colabs/ top to bottom with nbclient, as a reader
would, in QUICK mode (MOEJAX_QUICK=1: each study notebook retrains a miniature
of its study end to end); the notebooks' own asserts are part of the test."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = sorted((pathlib.Path(__file__).resolve().parents[1] / "colabs").glob("*.ipynb"))
STUDIES = {"experts", "capacity", "expert_choice", "z_loss", "granularity", "upcycling", "lora",
           "bias_balancing", "hash_layers", "routing_stability"}


def test_there_are_notebooks():
  assert COLABS


def _execute(path: pathlib.Path, quick: bool):
  notebook = nbformat.read(path, as_version=4)
  os.environ["MOEJAX_QUICK"] = "1" if quick else "0"
  try:
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
  finally:
    os.environ.pop("MOEJAX_QUICK", None)
  return notebook


def _outputs(notebook, output_type):
  return [o for cell in notebook.cells if cell.cell_type == "code"
          for o in cell.get("outputs", []) if o.get("output_type") == output_type]


@pytest.mark.slow
@pytest.mark.parametrize("path", COLABS, ids=lambda p: p.name)
def test_notebook_runs_in_quick_mode(path):
  notebook = _execute(path, quick=True)
  assert not _outputs(notebook, "error")
  printed = "".join(o.get("text", "") for o in _outputs(notebook, "stream"))
  assert "moejax's tests passed with jax" in printed, path.name  # the setup cell's versions
  if path.stem in STUDIES:  # the miniature drew its figures, and said what it is
    assert any("image/png" in o.get("data", {}) for o in _outputs(notebook, "display_data"))
    assert "cannot show the claim" in printed, path.name


@pytest.mark.parametrize("path", COLABS, ids=lambda p: p.name)
def test_notebook_is_saved_with_outputs(path):
  """What a reader opens: every code cell ran, in order, and study figures are there."""
  notebook = nbformat.read(path, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  counts = [cell.get("execution_count") for cell in code]
  assert all(counts) and counts == sorted(counts), f"{path.name}: not saved after a full run"
  assert not _outputs(notebook, "error")
  if path.stem in STUDIES:
    assert any("image/png" in o.get("data", {}) for o in _outputs(notebook, "display_data"))


def test_study_notebooks_have_an_install_cell_and_a_verdict():
  for path in COLABS:
    notebook = nbformat.read(path, as_version=4)
    text = "\n".join(cell.source for cell in notebook.cells)
    assert "pip\", \"install\", \"-q\", \"-e\"" in text, path.name
    assert "<this repo>" not in text, path.name
    if path.stem in STUDIES:
      assert "## Verdict" in text and "QUICK" in text, path.name
