"""examples/quickstart.ipynb, the library's tour on the demo model: stored without outputs, and run from
top to bottom (a kernel of this interpreter) with the table and the figure it promises."""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
pytestmark = pytest.mark.skipif(not (ROOT / "models" / "mamba-tiny-demo" / "config.json").is_file(),
                                reason="the demo model is not bundled")


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_notebook_runs_and_shows_a_table_and_a_figure(punkt, monkeypatch):
    monkeypatch.setenv("NLTK_DATA", str(punkt))  # the kernel's IFEval checkers
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    shown = [output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("text/markdown" in data and "| neuron | impact" in data["text/markdown"] for data in shown)
    assert any("image/png" in data for data in shown)
    last = notebook.cells[-1].outputs[-1]["data"]["text/plain"]
    assert "'baseline'" in last and "delta_sensitive_L20" in last
