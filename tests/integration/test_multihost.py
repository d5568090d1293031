"""run_train.py over two processes of one jax cluster (jax.distributed, gloo collectives on
CPU) against one process with as many devices; a lost process and an unreachable coordinator
as one line.

The run (gin/testing/multihost.gin: SFT, GRPO, GRAO and M-GRPO with a shared model) puts its
fsdp axis across the two processes, so parameters and scores span both. Each process runs the
episodes of its own questions on its own copy of the policy and the trajectories are gathered
(`medjax.multihost`), so its metrics must equal one process's.
"""

import io
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from medjax import distributed
from medjax.training import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
STAGES = ("sft", "grpo", "grao", "mgrpo")
UNTIMED = ("time", "tokens_per_s", "compile")
pytestmark = pytest.mark.slow
# The whole-run comparisons (a 1-process and a 2-process run of four stages, then a killed
# and resumed pair: 6 min 44 s on 2 cores) are opt-in: `python -m pytest -m multihost
# tests/integration/test_multihost.py`. The lost-process and coordinator tests run always.
whole_runs = pytest.mark.multihost


def train_command(run_dir, data_dir, *extra):
    return [
        "run_train.py", "--gin_file=gin/testing/multihost.gin",
        f"--gin_bindings=RUN_DIR='{run_dir}'", f"--gin_bindings=DATA_DIR='{data_dir}'", *extra,
    ]  # fmt: skip


def with_devices(env, count):
    flags = [f for f in env["XLA_FLAGS"].split() if "host_platform_device_count" not in f]
    return dict(
        env, XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    )


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    """The same run as 1 process x 4 devices and, through medjax.launch_local, as 2
    processes x 2 devices: {"one", "two", "logs", "launcher"}."""
    root = tmp_path_factory.mktemp("multihost")
    one, two, logs = root / "one", root / "two", root / "logs"
    out = subprocess.run(
        [sys.executable, *train_command(one, env["data_dir"])], cwd=ROOT,
        env=with_devices(env["env"], 4), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    launcher = subprocess.run(
        [sys.executable, "-m", "medjax.launch_local", "--num_processes=2",
         "--devices_per_process=2", f"--log_dir={logs}", "--",
         *train_command(two, env["data_dir"], "--heartbeat_timeout=20")],
        cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert launcher.returncode == 0, launcher.stdout[-4000:]
    return {"one": one, "two": two, "logs": logs, "launcher": launcher}


def learning_metrics(path):
    return [
        {k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in metrics.read_jsonl(path)
    ]


def assert_same_metrics(expected_dir, run_dir):
    """Every stage's metrics.jsonl, times and compile counts aside, within 1e-5."""
    for stage in STAGES:
        one = learning_metrics(expected_dir / stage / "metrics.jsonl")
        two = learning_metrics(run_dir / stage / "metrics.jsonl")
        assert len(one) == len(two) > 0, stage
        for a, b in zip(one, two, strict=True):
            assert a.keys() == b.keys(), stage
            for k in a:
                assert b[k] == pytest.approx(a[k], abs=1e-5, rel=0), (stage, a["step"], k)


@whole_runs
def test_two_processes_equal_one(runs):
    """Catches: a process feeding the wrong rows of a batch (rows are not one block per
    process), scores or sampled tokens read from one process's shards, groups split across
    processes (advantages from part of a group), a decision taken differently per process."""
    assert_same_metrics(runs["one"], runs["two"])


@whole_runs
def test_each_process_runs_the_episodes_of_its_own_questions(runs):
    """Each RL step's 2 questions (G = 2 episodes each) split one a process: every process
    says it ran 2 episodes of 1 question at every step of every RL stage. Catches: every
    process running every episode (4 episodes), or a split that loses or repeats a question
    (the metrics test above then also fails)."""
    steps = [("grpo", 1), ("grpo", 2), ("grao", 1), ("mgrpo", 1)]
    for i in (0, 1):
        log = (runs["logs"] / f"process_{i}.log").read_text()
        ran = re.findall(r"(\w+) step (\d+): process (\d) ran (\d+) episodes \((\d+) of (\d+)", log)
        assert ran == [(s, str(n), str(i), "2", "1", "2") for s, n in steps], (i, ran)


@whole_runs
def test_the_export_of_parameters_that_span_processes_is_the_same(runs):
    """Catches: an export that gathers only process 0's shards (or fails on them), or that
    process 1 skips while process 0 waits in the gather. Measured: the tensors are equal bit
    for bit, so the comparison is exact."""
    for stage in STAGES:
        one = load_file(runs["one"] / stage / "export" / "model.safetensors")
        two = load_file(runs["two"] / stage / "export" / "model.safetensors")
        assert one.keys() == two.keys()
        for name in one:
            np.testing.assert_array_equal(two[name], one[name], err_msg=f"{stage} {name}")


@whole_runs
def test_only_process_zero_writes_the_run_files(runs):
    """Catches: process 1 also writing TensorBoard events (a second event file per stage),
    results (its log shows the table) or the run's files; a process without its own log."""
    two = runs["two"]
    for name in ("run.json", "config.gin", "results.json", "results.md"):
        assert (two / name).is_file(), name
    for stage in STAGES:
        events = [p for p in (two / stage).iterdir() if p.name.startswith("events.out")]
        assert len(events) == 1, (stage, events)
    logs = {i: (runs["logs"] / f"process_{i}.log").read_text() for i in (0, 1)}
    assert "| point |" in logs[0] and "| point |" not in logs[1]
    for i in (0, 1):  # Each log is its process's own: both train every step.
        assert "mgrpo step 1/1" in logs[i] or "eval after_mgrpo" in logs[i], i
    assert "[process 1] eval after_mgrpo" in runs["launcher"].stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(env, run_dir, port, heartbeat, outputs=None, **popen):
    """The two documented commands of a two-process run, each in its own session (its
    supervising parent and training child are killed together); `outputs`: each one's
    Popen stream arguments (files: a pipe left unread would stall it)."""
    procs = []
    for i in (0, 1):
        cmd = train_command(
            run_dir, env["data_dir"], "--multihost", f"--process_id={i}", "--num_processes=2",
            f"--coordinator_address=127.0.0.1:{port}", f"--heartbeat_timeout={heartbeat}",
        )  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, *cmd], cwd=ROOT, env=env["env"], text=True,
            start_new_session=True, **popen, **(outputs[i] if outputs else {}),
        )  # fmt: skip
        procs.append(proc)
    return procs


@whole_runs
def test_both_killed_after_a_checkpoint_resume_to_the_same_metrics(env, runs, tmp_path):
    """Catches: processes that disagree on resuming (one restores, the other starts over: a
    hang or other metrics), a finished stage or evaluation redone, a checkpoint restored onto
    the wrong shards, metric records lost or written twice across the restart."""
    run_dir = tmp_path / "run"
    marker = run_dir / "grpo" / "checkpoints" / "1" / "commit_success.txt"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = start_pair(env, run_dir, free_port(), 20, **quiet)
    deadline = time.time() + 600
    while not marker.exists() and procs[0].poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert marker.exists(), "the run ended before grpo's step 1 was saved"
    assert not (run_dir / "grpo" / "export").exists()
    logs = [tmp_path / f"process_{i}.out" for i in (0, 1)]
    with open(logs[0], "w") as out0, open(logs[1], "w") as out1:
        outputs = [{"stdout": out0}, {"stdout": out1}]
        procs = start_pair(env, run_dir, free_port(), 20, outputs, stderr=subprocess.DEVNULL)
        codes = [p.wait(timeout=900) for p in procs]
    assert codes == [0, 0]
    outs = [log.read_text() for log in logs]
    assert "grpo: resumed from step 1" in outs[0] and "sft: finished earlier" in outs[1]
    assert_same_metrics(runs["two"], run_dir)


def test_a_killed_process_stops_the_other_with_one_line(env, tmp_path):
    """Catches: a survivor that hangs in a collective (jax's default heartbeat is 100 s), or
    that ends in jax's abort and stack trace instead of one line naming the lost process."""
    errors = [tmp_path / f"process_{i}.err" for i in (0, 1)]
    with open(errors[0], "w") as err0, open(errors[1], "w") as err1:
        outputs = [{"stderr": err0}, {"stderr": err1}]
        procs = start_pair(
            env, tmp_path / "run", free_port(), 10, outputs, stdout=subprocess.DEVNULL
        )
        first = tmp_path / "run" / "sft" / "metrics.jsonl"
        deadline = time.time() + 300
        while not first.exists() and procs[0].poll() is None and time.time() < deadline:
            time.sleep(0.2)
        try:
            assert first.exists(), "no step was logged"
            os.killpg(procs[1].pid, signal.SIGKILL)
            killed = time.monotonic()
            procs[0].wait(timeout=60)
            waited = time.monotonic() - killed
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    err = errors[0].read_text()
    assert procs[0].returncode != 0
    assert waited < 60, waited
    assert err.strip().splitlines()[-1] == (
        "run_train: error: process 1 of 2 stopped answering (no heartbeat for 10 s);"
        " process 0 stops."
    ), err[-3000:]
    assert "Traceback" not in err and "Check failure" not in err, err[-3000:]


def alone(env, run_dir, *, process_id, port):
    """(the finished process, seconds it took) of one process of a two-process run started
    alone, with a 5 s --init_timeout: the other never comes."""
    cmd = train_command(
        run_dir, env["data_dir"], "--multihost", f"--process_id={process_id}",
        "--num_processes=2", f"--coordinator_address=127.0.0.1:{port}", "--init_timeout=5",
    )  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, *cmd], cwd=ROOT, env=env["env"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    return out, time.monotonic() - t0


def test_an_unreachable_coordinator_is_one_line_after_the_timeout(env, tmp_path):
    """Catches: a process that waits without bound for a coordinator nobody started, or that
    ends in jax's abort (RegisterTask DEADLINE_EXCEEDED and a stack trace)."""
    port = free_port()  # Nothing listens there.
    out, waited = alone(env, tmp_path / "run", process_id=1, port=port)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"run_train: error: process 1: could not reach the coordinator 127.0.0.1:{port} within 5 s."
    ]
    assert 5 <= waited < 15, waited
    assert not (tmp_path / "run").exists()


def test_a_peer_that_never_joins_is_one_line_after_the_timeout(env, tmp_path):
    """Catches: process 0 waiting without bound for a worker that never starts, or ending in
    jax's abort (RegisterTask DEADLINE_EXCEEDED, a stack trace and a blank line) instead of
    one line; anything written before the cluster formed."""
    out, waited = alone(env, tmp_path / "run", process_id=0, port=free_port())
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "run_train: error: not every process of 2 joined within 5 s; process 0 stops."
    ], out.stderr[-3000:]
    assert 5 <= waited < 30, waited
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "log,expected",
    [
        (  # Heartbeats stopped (jax 0.10.2's lines, measured).
            "E1207 coordination_service.cc:1549] ... UNAVAILABLE: The following tasks are"
            " unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.\n",
            "process 1 of 2 stopped answering (no heartbeat for 10 s); process 0 stops.",
        ),
        (
            "Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat"
            " timeout. This indicates\n",
            "process 1 of 2 stopped answering (no heartbeat for 10 s); process 0 stops.",
        ),
        (
            "F1207 client.h:80] Terminating process ... DEADLINE_EXCEEDED: Deadline Exceeded\n"
            "RPC: /xla.coordination.CoordinationService/RegisterTask\n",
            "not every process of 2 joined within 7 s; process 0 stops.",
        ),
        (
            "E1207 coordination_service_agent.cc] PollForError ... Socket closed\n",
            "lost the coordinator (process 0 at 127.0.0.1:1); process 0 stops.",
        ),
        ("ValueError: a bug\n", None),
    ],
)  # fmt: skip
def test_the_line_names_the_lost_process(log, expected):
    """Catches: a regex that misses jax's wording (the survivor then prints its stack
    traces), or one that names this process itself as lost."""
    line = distributed.lost_process_line(
        log, process_id=0, num_processes=2, coordinator="127.0.0.1:1", heartbeat_timeout=10,
        init_timeout=7,
    )  # fmt: skip
    assert line == expected


def test_the_coordination_service_lines_are_held_back(capsys):
    """Catches: jax's gRPC detail lines (measured when the coordinator was SIGKILLed) leaking
    around the one line, or ordinary output held back with them."""
    child = (
        "sft step 1/2 loss=6.94\n"
        "E1207 23:54:35.1 coordination_service_agent.cc:289] Polled an error\n"
        "\n"
        "Additional GRPC error information from remote target coordination_service while"
        " calling /xla.coordination.CoordinationService/PollForError:\n"
        ':UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"recvmsg"}\n'
        "*** Check failure stack trace: ***\n"
        "    @     0x7f3f8c2e5b2a  (unknown)\n"
    )
    held, text = [], []
    distributed._read(io.BytesIO(child.encode()), held, text)
    assert capsys.readouterr().err == "sft step 1/2 loss=6.94\n"
    assert len(held) == 6 and "".join(text) == child
