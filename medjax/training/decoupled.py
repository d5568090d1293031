"""Decoupled M-GRPO: the main agent's and the sub-agent's trainers as separate processes
(separate hosts) that exchange statistics through a shared store, never tensors.

    sub process                                   main process
    -----------                                   ------------
    SubAgentServer: POST /delegate  <-- HTTP ---  RemoteSubAgent (the `delegate` tool)
      runs sub episodes (batched), logs each        rollouts, R_M, main update
      to its local trajectory log, returns          publish_step(): one record per step
      {summary, sub_id, version}                      main/steps/<step> (put if_absent)
    trainer: wait for main/steps/<s>  <-- store --
      sub rows from its log + the record,
      update, checkpoint(applied set),
      sub/applied/<s>, sub/progress

Store keys (one namespace per run):

    main/run, sub/run  {"id"}: the run (directory and creation time) the store serves
    main/epoch         {"epoch"}: +1 at every start of the main process (compare-and-set)
    main/steps/<s>     {"step", "epoch", "main_version", "num_rollouts", "time",
                        "rollouts": [{"key", "query_id", "rollout_index", "format_valid",
                                      "correct", "main_reward", "sub_ids", "sub_versions",
                                      "delegate_failures"}]}
    main/progress      {"published_steps", "epoch", "delegate_failures", "time", "done"}
    sub/progress       {"applied_steps", "version", "url", "dropped_stale", "missing",
                        "time", "status"}
    sub/applied/<s>    {"step", "version", "rollouts": [the applied statistics], ...}

A step record is the commit point: it is written once (`put(if_absent)`), whole, after the
step's rollouts; a main process that died and re-runs an already published step does not
publish it again (its new sub-trajectories are never referenced). The sub trainer applies
steps in order and keeps the keys it applied in its checkpoint, so a restarted sub process
restores the applied set with the policy it belongs to and continues at the next step:
nothing applied twice, nothing skipped. Sub-trajectories are written to the sub's local log
before their summary is returned, so a crash loses none that a record can name.

Staleness: each sub-trajectory carries the sub policy version (its number of updates) that
produced it. When the sub trainer at version v applies a record, sub-trajectories older
than v - `staleness_window` are left out of its batch (as for a rollout that delegated
nothing) and counted in `dropped_stale`.
"""

import dataclasses
import hashlib
import http.server
import json
import queue
import re
import socketserver
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medjax import agents
from medjax.store import Store

ROLES = ("main", "sub")


@dataclasses.dataclass(frozen=True)
class Decoupled:
    """Where an M-GRPO stage's process stands in a decoupled run (`RLStage.decoupled`).

    Attributes:
      role: "main" (main agent's rollouts and trainer) or "sub" (serves the sub-agent and
        trains it).
      store: the shared store's URL (`medjax.store.open_store`): "file:///shared/run" or
        "redis://host:6379/0?namespace=run".
      sub_url: main: the sub-agent's endpoint; None: the URL the sub process published
        in the store.
      host, port: sub: where to serve (127.0.0.1 by default; port 0 picks a free one).
      staleness_window: sub: sub-trajectories more than this many sub updates older than
        the trainer's policy are dropped from its batch (and counted).
      on_sub_failure: main: "error" (a failed `delegate` call becomes a counted tool
        error and the run goes on) or "wait" (retry until the sub-agent answers, up to
        `request_timeout_s`).
      max_sub_lag: main: before rolling out step s, wait until the sub trainer has applied
        s - max_sub_lag steps (0: lockstep, the one-process schedule, deterministic);
        None: never wait.
      request_timeout_s: main: the longest one delegate request may take.
      batch_window_s: sub: requests that arrive within this window share one batch of
        sampler calls.
      wait_timeout_s: how long either side waits for the other before giving up.
      status_every_s: a status line this often while waiting.
    """

    role: str = "main"
    store: str = "file:///tmp/medjax_mgrpo/store"
    sub_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8470
    staleness_window: int = 2
    on_sub_failure: str = "error"
    max_sub_lag: int | None = None
    request_timeout_s: float = 600.0
    batch_window_s: float = 0.02
    wait_timeout_s: float = 3600.0
    status_every_s: float = 10.0

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Decoupled.role {self.role!r}: use one of {ROLES}.")
        if self.on_sub_failure not in ("error", "wait"):
            raise ValueError(
                f"Decoupled.on_sub_failure {self.on_sub_failure!r}: use 'error' or 'wait'."
            )


def step_key(step: int) -> str:
    return f"main/steps/{step:08d}"


def applied_key(step: int) -> str:
    return f"sub/applied/{step:08d}"


def _safe(text: str) -> str:
    """`text` as one store key part (a short hash keeps distinct ids distinct)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:48]
    if clean == text:
        return text
    return f"{clean}~{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def rollout_key(step: int, query_id: str, rollout_index: int) -> str:
    return f"{step:08d}/{_safe(query_id)}/{rollout_index}"


def sub_id(step: int, epoch: int, d: agents.Delegation) -> str:
    """A sub-trajectory's id: unique per main step, main process epoch and call."""
    return f"{step:08d}/{epoch}/{_safe(d.query_id)}/{d.rollout_index}/{d.invocation_index}"


class WaitTimeoutError(RuntimeError):
    """The other process did not show up in time."""


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, every: float, status: Callable[[float], str],
    poll: float = 0.1,
):  # fmt: skip
    """Polls `predicate` until it returns something truthy; prints `status(waited s)` every
    `every` s; raises WaitTimeoutError after `timeout` s."""
    start = last = time.monotonic()
    while not (value := predicate()):
        now = time.monotonic()
        if now - start >= timeout:
            raise WaitTimeoutError(status(now - start) + f"; gave up after {timeout:.0f} s.")
        if now - last >= every:
            print(status(now - start), flush=True)
            last = now
        time.sleep(poll)
    return value


class StoreInUseError(RuntimeError):
    """The store holds another run's records."""


def claim(store: Store, role: str, run_id: str) -> None:
    """Marks the store as this run's for `role` ("main" or "sub"); raises when another
    run (another run directory, or the same path made anew) claimed it first, so a fresh
    run never mistakes an old run's records for its own."""
    key = f"{role}/run"
    if store.put(key, {"id": run_id}, if_absent=True):
        return
    holder = (store.get(key) or {}).get("id")
    if holder != run_id:
        raise StoreInUseError(
            f"the store holds the records of another {role} run ({holder}); this run is"
            f" {run_id}. Give each run its own store (a new folder or Redis namespace)."
        )


# ---------------------------------------------------------------------------------------
# Main side.


def next_epoch(store: Store) -> int:
    """Counts this start of the main process (compare-and-set: exactly once per start)."""
    while True:
        current = store.get("main/epoch")
        epoch = (current or {"epoch": 0})["epoch"] + 1
        if store.compare_and_set("main/epoch", current, {"epoch": epoch, "time": time.time()}):
            return epoch


def publish_step(
    store: Store, step: int, epoch: int, main_version: int, trajs: Sequence[agents.Trajectory],
    terms, main_rewards, num_rollouts: int,
):  # fmt: skip
    """Publishes the step's per-rollout statistics as one record; False when the step was
    published before (a main process re-running it after a crash)."""
    rollouts = []
    for traj, term, reward in zip(trajs, terms, np.asarray(main_rewards), strict=True):
        rollouts.append({
            "key": rollout_key(step, traj.query_id, traj.rollout_index),
            "query_id": traj.query_id,
            "rollout_index": traj.rollout_index,
            "format_valid": float(term.format_valid),
            "correct": float(term.correct),
            "main_reward": float(reward),
            "sub_ids": [s.metadata["sub_id"] for s in traj.sub_trajectories],
            "sub_versions": [s.metadata["version"] for s in traj.sub_trajectories],
            "delegate_failures": traj.tool_failures,
        })  # fmt: skip
    record = {
        "step": step, "epoch": epoch, "main_version": main_version,
        "num_rollouts": num_rollouts, "time": time.time(), "rollouts": rollouts,
    }  # fmt: skip
    return store.put(step_key(step), record, if_absent=True)


class SubAgentUnavailableError(RuntimeError):
    pass


class RemoteSubAgent:
    """The main process's `delegate`: one HTTP request per turn with all its calls.

    `begin_step(step, seed)` names the step (and the sampling seed the sub-agent uses for
    it) before each rollout batch. With `on_failure="error"` an unreachable or failing
    sub-agent turns the calls into failed results at once; with "wait" the request is
    retried until it succeeds or `timeout` s have passed.
    """

    def __init__(
        self, url_fn: Callable[[], str | None], epoch: int, *, on_failure: str = "error",
        timeout: float = 600.0, status_every: float = 10.0,
    ):  # fmt: skip
        self.url_fn, self.epoch, self.on_failure = url_fn, epoch, on_failure
        self.timeout, self.status_every = timeout, status_every
        self.step, self.seed, self.failures = 0, 0, 0

    def healthy(self) -> bool:
        """Whether the sub-agent answers `GET /health` (its policy loaded)."""
        url = self.url_fn()
        if not url:
            return False
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as response:
                return bool(json.loads(response.read()).get("ready"))
        except (OSError, ValueError):
            return False

    def begin_step(self, step: int, seed: int) -> None:
        self.step, self.seed = step, seed

    def _post(self, payload: dict) -> dict:
        url = self.url_fn()
        if not url:
            raise SubAgentUnavailableError("no sub-agent endpoint published yet")
        request = urllib.request.Request(
            url.rstrip("/") + "/delegate", data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise SubAgentUnavailableError(f"sub-agent at {url} answered {e.code}: {detail}") from e
        except (OSError, json.JSONDecodeError) as e:
            raise SubAgentUnavailableError(f"sub-agent at {url} unreachable: {e}") from e

    def __call__(self, calls: Sequence[agents.Delegation]) -> list[agents.DelegateResult]:
        payload = {
            "step": self.step, "epoch": self.epoch, "seed": self.seed,
            "invocations": [dataclasses.asdict(c) for c in calls],
        }  # fmt: skip
        start = time.monotonic()
        last_status = start
        while True:
            try:
                results = self._post(payload)["results"]
                break
            except SubAgentUnavailableError as e:
                waited = time.monotonic() - start
                if self.on_failure == "error" or waited >= self.timeout:
                    self.failures += len(calls)
                    return [agents.DelegateResult(error=f"sub-agent unavailable ({e})")] * len(
                        calls
                    )
                if time.monotonic() - last_status >= self.status_every:
                    print(f"main: waiting for the sub-agent ({e}; {waited:.0f} s)", flush=True)
                    last_status = time.monotonic()
                time.sleep(0.2)
        out = []
        for call, r in zip(calls, results, strict=True):
            stub = agents.Trajectory(
                query_id=call.query_id, rollout_index=call.rollout_index, agent="searcher",
                invocation_index=call.invocation_index, answer=r["summary"],
                finish_reason=r["finish_reason"], format_errors=r["format_errors"],
                metadata={"sub_id": r["sub_id"], "version": r["version"]},
            )  # fmt: skip
            out.append(agents.DelegateResult(summary=r["summary"], trajectory=stub))
        return out


# ---------------------------------------------------------------------------------------
# Sub side.


@dataclasses.dataclass
class _Pending:
    payload: dict
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: dict | None = None
    error: str | None = None


class SubAgentServer:
    """Serves the sub-agent's current policy over HTTP (POST /delegate, GET /health).

    Requests are queued; one worker takes the first waiting request and every other that
    arrives within `batch_window` s for the same (step, epoch, seed), runs all their sub
    episodes together (one sampler call per turn for all of them), writes each
    sub-trajectory to `log` and answers each request. Sampling for a main step uses a
    backend seeded with the request's seed, created when the step (or the policy version)
    changes: with the main trainer in lockstep the sub episodes are exactly those the
    one-process trainer samples.

    Args:
      make_agent: `make_agent(model, seed)` -> the sub-agent's AgentSpec on that model.
      log: the local store the sub-trajectories go to (`<stage>/sub_trajectories`).
    """

    def __init__(
        self, make_agent: Callable[[Any, int], agents.AgentSpec], log: Store, *,
        host: str = "127.0.0.1", port: int = 0, batch_window: float = 0.02,
    ):  # fmt: skip
        self.make_agent, self.log, self.batch_window = make_agent, log, batch_window
        self._lock = threading.Lock()
        self._model, self._version = None, 0
        self._agent_key, self._agent, self._renewals = None, None, 0
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self.batches = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # Quiet: the trainer prints status lines.
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path != "/health":
                    self._send(404, {"error": f"unknown path {self.path}"})
                    return
                self._send(200, {"version": server.version, "ready": server._model is not None})

            def do_POST(self):
                if self.path != "/delegate":
                    self._send(404, {"error": f"unknown path {self.path}"})
                    return
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    payload = json.loads(self.rfile.read(length))
                    _check_payload(payload)
                except (ValueError, KeyError, TypeError) as e:
                    self._send(400, {"error": f"bad delegate request: {e}"})
                    return
                pending = _Pending(payload)
                server._queue.put(pending)
                pending.done.wait()
                if pending.error is not None:
                    self._send(500, {"error": pending.error})
                else:
                    self._send(200, pending.result)

        class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._http = _Server((host, port), Handler)
        self.url = f"http://{host}:{self._http.server_address[1]}"
        self._threads = [
            threading.Thread(target=self._http.serve_forever, daemon=True),
            threading.Thread(target=self._work, daemon=True),
        ]

    @property
    def version(self) -> int:
        return self._version

    def set_policy(self, model, version: int) -> None:
        """Serves `model` (its own buffers: the trainer's update donates its own) from now."""
        with self._lock:
            self._model, self._version = model, version

    def start(self) -> "SubAgentServer":
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def _take_batch(self) -> list[_Pending]:
        first = self._queue.get()
        key = _batch_key(first.payload)
        batch, later = [first], []
        deadline = time.monotonic() + self.batch_window
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            (batch if _batch_key(item.payload) == key else later).append(item)
        for item in later:  # Another step's requests: the next batch.
            self._queue.put(item)
        return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            try:
                self._serve(batch)
            except Exception as e:  # Reported to the callers, who count it.
                for item in batch:
                    item.error = f"{type(e).__name__}: {e}"
            for item in batch:
                item.done.set()

    def _serve(self, batch: list[_Pending]) -> None:
        step, epoch, seed = _batch_key(batch[0].payload)
        with self._lock:
            model, version = self._model, self._version
        if model is None:
            raise RuntimeError("the sub-agent policy is not loaded yet")
        if self._agent_key is None or self._agent_key[0] != (step, epoch, seed):
            self._agent_key = ((step, epoch, seed), -1)
        if self._agent_key[1] != version:
            # One backend per main step (and policy version): its random stream continues
            # across the step's turns, as the one-process trainer's does. A policy update
            # within a step (no lockstep) starts a new stream.
            renewals = self._renewals = 0 if self._agent_key[1] == -1 else self._renewals + 1
            self._agent_key = (self._agent_key[0], version)
            self._agent = self.make_agent(model, seed + 7919 * renewals)
        calls = [agents.Delegation(**c) for item in batch for c in item.payload["invocations"]]
        queries = [agents.Query(c.query_id, c.prompt) for c in calls]
        subs = agents.run_episodes(self._agent, queries)
        self.batches += 1
        results = []
        for call, sub in zip(calls, subs, strict=True):
            sub.rollout_index, sub.invocation_index = call.rollout_index, call.invocation_index
            ident = sub_id(step, epoch, call)
            self.log.put(ident, {"version": version, "trajectory": sub.to_dict()})
            results.append({
                "sub_id": ident, "version": version, "summary": sub.answer,
                "finish_reason": sub.finish_reason, "format_errors": sub.format_errors,
            })  # fmt: skip
        position = 0
        for item in batch:
            n = len(item.payload["invocations"])
            item.result = {"results": results[position : position + n]}
            position += n


def _batch_key(payload: dict) -> tuple[int, int, int]:
    return int(payload["step"]), int(payload["epoch"]), int(payload["seed"])


def _check_payload(payload: dict) -> None:
    if not isinstance(payload, dict):
        raise ValueError("the body must be a JSON object")
    for field in ("step", "epoch", "seed"):
        if not isinstance(payload.get(field), int):
            raise ValueError(f"field {field!r} must be an integer")
    calls = payload.get("invocations")
    if not isinstance(calls, list) or not calls:
        raise ValueError("field 'invocations' must be a non-empty list")
    names = {f.name for f in dataclasses.fields(agents.Delegation)}
    for i, c in enumerate(calls):
        if not isinstance(c, dict) or not {"query_id", "rollout_index", "invocation_index",
                                           "task"} <= set(c) or set(c) - names:  # fmt: skip
            raise ValueError(
                f"invocations[{i}] must hold query_id, rollout_index, invocation_index, task"
                " (and optionally context), nothing else"
            )


@dataclasses.dataclass
class AppliedStep:
    """What the sub trainer takes from one published step."""

    subs: list[agents.Trajectory]  # The sub-trajectories it trains on, by rollout.
    owner: np.ndarray  # Each one's rollout position.
    correct: np.ndarray  # Each rollout's correctness.
    applied: dict  # The record of what was applied (sub/applied/<step>).
    dropped_stale: int
    missing: int


def gather_step(record: dict, log: Store, version: int, staleness_window: int) -> AppliedStep:
    """The sub trainer's inputs for one published step record: its own sub-trajectories
    (from `log`) named by the record, minus those older than `staleness_window` versions."""
    subs, owner, dropped, missing, rows = [], [], 0, 0, []
    for position, r in enumerate(record["rollouts"]):
        used = []
        for ident in r["sub_ids"]:
            entry = log.get(ident)
            if entry is None:
                missing += 1
                continue
            if version - entry["version"] > staleness_window:
                dropped += 1
                continue
            subs.append(agents.Trajectory.from_dict(entry["trajectory"]))
            owner.append(position)
            used.append(ident)
        rows.append({**r, "applied_sub_ids": used})
    applied = {
        "step": record["step"], "epoch": record["epoch"], "version": version,
        "dropped_stale": dropped, "missing": missing, "time": time.time(), "rollouts": rows,
    }  # fmt: skip
    correct = np.array([r["correct"] for r in record["rollouts"]], np.float32)
    return AppliedStep(subs, np.asarray(owner, np.int32), correct, applied, dropped, missing)
