"""A run whose RUN_DIR is `gs://`: run_train.py against an in-memory GCS server (started here
on 127.0.0.1, tests/fake_gcs.py), SIGKILLed after its first checkpoint and run again, resumes
there and ends with the same metrics, export and results as an uninterrupted local run of the
same config, and writes nothing locally (not in its cwd, not in a `gs:` folder, not in its
TMPDIR).

The server speaks the GCS JSON API that gcsfs (etils.epath's backend for gs://, a test extra)
and tensorstore's gcs driver (orbax's arrays) use, with GCS's generations and preconditions.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medjax.models import checkpoint as checkpoint_lib
from medjax.training import metrics
from tests.fake_gcs import FakeGCS

# gcsfs's default filesystem first asks the storage-control gRPC API for the bucket's layout,
# which no local server serves: 60 s of retries per bucket. The plain one needs none.
GCSFS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
os.environ.update(GCSFS_ENV)
gcsfs = pytest.importorskip("gcsfs")

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

BUCKET = "medjax-test"
CONFIG = "gin/testing/sft.gin"
# Three steps, a checkpoint each: a kill after the first leaves two to redo.
BINDINGS = ("train_lib.SFTStage.steps=3",)
# Metrics that measure time or compilation, not learning: they differ between runs.
UNTIMED = ("time", "tokens_per_s", "compile")


def _files(root: pathlib.Path) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs} | {
        d for d, _, _ in os.walk(root)
    }


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The server: {"env": variables that point gcsfs and tensorstore at it, "fs"}."""
    server = FakeGCS(buckets=[BUCKET]).__enter__()
    url = server.url
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (orbax)
        "GOOGLE_CLOUD_PROJECT": "test",
        "FSSPEC_GCS_TOKEN": "anon",  # No credential lookup (and its warnings).
        **GCSFS_ENV,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"env": env, "fs": gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)}
    finally:
        server.__exit__(None, None, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _command(run_dir: str, data_dir: str) -> list[str]:
    cmd = [sys.executable, str(ROOT / "run_train.py"), f"--gin_file={CONFIG}"]
    cmd += [f"--gin_bindings=RUN_DIR='{run_dir}'", f"--gin_bindings=DATA_DIR='{data_dir}'"]
    return cmd + [f"--gin_bindings={b}" for b in BINDINGS]


@pytest.fixture(scope="module")
def runs(env, gcs, tmp_path_factory):
    """An uninterrupted local run, and the gs:// run killed after its first checkpoint and
    run again, from an empty cwd with a watched TMPDIR; the local files before and after."""
    local = tmp_path_factory.mktemp("local") / "run"
    subprocess.run(
        _command(str(local), env["data_dir"]), cwd=ROOT, env=env["env"], check=True,
        capture_output=True, timeout=600,
    )  # fmt: skip

    cwd = tmp_path_factory.mktemp("remote_cwd")
    tmpdir = tmp_path_factory.mktemp("watched_tmp")
    sub_env = dict(env["env"], **gcs["env"], TMPDIR=str(tmpdir))
    before = _files(cwd) | _files(tmpdir)
    remote = f"gs://{BUCKET}/run"
    fs = gcs["fs"]
    first = f"{BUCKET}/run/sft/checkpoints/1/commit_success.txt"
    proc = subprocess.Popen(
        _command(remote, env["data_dir"]), cwd=cwd, env=sub_env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not fs.exists(first):
        time.sleep(0.05)
        fs.invalidate_cache()
    proc.send_signal(signal.SIGKILL)
    _, killed_stderr = proc.communicate()
    fs.invalidate_cache()
    assert fs.exists(first), f"the run ended before step 1 was saved:\n{killed_stderr[-3000:]}"
    exported_when_killed = fs.exists(f"{BUCKET}/run/sft/export/config.json")
    resumed = subprocess.run(
        _command(remote, env["data_dir"]), cwd=cwd, env=sub_env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    fs.invalidate_cache()
    return {
        "local": local, "remote": remote, "fs": fs, "resumed": resumed,
        "exported_when_killed": exported_when_killed,
        "new_local": sorted((_files(cwd) | _files(tmpdir)) - before), "cwd": cwd,
    }  # fmt: skip


def _learning(records):
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in records]


def test_the_killed_gs_run_resumes_to_the_uninterrupted_local_metrics(runs):
    # Catches a gs:// run_dir made local (the rerun would find no checkpoint and start over,
    # or write a second run), metrics lost on a filesystem without append, and a resume that
    # does not restore the remote checkpoint.
    assert not runs["exported_when_killed"]
    assert "sft: resumed from step" in runs["resumed"].stdout, runs["resumed"].stdout[-2000:]
    remote = metrics.read_jsonl(f"{runs['remote']}/sft/metrics.jsonl")
    local = metrics.read_jsonl(runs["local"] / "sft" / "metrics.jsonl")
    assert [r["step"] for r in remote] == [1, 2, 3]
    assert _learning(remote) == _learning(local)
    # TensorBoard's view of the two event files (killed run, rerun) is the JSONL's.
    events = metrics.read_event_scalars(f"{runs['remote']}/sft")
    assert [s for s, _ in events["loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in events["loss"]], [r["loss"] for r in local])


def test_the_bucket_holds_the_whole_run_equal_to_the_local_one(runs):
    # Catches an export, evaluation or results file written to a local path, or an export
    # whose weights differ from the uninterrupted run's.
    fs, bucket_run, local = runs["fs"], f"{BUCKET}/run", runs["local"]
    names = {p.removeprefix(bucket_run + "/") for p in fs.find(bucket_run)}
    for name in (
        "run.json", "config.gin", "tokenizer/tokenizer.json", "sft/export/config.json",
        "sft/export/model.safetensors", "sft/export/tokenizer.json", "eval/before.json",
        "eval/after_sft.json", "results.json", "results.md", "sft/metrics.jsonl",
    ):  # fmt: skip
        assert name in names, name
    steps = {n.split("/")[2] for n in names if n.startswith("sft/checkpoints/")}
    assert steps == {"2", "3"}  # keep_checkpoints 2
    assert (
        json.loads(fs.cat(f"{bucket_run}/run.json"))["settings"]
        == json.loads((local / "run.json").read_text())["settings"]
    )
    assert json.loads(fs.cat(f"{bucket_run}/results.json")) == json.loads(
        (local / "results.json").read_text()
    )
    for point in ("before", "after_sft"):
        got = json.loads(fs.cat(f"{bucket_run}/eval/{point}.json"))
        want = json.loads((local / "eval" / f"{point}.json").read_text())
        got.pop("time_s"), want.pop("time_s")
        assert got == want, point
    want = checkpoint_lib.read_safetensors(local / "sft" / "export" / "model.safetensors")
    blob = fs.cat(f"{bucket_run}/sft/export/model.safetensors")
    got_path = local.parent / "remote_model.safetensors"
    got_path.write_bytes(blob)
    got = checkpoint_lib.read_safetensors(got_path)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_nothing_was_written_locally(runs):
    # Catches os.path.abspath("gs://...") (a local <cwd>/gs:/ folder), a tokenizer, export or
    # model load staged in TMPDIR and left there.
    assert runs["new_local"] == []
    assert not (runs["cwd"] / "gs:").exists()
