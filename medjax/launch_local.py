"""Runs one command as N processes of one jax cluster on this machine (CPU devices), as the
workers of a multi-host slice would: the local twin of a Cloud TPU pod slice run.

    python -m medjax.launch_local --num_processes 2 --devices_per_process 2 -- \\
        run_train.py --gin_file=gin/testing/multihost.gin --gin_bindings="RUN_DIR='/tmp/mh'"

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES,
JAX_PROCESS_ID, JAX_PLATFORMS=cpu and its own host CPU devices, and `--multihost` is added to
a run_train.py command. Its output goes to `<log_dir>/process_<i>.log` and, prefixed with
`[process i]`, to this terminal. The exit code is the first non-zero one of a process (0 when
every process succeeded).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, port: int, count: int, index: int, devices: int) -> dict:
    """The environment of process `index` of `count`, each with `devices` CPU devices."""
    flags = [f for f in base.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(
        base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
        JAX_PROCESS_ID=str(index), JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
    )  # fmt: skip


def _tee(stream, log_path: str, prefix: str) -> None:
    with open(log_path, "wb") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            sys.stdout.write(prefix + line.decode("utf-8", "replace"))
            sys.stdout.flush()


def launch(command: list[str], *, num_processes: int, devices_per_process: int, log_dir: str,
           grace: float = 60.0) -> int:  # fmt: skip
    """Starts the processes and waits for them.

    Args:
      command: the program and its arguments (a .py file runs with this Python).
      num_processes, devices_per_process: the cluster's shape.
      log_dir: where each process's log goes (created).
      grace: seconds the others may take to end on their own after one failed (they exit
        with their own line within their heartbeat timeout) before they are killed.

    Returns:
      The first non-zero exit code, or 0.
    """
    if command and command[0].endswith(".py"):
        command = [sys.executable, *command]
    if any(os.path.basename(a) == "run_train.py" for a in command[:2]):
        command = [*command, "--multihost"]
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    procs, tees = [], []
    for i in range(num_processes):
        env = process_env(dict(os.environ), port, num_processes, i, devices_per_process)
        # Its own session: a stop kills the process and its supervised child together.
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log = os.path.join(log_dir, f"process_{i}.log")
        tee = threading.Thread(target=_tee, args=(proc.stdout, log, f"[process {i}] "))
        tee.start()
        procs.append(proc)
        tees.append(tee)
    code, deadline = 0, None
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and code == 0:
                code, deadline = failed[0], time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # jax's preemption handler may ignore SIGTERM: SIGKILL.
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for t in tees:
            t.join(10)
    if code == 0:
        code = next((p.returncode for p in procs if p.returncode != 0), 0)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=2)
    parser.add_argument("--log_dir", default="logs", help="process_<i>.log files (default logs)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --.")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be at least 1.")
    return launch(
        command, num_processes=args.num_processes,
        devices_per_process=args.devices_per_process, log_dir=args.log_dir,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
