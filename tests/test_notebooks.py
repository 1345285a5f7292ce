"""Execute every notebook in quick mode (``LRSGE_QUICK=1``) with a timeout.

Run with ``python -m pytest --notebooks -m notebooks``.  Each notebook runs in a
fresh kernel from the ``notebooks/`` folder, writes its results to a temporary
folder (``LRSGE_OUT``) and must finish without an error within ``TIMEOUT_S``.
Committed notebooks must carry no outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 600  # per notebook; quick mode needs a few minutes at most on 2 CPU cores


def test_notebooks_exist_and_carry_no_outputs():
    import nbformat

    names = {p.stem for p in NOTEBOOKS}
    for required in ("unbiasedness", "mse_vs_samples", "projector_moments", "optimal_projector"):
        assert required in names, f"notebooks/{required}.ipynb is missing"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, (
                    f"{path.name} was committed with outputs: clear them")
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells), (
            f"{path.name} has no papermill 'parameters' cell")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_in_quick_mode(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LRSGE_QUICK", "1")
    monkeypatch.setenv("LRSGE_OUT", str(tmp_path / "results"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    assert any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
