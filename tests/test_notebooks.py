"""Every notebook runs top to bottom in fast mode (OPTAX_ADADELTA_FAST=1).

A few minutes on 2 CPU cores, so these are `slow`: `python -m pytest --run-slow` (CI runs them).
"""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_there():
  names = {path.stem for path in NOTEBOOKS}
  assert names == {"quickstart", "paper_reproduction", "multi_device", "d2l_airfoil"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom_in_fast_mode(path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("OPTAX_ADADELTA_FAST", "1")
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  )
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
