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

The endpoint trusts no caller: each sub-trajectory is logged once (a request naming logged
ids is refused, so nothing the trainer will train on can be overwritten), every field is
checked before a request joins a batch, bodies, batches and slow clients are bounded, and
beyond loopback every request must carry the shared secret of $MEDJAX_SUB_AGENT_TOKEN
(`SECRET_ENV`) as `Authorization: Bearer ...` (see `SubAgentServer`).
"""

import contextlib
import dataclasses
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import queue
import re
import socket
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medjax import agents
from medjax.store import Store, check_key

ROLES = ("main", "sub")
SECRET_ENV = "MEDJAX_SUB_AGENT_TOKEN"  # The shared secret of the sub-agent endpoint.


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
        Beyond loopback the endpoint needs a shared secret in the variable `secret_env`
        on both processes: the sub process refuses to start without it, and the main
        process sends it as `Authorization: Bearer ...`.
      secret_env: the environment variable holding that secret ($MEDJAX_SUB_AGENT_TOKEN);
        on 127.0.0.1 it is used when set.
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
    secret_env: str = SECRET_ENV
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


class SubAgentRefusedError(SubAgentUnavailableError):
    """The sub-agent answered and refused the request (a 4xx): asking again is futile."""


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only ("" and "0.0.0.0" serve all)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth_headers(secret_env: str | None) -> dict[str, str]:
    secret = os.environ.get(secret_env) if secret_env else None
    return {"Authorization": f"Bearer {secret}"} if secret else {}


class RemoteSubAgent:
    """The main process's `delegate`: one HTTP request per turn with all its calls.

    `begin_step(step, seed)` names the step (and the sampling seed the sub-agent uses for
    it) before each rollout batch. With `on_failure="error"` an unreachable or failing
    sub-agent turns the calls into failed results at once; with "wait" the request is
    retried until it succeeds or `timeout` s have passed. A refusal (a 4xx answer other
    than 408 and 429: a bad request, a wrong secret, a replayed id) is never retried.

    The sub-agent logs each sub-trajectory once under its ids and refuses a request that
    names logged ids again, so a call is never sent twice with the same ids: a retry, or
    the next call of an episode whose last call failed (the agent loop then asks with the
    same invocation index), goes out with the episode's next unused invocation index. An
    attempt that was logged but not answered leaves an entry no step record names.

    Args:
      url_fn: returns the sub-agent's URL (None while none is published).
      epoch: this start of the main process (`next_epoch`).
      secret_env: the environment variable that holds the shared secret; when it is set,
        every request carries `Authorization: Bearer <its value>` (read per request, never
        kept, logged or put in an error).
    """

    def __init__(
        self, url_fn: Callable[[], str | None], epoch: int, *, on_failure: str = "error",
        timeout: float = 600.0, status_every: float = 10.0, secret_env: str | None = SECRET_ENV,
    ):  # fmt: skip
        self.url_fn, self.epoch, self.on_failure = url_fn, epoch, on_failure
        self.timeout, self.status_every, self.secret_env = timeout, status_every, secret_env
        self.step, self.seed, self.failures = 0, 0, 0
        self._next_index: dict[tuple[str, int], int] = {}

    def healthy(self) -> bool:
        """Whether the sub-agent answers `GET /health` (its policy loaded).

        Raises:
          SubAgentRefusedError: the sub-agent refused this client's secret (401).
        """
        url = self.url_fn()
        if not url:
            return False
        request = urllib.request.Request(
            url.rstrip("/") + "/health", headers=_auth_headers(self.secret_env)
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return bool(json.loads(response.read()).get("ready"))
        except urllib.error.HTTPError as e:
            if e.code == 401:
                raise SubAgentRefusedError(self._refusal(url, e)) from None
            return False
        except (OSError, ValueError):
            return False

    def begin_step(self, step: int, seed: int) -> None:
        if step != self.step:
            self._next_index = {}
        self.step, self.seed = step, seed

    def _invocations(self, calls: Sequence[agents.Delegation]) -> list[dict]:
        """The calls as sent, each with an invocation index this step has not sent yet."""
        out = []
        for call in calls:
            key = (call.query_id, call.rollout_index)
            index = max(call.invocation_index, self._next_index.get(key, 0))
            self._next_index[key] = index + 1
            out.append({**dataclasses.asdict(call), "invocation_index": index})
        return out

    def _refusal(self, url: str, e: urllib.error.HTTPError) -> str:
        detail = e.read().decode(errors="replace")[:300]
        hint = f" (the secret is read from ${self.secret_env})" if e.code == 401 else ""
        return f"sub-agent at {url} answered {e.code}: {detail}{hint}"

    def _post(self, payload: dict) -> dict:
        url = self.url_fn()
        if not url:
            raise SubAgentUnavailableError("no sub-agent endpoint published yet")
        request = urllib.request.Request(
            url.rstrip("/") + "/delegate", data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", **_auth_headers(self.secret_env)},
            method="POST",
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            final = 400 <= e.code < 500 and e.code not in (408, 429)
            error = SubAgentRefusedError if final else SubAgentUnavailableError
            raise error(self._refusal(url, e)) from None
        except (OSError, json.JSONDecodeError) as e:
            raise SubAgentUnavailableError(f"sub-agent at {url} unreachable: {e}") from None

    def __call__(self, calls: Sequence[agents.Delegation]) -> list[agents.DelegateResult]:
        start = time.monotonic()
        last_status = start
        while True:
            payload = {
                "step": self.step, "epoch": self.epoch, "seed": self.seed,
                "invocations": self._invocations(calls),
            }  # fmt: skip
            try:
                results = self._post(payload)["results"]
                break
            except SubAgentUnavailableError as e:
                waited = time.monotonic() - start
                final = isinstance(e, SubAgentRefusedError)
                if final or self.on_failure == "error" or waited >= self.timeout:
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


class BadRequestError(ValueError):
    """A refused request: the HTTP status, the field at fault and a one-line message."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


@dataclasses.dataclass
class _Pending:
    payload: dict
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: dict | None = None
    error: str | None = None
    status: int = 500
    field: str | None = None


class SubAgentServer:
    """Serves the sub-agent's current policy over HTTP (POST /delegate, GET /health,
    GET /status).

    Requests are queued; one worker takes the first waiting request and every other that
    arrives within `batch_window` s for the same (step, epoch, seed), runs all their sub
    episodes together (one sampler call per turn for all of them), writes each
    sub-trajectory to `log` and answers each request. Sampling for a main step uses a
    backend seeded with the request's seed, created when the step (or the policy version)
    changes: with the main trainer in lockstep the sub episodes are exactly those the
    one-process trainer samples.

    Hardening: a request is checked field by field before it joins a batch (so a bad one
    never fails the good ones beside it) and refused with a 4xx and a JSON body
    `{"error": <one line>, "field": <the field at fault>}`. Logged sub-trajectories are
    write-once: a request that names an already logged (or already batched) id is refused
    with 409 and counted in `replays_refused`, and the requests beside it are served.
    `GET /status` answers the counters. With the shared secret set, every request needs
    `Authorization: Bearer <secret>` (401 otherwise, counted in `unauthorized`).

    Args:
      make_agent: `make_agent(model, seed)` -> the sub-agent's AgentSpec on that model.
      log: the local store the sub-trajectories go to (`<stage>/sub_trajectories`).
      host, port: where to listen (127.0.0.1 by default; port 0 picks a free one).
      batch_window: seconds a batch waits for more requests of its step.
      secret_env: the environment variable that holds the shared secret (read once, here;
        only a hash of it is kept). Bound beyond loopback, the server refuses to start
        without it; on loopback it is used when set. None: no authentication (loopback only).
      max_body_bytes: the largest request body accepted (413 beyond; default 16 MiB).
      max_invocations: the most invocations one request may carry (413 beyond; default 4096,
        a whole rollout batch's calls of one turn).
      read_timeout: seconds a client has to send its whole request, headers and body
        (default 30): a client that sends less than its Content-Length gets 408, one that
        sends nothing is disconnected.
    """

    def __init__(
        self, make_agent: Callable[[Any, int], agents.AgentSpec], log: Store, *,
        host: str = "127.0.0.1", port: int = 0, batch_window: float = 0.02,
        secret_env: str | None = SECRET_ENV, max_body_bytes: int = 16 * 2**20,
        max_invocations: int = 4096, read_timeout: float = 30.0,
    ):  # fmt: skip
        secret = os.environ.get(secret_env) if secret_env else None
        if not secret and not is_loopback(host):
            fix = f"set ${secret_env} (on both processes)" if secret_env else "name secret_env"
            raise ValueError(
                f"SubAgentServer: host {host!r} serves beyond loopback, where requests need a"
                f" shared secret: {fix} or bind 127.0.0.1."
            )
        self.make_agent, self.log, self.batch_window = make_agent, log, batch_window
        self.secret_env = secret_env
        self.max_body_bytes, self.max_invocations = max_body_bytes, max_invocations
        self.read_timeout = read_timeout
        # Only the hash of the expected header is kept: the secret is not an attribute.
        self._auth = None if not secret else hashlib.sha256(f"Bearer {secret}".encode()).digest()
        self._lock = threading.Lock()
        self._model, self._version = None, 0
        self._agent_key, self._agent, self._renewals = None, None, 0
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self.batches = self.replays_refused = self.bad_requests = self.unauthorized = 0
        self._http = _make_http_server(self, host, port)
        self.url = f"http://{host}:{self._http.server_address[1]}"
        self._threads = [
            # A short poll: `close` returns within it.
            threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True),
            threading.Thread(target=self._work, daemon=True),
        ]

    def __repr__(self) -> str:
        return f"SubAgentServer(url={self.url!r}, authenticated={self._auth is not None})"

    @property
    def version(self) -> int:
        return self._version

    def status(self) -> dict:
        """What `GET /status` answers: the policy version and the counters."""
        return {
            "version": self._version, "ready": self._model is not None,
            "batches": self.batches, "replays_refused": self.replays_refused,
            "bad_requests": self.bad_requests, "unauthorized": self.unauthorized,
        }  # fmt: skip

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the secret (always, when none is set)."""
        if self._auth is None:
            return True
        given = hashlib.sha256((header or "").encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(given, self._auth)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

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
                    if item.result is None and item.error is None:
                        item.error = f"{type(e).__name__}: {e}"
            for item in batch:
                item.done.set()

    def _refuse(self, item: _Pending, status: int, field: str, error: str) -> None:
        item.status, item.field, item.error = status, field, error
        if status == 409:
            self._count("replays_refused")

    def _logged(self, ident: str) -> bool:
        try:
            return self.log.get(ident) is not None
        except Exception:  # An unreadable entry is there all the same: never overwrite it.
            return True

    def _serve(self, batch: list[_Pending]) -> None:
        step, epoch, seed = _batch_key(batch[0].payload)
        with self._lock:
            model, version = self._model, self._version
        if model is None:
            raise RuntimeError("the sub-agent policy is not loaded yet")
        accepted, claimed = [], set()
        for item in batch:
            try:  # Checked in the handler; a surprise here fails this request only.
                calls = [agents.Delegation(**c) for c in item.payload["invocations"]]
                idents = [sub_id(step, epoch, c) for c in calls]
            except (TypeError, ValueError) as e:
                self._refuse(item, 400, "invocations", f"bad delegate request: {e}")
                continue
            for i, ident in enumerate(idents):
                if ident in claimed or self._logged(ident):
                    self._refuse(item, 409, f"invocations[{i}]", _replay_error(i, ident))
                    break
            else:
                claimed.update(idents)
                accepted.append((item, calls, idents))
        if not accepted:
            return
        if self._agent_key is None or self._agent_key[0] != (step, epoch, seed):
            self._agent_key = ((step, epoch, seed), -1)
        if self._agent_key[1] != version:
            # One backend per main step (and policy version): its random stream continues
            # across the step's turns, as the one-process trainer's does. A policy update
            # within a step (no lockstep) starts a new stream.
            renewals = self._renewals = 0 if self._agent_key[1] == -1 else self._renewals + 1
            self._agent_key = (self._agent_key[0], version)
            self._agent = self.make_agent(model, seed + 7919 * renewals)
        calls = [c for _, item_calls, _ in accepted for c in item_calls]
        queries = [agents.Query(c.query_id, c.prompt) for c in calls]
        subs = agents.run_episodes(self._agent, queries)
        self.batches += 1
        position = 0
        for item, item_calls, idents in accepted:
            results, refused = [], None
            for i, (call, ident) in enumerate(zip(item_calls, idents, strict=True)):
                sub = subs[position + i]
                sub.rollout_index, sub.invocation_index = call.rollout_index, call.invocation_index
                entry = {"version": version, "trajectory": sub.to_dict()}
                if not self.log.put(ident, entry, if_absent=True) and refused is None:
                    refused = i  # Logged meanwhile by another writer: the first one stays.
                results.append({
                    "sub_id": ident, "version": version, "summary": sub.answer,
                    "finish_reason": sub.finish_reason, "format_errors": sub.format_errors,
                })  # fmt: skip
            position += len(item_calls)
            if refused is None:
                item.result = {"results": results}
            else:
                error = _replay_error(refused, idents[refused])
                self._refuse(item, 409, f"invocations[{refused}]", error)


def _replay_error(index: int, ident: str) -> str:
    return (
        f"invocations[{index}]: sub-trajectory {ident} is already logged; logged"
        " sub-trajectories are write-once, so a replay is refused"
    )


def _make_http_server(server: SubAgentServer, host: str, port: int):
    """The HTTP front of `server`: authenticates, reads within the limits, checks each field,
    and queues the request for the worker."""

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = server.read_timeout  # Per socket operation; `_deadline` bounds the total.

        def log_message(self, *args):  # Quiet: the trainer prints status lines.
            pass

        def setup(self):
            super().setup()
            self._deadline = time.monotonic() + server.read_timeout
            self._linger = False
            # Headers are read by http.server, one line at a time: a client that trickles
            # them is cut off when its time is up.
            self._watchdog = threading.Timer(server.read_timeout, self._cut)
            self._watchdog.daemon = True
            self._watchdog.start()

        def _cut(self):
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def parse_request(self) -> bool:
            parsed = super().parse_request()  # Reads the headers.
            self._watchdog.cancel()
            return parsed

        def finish(self):
            self._watchdog.cancel()
            with contextlib.suppress(OSError):
                super().finish()
            if self._linger:
                self._drain()

        def _drain(self) -> None:
            # Closing on unread input resets the connection, which can destroy the refusal
            # before the client reads it: read (and drop) what is in flight for a moment.
            end = time.monotonic() + min(1.0, server.read_timeout)
            dropped = 0
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
                while (left := end - time.monotonic()) > 0 and dropped <= server.max_body_bytes:
                    self.connection.settimeout(left)
                    if not (chunk := self.connection.recv(1 << 16)):
                        break
                    dropped += len(chunk)

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # The client left before the answer.
                self.close_connection = True

        def _error(self, code: int, field: str | None, message: str) -> None:
            self.close_connection = self._linger = True  # The rest of the request is unread.
            self._send(code, {"error": message, "field": field})

        def _authorized(self) -> bool:
            if server.authorized(self.headers.get("Authorization")):
                return True
            server._count("unauthorized")
            self._error(
                401, "Authorization", "missing or wrong 'Authorization: Bearer' secret"
                f" (the sub process reads it from ${server.secret_env})",
            )  # fmt: skip
            return False

        def do_GET(self):
            if not self._authorized():
                return
            if self.path == "/health":
                self._send(200, {"version": server.version, "ready": server._model is not None})
            elif self.path == "/status":
                self._send(200, server.status())
            else:
                self._error(404, "path", f"unknown path {self.path[:200]!r}")

        def _read_body(self) -> bytes:
            lengths = self.headers.get_all("Content-Length") or []
            if len(lengths) != 1:
                raise BadRequestError(
                    "Content-Length", "exactly one Content-Length header is required", 411
                )
            if not re.fullmatch(r"[0-9]{1,15}", lengths[0].strip()):
                raise BadRequestError(
                    "Content-Length",
                    f"Content-Length must be a non-negative integer, got {lengths[0][:40]!r}",
                )
            length = int(lengths[0])
            if length > server.max_body_bytes:
                raise BadRequestError(
                    "Content-Length",
                    f"the body must be at most {server.max_body_bytes} bytes, got {length}",
                    413,
                )
            chunks, got = [], 0
            while got < length and (left := self._deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                try:
                    chunk = self.rfile.read1(min(length - got, 1 << 16))
                except TimeoutError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            self.connection.settimeout(server.read_timeout)
            body = b"".join(chunks)
            if len(body) < length:
                raise BadRequestError(
                    "body",
                    f"the body ended after {len(body)} of its {length} bytes (Content-Length)"
                    f" or did not arrive within {server.read_timeout:g} s",
                    408,
                )
            return body

        def do_POST(self):
            if not self._authorized():
                return
            if self.path != "/delegate":
                self._error(404, "path", f"unknown path {self.path[:200]!r}")
                return
            try:
                body = self._read_body()
                try:
                    payload = json.loads(body)
                except (ValueError, RecursionError) as e:
                    raise BadRequestError("body", f"the body is not JSON: {e}") from None
                check_payload(payload, max_invocations=server.max_invocations)
            except BadRequestError as e:
                server._count("bad_requests")
                self._error(e.status, e.field, f"bad delegate request: {e}")
                return
            pending = _Pending(payload)
            server._queue.put(pending)
            pending.done.wait()
            if pending.error is not None:
                self._send(pending.status, {"error": pending.error, "field": pending.field})
            else:
                self._send(200, pending.result)

    class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], OSError):  # A client that left: no news.
                super().handle_error(request, client_address)

    return _Server((host, port), Handler)


def _batch_key(payload: dict) -> tuple[int, int, int]:
    return int(payload["step"]), int(payload["epoch"]), int(payload["seed"])


_INT_MAX = 2**31 - 1
_INVOCATION_FIELDS = {"query_id": str, "rollout_index": int, "invocation_index": int,
                      "task": str, "context": str}  # fmt: skip


def _check_int(value: Any, field: str) -> None:
    # bool is an int in Python, and JSON true would otherwise pass as 1.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _INT_MAX:
        raise BadRequestError(
            field, f"field {field!r} must be an integer in [0, {_INT_MAX}], got {value!r:.40}"
        )


def _check_text(value: Any, field: str) -> None:
    if not isinstance(value, str):
        raise BadRequestError(field, f"field {field!r} must be a string, got {value!r:.40}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequestError(field, f"field {field!r} is not valid Unicode") from None


def check_payload(payload: Any, *, max_invocations: int = 4096) -> None:
    """Checks a decoded `POST /delegate` body field by field.

    Raises:
      BadRequestError: naming the first field at fault (413 for too many invocations).
    """
    if not isinstance(payload, dict):
        raise BadRequestError("body", "the body must be a JSON object")
    allowed = ("step", "epoch", "seed", "invocations")
    for field in payload:
        if field not in allowed:
            raise BadRequestError(field, f"unknown field {field[:40]!r}; use {allowed}")
    for field in ("step", "epoch", "seed"):
        _check_int(payload.get(field), field)
    calls = payload.get("invocations")
    if not isinstance(calls, list) or not calls:
        raise BadRequestError("invocations", "field 'invocations' must be a non-empty list")
    if len(calls) > max_invocations:
        raise BadRequestError(
            "invocations",
            f"at most {max_invocations} invocations per request, got {len(calls)}",
            413,
        )
    seen = {}
    for i, c in enumerate(calls):
        where = f"invocations[{i}]"
        if not isinstance(c, dict):
            raise BadRequestError(where, f"{where} must be an object")
        missing = [f for f in _INVOCATION_FIELDS if f != "context" and f not in c]
        extra = [f for f in c if f not in _INVOCATION_FIELDS]
        if missing or extra:
            raise BadRequestError(
                where,
                f"{where} must hold query_id, rollout_index, invocation_index, task (and"
                f" optionally context), nothing else; missing {missing}, unknown"
                f" {[f[:40] for f in extra[:5]]}",
            )
        for name, kind in _INVOCATION_FIELDS.items():
            if name in c:
                (_check_int if kind is int else _check_text)(c[name], f"{where}.{name}")
        ident = sub_id(payload["step"], payload["epoch"], agents.Delegation(**c))
        try:
            check_key(ident)
        except ValueError:
            raise BadRequestError(
                f"{where}.query_id", f"{where}.query_id {c['query_id'][:40]!r} is no valid id"
            ) from None
        if ident in seen:
            raise BadRequestError(
                where, f"{where} repeats the ids of invocations[{seen[ident]}] ({ident})"
            )
        seen[ident] = i


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
