"""medjax.paths and the writers that use it on a remote filesystem: a `gs://` path stays
remote, metrics keep every record where append does not exist, an export is complete once its
config.json is there, and a remote folder loads back equal.

The remote filesystem is an in-memory fsspec one registered for `gs://` that, like gcsfs,
silently overwrites an object opened for append, and that logs the order objects are written.
"""

import importlib
import os
import tempfile
from typing import ClassVar

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from flax import nnx
from fsspec.implementations.memory import MemoryFileSystem

from medjax import models, paths
from medjax.training import checkpoints, metrics


class NoAppendFileSystem(MemoryFileSystem):
    """gs:// in memory without append: mode "a" overwrites, as gcsfs does (with a warning)."""

    protocol = ("gs", "gcs")
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list] = [""]
    written: ClassVar[list] = []  # Object paths in the order their writes were opened.

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            mode = mode.replace("a", "w")
        if "w" in mode:
            NoAppendFileSystem.written.append(path)
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs:// served by NoAppendFileSystem for one test, run from an empty local cwd."""
    registry = importlib.import_module("fsspec.registry")._registry
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(registry, protocol, NoAppendFileSystem)
    # epath caches the filesystem it made for gs://: make it ask fsspec again (and after).
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    NoAppendFileSystem.store.clear()
    NoAppendFileSystem.written.clear()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    NoAppendFileSystem.store.clear()


def test_absolute_keeps_remote_paths_and_makes_local_ones_absolute(tmp_path, monkeypatch):
    # Catches os.path.abspath on a gs:// run_dir, which is the local folder <cwd>/gs:/b/run.
    monkeypatch.chdir(tmp_path)
    assert paths.absolute("gs://b/run") == "gs://b/run"
    assert paths.absolute("s3://b/x/") == "s3://b/x/"
    assert paths.absolute("run") == os.path.join(str(tmp_path), "run")
    assert paths.absolute("/abs/run") == "/abs/run"
    assert paths.is_remote("gs://b") and not paths.is_remote("/tmp/gs:/b")


def test_metrics_on_a_filesystem_without_append_keep_every_record(fake_gcs):
    # Catches metrics.jsonl opened with "a" and the event file streamed on gs://: each later
    # open would overwrite the earlier records (steps 1-2 lost after the resume), and a
    # pathlib run_dir would write a local gs:/ folder instead.
    run_dir = "gs://bkt/run"
    with metrics.MetricsWriter(run_dir, subdir="sft", interactive=False) as writer:
        writer.start(0)
        for step, loss in ((1, 0.5), (2, 0.25), (3, 0.125)):
            writer.write(step, {"loss": loss})
    # A resumed run: the checkpoint is at step 2, so step 3 is dropped and written again.
    with metrics.MetricsWriter(run_dir, subdir="sft", interactive=False) as writer:
        assert writer.truncate_after(2) == 1
        writer.start(2)
        writer.write(3, {"loss": 1.0})
        writer.write(4, {"loss": 2.0})
    records = metrics.read_jsonl("gs://bkt/run/sft/metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (2, 0.25), (3, 1.0), (4, 2.0)]
    # Two event files (one per writer); TensorBoard's view hides the first run's step 3.
    scalars = metrics.read_event_scalars("gs://bkt/run/sft")
    assert scalars == {"loss": [(1, 0.5), (2, 0.25), (3, 1.0), (4, 2.0)]}
    assert os.listdir(fake_gcs) == []


def test_export_to_a_remote_folder_writes_config_last_and_loads_back(
    fake_gcs, tmp_path, monkeypatch
):
    # Catches config.json written first (a killed export would look finished to stage_done)
    # and pathlib turning gs:// into a local gs:/ folder; the load catches a remote folder
    # read with local file calls.
    config = models.ModelConfig(
        family="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2, num_kv_heads=1, qkv_bias=True, tie_word_embeddings=True,
    )  # fmt: skip
    model = models.DecoderLM(config, rngs=nnx.Rngs(0))
    models.save_pretrained(model, "gs://bkt/export", max_shard_bytes=4096)
    written = [os.path.basename(p) for p in NoAppendFileSystem.written]
    assert written[-1] == "config.json"
    assert "model.safetensors.index.json" in written  # Sharded: more than one weight file.
    assert models.is_checkpoint("gs://bkt/export")
    watched = tmp_path / "watched_tmp"
    watched.mkdir()
    monkeypatch.setenv("TMPDIR", str(watched))
    monkeypatch.setattr(tempfile, "tempdir", None)  # Read TMPDIR again.
    loaded = models.from_pretrained("gs://bkt/export")
    want = jax.tree.leaves(nnx.state(model, nnx.Param))
    got = jax.tree.leaves(nnx.state(loaded, nnx.Param))
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The local copy it loaded from is gone, and nothing else was written locally.
    assert os.listdir(watched) == [] and os.listdir(fake_gcs) == []


def test_a_half_written_remote_save_is_not_a_stray_but_a_finished_one_needs_meta(fake_gcs):
    # Catches the run_dir check refusing a gs:// run killed mid-save (orbax writes a GCS step
    # in place: no meta/ yet, no commit_success.txt), and accepting a finished step
    # without meta/.
    fs = NoAppendFileSystem()
    fs.pipe("gs://bkt/ck/1/meta/metadata", b"{}")
    fs.pipe("gs://bkt/ck/1/commit_success.txt", b"ok")
    fs.pipe("gs://bkt/ck/2/state/manifest.ocdbt", b"half")
    checkpoints._check_directory("gs://bkt/ck")
    fs.pipe("gs://bkt/ck/3/state/manifest.ocdbt", b"whole")
    fs.pipe("gs://bkt/ck/3/commit_success.txt", b"ok")
    with pytest.raises(checkpoints.CheckpointDirError, match="ck/3 is not a medjax checkpoint"):
        checkpoints._check_directory("gs://bkt/ck")
