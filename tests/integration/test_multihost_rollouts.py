"""Rollouts over two processes of one jax cluster, with every suite run (the whole-run
comparison in test_multihost.py is opt-in): each process copies a model whose parameters span
both onto its own devices (`multihost.local_copy`), samples its share of the prompts there
with per-row streams, and the rows are gathered (`multihost.gather_json`); the gathered rows
equal one process sampling every prompt."""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np

from medjax.llm import JaxPolicyBackend
from tests.integration import multihost_rollout_case as case

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integration" / "multihost_rollout_worker.py"


def test_each_process_samples_its_share_on_its_copy_and_the_rows_gather_to_one_processs(
    env, tmp_path
):
    """Catches: a local copy that is not whole or not on the process's own devices (a shard
    of the global array, another host's chips), rows gathered out of process order or lost,
    and samples that depend on which prompts share a call (process 0 samples prompts 0-1,
    process 1 prompts 2-3; one process samples all 4 in one call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "report.json"
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    command = [sys.executable, str(WORKER)]
    procs = [
        subprocess.Popen([*command, str(i), str(port), str(out)], cwd=ROOT, env=env["env"], **pipes)
        for i in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    report = json.loads(out.read_text())
    assert report["spans"]  # The global parameters really span both processes.
    assert report["placed"] and report["equal"] and report["leaves"] > 10
    rows = report["rows"]
    assert [r["process"] for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]  # 2 prompts x G=2 each.
    model, tok = case.tiny()
    expected = JaxPolicyBackend(model, tok, seed=case.SEED).generate_ids(
        case.PROMPTS, case.PARAMS, num_samples=2, streams=case.STREAMS
    )
    assert [r["tokens"] for r in rows] == [g.token_ids for g in expected]
    for r, g in zip(rows, expected, strict=True):
        np.testing.assert_allclose(r["logps"], g.logps, atol=1e-5)
