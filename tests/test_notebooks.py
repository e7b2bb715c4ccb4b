"""The notebooks in notebooks/ run top to bottom on CPU (executed here with nbclient, so
they cannot rot). The sampling notebook builds its random tiny pipeline (the quickstart's
may not exist here) and samples with few steps."""

import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")


def execute(name, monkeypatch, **env):
    """Runs every cell in a fresh kernel (cwd: notebooks/); returns the executed notebook."""
    for key, value in {"JAX_PLATFORMS": "cpu", **env}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOKS}}).execute()
    return notebook


def outputs(notebook, kind):
    return [o for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if kind in o.get("data", {})]


def text(notebook):
    return "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []))


def test_sampling_notebook(monkeypatch):
    notebook = execute("sampling.ipynb", monkeypatch, UNIALIGN_PIPELINE="random",
                       UNIALIGN_NOTEBOOK_STEPS="2")
    # inline rows: generated; generated, edited, perceived (side by side); composed
    assert len(outputs(notebook, "image/png")) == 5
    printed = text(notebook)
    assert "building a random tiny one" in printed
    assert printed.count(" -> ") == 4  # four captions


def test_convert_and_compare_notebook(monkeypatch):
    notebook = execute("convert_and_compare.ipynb", monkeypatch)
    assert len(outputs(notebook, "image/png")) == 1  # the side-by-side figure
    assert "all bit-identical: True" in text(notebook)
