"""Every notebook in notebooks/ runs top to bottom (tiny settings: MEDJAX_NOTEBOOK_TINY=1)
and is committed with its outputs stripped.

patient_guidance.ipynb measures the doctors grpo_vs_grao.ipynb trains (it trains them itself
only when their folder is missing): it runs right after that notebook in the same folder, as
a user would run them, instead of training the same tiny doctors a second time."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Notebooks that run after another one, in its folder, reading what it wrote.
RUNS_AFTER = {"patient_guidance": "grpo_vs_grao"}
GROUPS = [
    [path] + [p for p in NOTEBOOKS if RUNS_AFTER.get(p.stem) == path.stem]
    for path in NOTEBOOKS
    if path.stem not in RUNS_AFTER
]
pytestmark = pytest.mark.slow


def test_every_notebook_is_in_a_group():
    assert sorted(p for group in GROUPS for p in group) == NOTEBOOKS


@pytest.mark.parametrize("group", GROUPS, ids=["+".join(p.stem for p in g) for g in GROUPS])
def test_notebook_is_stripped_and_runs(group, tmp_path, run_train_env, monkeypatch):
    monkeypatch.setenv("MEDJAX_NOTEBOOK_TINY", "1")
    # Datasets and the HPO cache and BM25 index: the run's shared folders (conftest.py), built
    # once for every test that reads them; run folders go to the test's own folder.
    monkeypatch.setenv("TFDS_DATA_DIR", run_train_env["data_dir"])
    monkeypatch.setenv("MEDJAX_CACHE", run_train_env["env"]["MEDJAX_CACHE"])
    # The kernel is a fresh process: it must not inherit the test run's 8 fake devices; it
    # compiles at -O1 as the run_train.py subprocesses do (conftest.py's `run_train_env`).
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=1")
    for path in group:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{path.name}: commit notebooks with outputs stripped"
                )
        client = NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()  # Raises on the first cell that fails, with its traceback.
        images = [
            o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
        ]
        assert images, f"{path.name}: no figure was drawn"
