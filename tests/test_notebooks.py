"""Execute every notebook under ``notebooks/`` (slow: run in CI)."""

import glob
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebook found under {os.path.join(ROOT, 'notebooks')}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path} has stored outputs"
    env_bin = os.path.dirname(sys.executable)
    # The python3 kernel must be this interpreter's environment (ipykernel installed here).
    monkeypatch.setenv("PATH", env_bin + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    start = time.perf_counter()
    client.execute()
    print(f"{os.path.basename(path)}: {time.perf_counter() - start:.1f} s")
