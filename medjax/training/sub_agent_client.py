"""The main process's side of decoupled M-GRPO: `RemoteSubAgent`, the `delegate` that
calls the sub-agent's HTTP endpoint (`medjax.training.sub_agent_endpoint.SubAgentServer`).

Moved here from `medjax.training.decoupled`, which still exports the public names.
"""

import dataclasses
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from medjax import agents
from medjax.training.sub_agent_endpoint import SECRET_ENV


class SubAgentUnavailableError(RuntimeError):
    pass


class SubAgentRefusedError(SubAgentUnavailableError):
    """The sub-agent answered and refused the request (a 4xx): asking again is futile."""


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
