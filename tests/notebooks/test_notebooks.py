"""Every notebook in notebooks/ runs top to bottom (tiny settings: MEDJAX_NOTEBOOK_TINY=1)
and is committed with its outputs stripped."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped_and_runs(path, tmp_path, tmp_path_factory, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: commit notebooks with outputs stripped"
            )
    monkeypatch.setenv("MEDJAX_NOTEBOOK_TINY", "1")
    # Datasets, the HPO cache and run folders go to the test's own folders.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "notebook_tfds"))
    monkeypatch.setenv("MEDJAX_CACHE", str(tmp_path_factory.getbasetemp() / "notebook_cache"))
    # The kernel is a fresh process: it must not inherit the test run's 8 fake devices.
    monkeypatch.setenv("XLA_FLAGS", "")
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # Raises on the first cell that fails, with its traceback.
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no figure was drawn"
