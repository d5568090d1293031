"""Starting a run over several processes and reporting the loss of one in one line.

jax's coordination service ends a process whose peer stopped (or whose coordinator cannot be
reached) with SIGABRT and a C++ stack trace, never a Python exception. `supervise` runs the
training command as a child process, reads its stderr and turns such an end into one line
naming the lost process. Nothing here imports jax: the supervising parent stays small.
"""

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# The environment variable that marks the supervised child (it trains; the parent watches).
CHILD = "MEDJAX_MULTIHOST_CHILD"


def settings(args) -> dict:
    """The coordinator address, process count and id from the flags, else from the
    environment jax reads (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); None
    where neither gives one (a Cloud TPU worker: jax finds them itself)."""
    env = os.environ

    def number(flag, name):
        value = flag if flag is not None else env.get(name)
        return None if value in (None, "") else int(value)

    return {
        "coordinator_address": args.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": number(args.num_processes, "JAX_NUM_PROCESSES"),
        "process_id": number(args.process_id, "JAX_PROCESS_ID"),
    }


def wait_for_coordinator(address: str, timeout: float, poll: float = 0.5) -> bool:
    """Whether a TCP connection to `address` ("host:port") opens within `timeout` seconds.

    A process other than 0 asks before it starts jax, which would otherwise abort with a
    stack trace only after its whole initialization timeout and a few seconds more."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return True
        except (OSError, ValueError):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll, left))


# What the coordination service logs before it aborts a process over a lost peer.
_UNHEALTHY = re.compile(r"tasks are unhealthy \(stopped sending heartbeats\):\s*((?:\d+[\s,]*)+)")
_TASK_TIMEOUT = re.compile(r"\b[Tt]ask (\d+) heartbeat timeout")


def lost_process_line(
    log: str,
    *,
    process_id: int | None,
    num_processes: int | None,
    coordinator: str | None,
    heartbeat_timeout: float,
    init_timeout: float,
) -> str | None:
    """Why a process of a multi-process run stopped, in one line read from its stderr
    (`log`); None when the log shows no lost peer, coordinator or start-up.

    Args:
      log: the process's stderr.
      process_id, num_processes, coordinator: this process's id, the count and the
        coordinator's address, where known (None on a Cloud TPU that found them itself).
      heartbeat_timeout, init_timeout: the seconds the run was started with.
    """
    me = "this process" if process_id is None else f"process {process_id}"
    of = "" if num_processes is None else f" of {num_processes}"
    where = f" ({coordinator})" if coordinator else ""
    found = _UNHEALTHY.search(log)
    ids = re.findall(r"\d+", found.group(1)) if found else _TASK_TIMEOUT.findall(log)
    ids = sorted({int(i) for i in ids} - {process_id})
    if ids:
        names = ", ".join(map(str, ids))
        which = "process" if len(ids) == 1 else "processes"
        return (
            f"{which} {names}{of} stopped answering (no heartbeat for {heartbeat_timeout:g} s);"
            f" {me} stops."
        )
    if "CoordinationService/RegisterTask" in log:
        if process_id == 0:
            return f"not every process{of} joined within {init_timeout:g} s; {me} stops."
        return f"could not reach the coordinator{where} within {init_timeout:g} s."
    if "PollForError" in log or "Socket closed" in log:
        at = f" at {coordinator}" if coordinator else ""
        return f"lost the coordinator (process 0{at}); {me} stops."
    if "Gloo" in log and ("closed by peer" in log or "reset by peer" in log):
        return f"a peer process{of} closed its connection; {me} stops."
    return None


# stderr lines held back until the child's end says what they were: glog errors, C++ stack
# frames, the coordination service's gRPC detail lines (continuations of a glog error) and
# everything from a Python traceback on. A lost peer replaces them with one line.
_HELD = re.compile(
    r"^([EF]\d{4} |\s+@ |\*\*\* |PC: @|Traceback \(most recent call last\)|:UNKNOWN:)"
    r"|Additional GRPC error information|/xla\.coordination\."
)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the supervising parent dies (Linux), so a
    killed worker never leaves a process the others still see as alive."""
    with contextlib.suppress(OSError):  # Not Linux: the launcher kills the group instead.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def supervise(command: list[str], *, heartbeat_timeout: float, init_timeout: float, **where) -> int:
    """Runs `command` (this run_train invocation) as a child, forwarding its output, and
    returns the exit code; a child that a lost process or coordinator ended prints one line
    `run_train: error: ...` instead of its stack traces.

    Args:
      command: the child's argv.
      heartbeat_timeout, init_timeout: the seconds passed to jax (for the messages).
      **where: `settings`' coordinator_address, num_processes and process_id.
    """
    process_id, address = where.get("process_id"), where.get("coordinator_address")
    # Process 0 starts the coordinator itself; the others look for it first.
    probe = process_id not in (None, 0) and address
    if probe and not wait_for_coordinator(address, init_timeout):
        print(
            f"run_train: error: process {process_id}: could not reach the coordinator"
            f" {address} within {init_timeout:g} s.",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        return 1
    child = subprocess.Popen(
        command, env=dict(os.environ, **{CHILD: "1"}), stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: child.send_signal(s))
    held, text = [], []
    reader = threading.Thread(target=_read, args=(child.stderr, held, text), daemon=True)
    reader.start()
    code = child.wait()
    reader.join(10)
    if code == 0:
        return 0
    line = lost_process_line(
        "".join(text), process_id=process_id, num_processes=where.get("num_processes"),
        coordinator=address, heartbeat_timeout=heartbeat_timeout, init_timeout=init_timeout,
    )  # fmt: skip
    if line is None:
        sys.stderr.write("".join(held))
        sys.stderr.flush()
        return code if code > 0 else 128 - code
    print(f"run_train: error: {line}", file=sys.stderr, flush=True)
    return 1


def _read(stream, held: list[str], text: list[str]) -> None:
    """Forwards the child's stderr line by line, holding back what `_HELD` matches (and,
    after a traceback starts, everything)."""
    holding = previous_held = False
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        text.append(line)
        if len(text) > 4000:  # The tail tells why it ended.
            del text[:1000]
        holding = holding or line.startswith("Traceback (most recent call last)")
        # A blank line right after a held one belongs to its (multi-line) glog message.
        previous_held = bool(holding or _HELD.search(line) or (previous_held and not line.strip()))
        if previous_held:
            held.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
