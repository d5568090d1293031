"""The sub process's side of decoupled M-GRPO: the sub-agent's HTTP endpoint.

    server = SubAgentServer(make_agent, log, host="127.0.0.1", port=8470).start()
    server.set_policy(model, version)     # after each sub update
    # POST /delegate {"step", "epoch", "seed", "invocations": [...]} -> {"results": [...]}
    # GET /health, GET /status

The endpoint trusts no caller: each sub-trajectory is logged once (a request naming logged
ids is refused, so nothing the trainer will train on can be overwritten), every field is
checked before a request joins a batch (`check_payload`, `BadRequestError`), bodies, batches
and slow clients are bounded, and beyond loopback (`is_loopback`) every request must carry
the shared secret of $MEDJAX_SUB_AGENT_TOKEN (`SECRET_ENV`) as `Authorization: Bearer ...`
(see `SubAgentServer`). The main process's client is `medjax.training.sub_agent_client`.

Moved here from `medjax.training.decoupled` (the protocol: config, store records, waits),
which still exports the public names.
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
from collections.abc import Callable
from typing import Any

from medjax import agents
from medjax.store import Store, check_key
from medjax.store.keys import sub_trajectory_key

SECRET_ENV = "MEDJAX_SUB_AGENT_TOKEN"  # The shared secret of the sub-agent endpoint.


def sub_id(step: int, epoch: int, d: agents.Delegation) -> str:
    """A sub-trajectory's id: unique per main step, main process epoch and call."""
    return sub_trajectory_key(step, epoch, d.query_id, d.rollout_index, d.invocation_index)


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only ("" and "0.0.0.0" serve all)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        # The random stream the in-process delegation names (`agents.loop`): the same
        # episode whichever process runs it.
        queries = [
            agents.Query(
                c.query_id, c.prompt, stream=f"{c.query_id}/{c.rollout_index}/{c.invocation_index}"
            )
            for c in calls
        ]
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
