"""Any OpenAI-compatible chat-completions server (vLLM, SGLang, `medjax.llm.serve`, a hosted
API) as a `TextBackend`.

One conversation is one HTTP request (`POST {base_url}/chat/completions` with
`n=num_samples`); a call's requests run on a thread pool, and a semaphore shared by every call
of the backend bounds how many are in flight at once (`max_concurrency`), so a judge or a
patient simulator cannot flood the server however many episodes are live.

Failures split in two. Retryable: HTTP 408, 429 and 5xx, timeouts and connection errors, retried
`max_retries` times with exponential backoff (jittered, capped; a `Retry-After` header sets the
delay instead). Anything else (400, 401, 404, a malformed reply) fails at once. Either way the
call ends in a `BackendError` that names the URL, the HTTP status and the number of attempts.

The API key is read from the environment variable `api_key_env` when each request is built
and lives only in that request's headers: it is never stored on the backend, never logged,
and redacted from any server text that an error message quotes.

Only the text-level fields of `SamplingParams` travel: the remote model has its own tokenizer,
so `eos_ids`, `stop_sequences` and `pad_id` (ids of the local tokenizer) are not sent and the
server stops on its own EOS. Token ids come back only from servers that return the `token_ids`
extension of a choice (vLLM with `return_token_ids`, `medjax.llm.serve`).
"""

import concurrent.futures
import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from medjax.llm.base import Generation, Message
from medjax.sampling import SamplingParams

logger = logging.getLogger("medjax.llm")

# How much of a failed response's body an error message quotes.
_DETAIL_CHARS = 300


class BackendError(RuntimeError):
    """A chat-completions request that failed for good.

    Attributes:
      url: the endpoint.
      status: the last HTTP status, or None when no response came (timeout, refused).
      attempts: how many times the request was sent.
    """

    def __init__(self, message: str, *, url: str, status: int | None, attempts: int):
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class _AttemptError(Exception):
    """One failed attempt: `retryable` when sending it again may succeed."""

    def __init__(
        self,
        status: int | None,
        detail: str,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


def _retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


class OpenAICompatibleBackend:
    """Generates with a remote model through the OpenAI chat-completions API.

    Args:
      base_url: the API root, e.g. "http://127.0.0.1:8000/v1"; requests go to
        `{base_url}/chat/completions`.
      model: the `model` field of each request.
      api_key_env: name of the environment variable that holds the API key, read at each
        request; unset or empty sends no Authorization header.
      timeout_s: socket timeout of one attempt (connect, and each read of the reply).
      max_retries: retries after the first attempt for retryable failures (0: one attempt).
      backoff_s: delay before the first retry; doubled for each later one, jittered to
        [1/2, 1] of that so that concurrent requests do not retry in lockstep.
      max_backoff_s: cap on any delay, a server's Retry-After included.
      max_concurrency: most requests in flight at once, across concurrent calls too.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_concurrency: int = 8,
    ):
        if max_concurrency < 1:
            raise ValueError(f"OpenAICompatibleBackend: max_concurrency={max_concurrency} < 1.")
        if max_retries < 0:
            raise ValueError(f"OpenAICompatibleBackend: max_retries={max_retries} < 0.")
        if timeout_s <= 0:
            raise ValueError(f"OpenAICompatibleBackend: timeout_s={timeout_s} must be > 0.")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)

    def __repr__(self) -> str:
        return (
            f"OpenAICompatibleBackend(base_url={self.base_url!r}, model={self.model!r},"
            f" api_key_env={self.api_key_env!r})"
        )

    def request_body(
        self, messages: Sequence[Message], params: SamplingParams, num_samples: int
    ) -> dict[str, Any]:
        """The JSON body of one conversation's request."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "n": num_samples,
            "max_tokens": params.max_new_tokens,
            # Temperature 0 is the API's greedy decoding.
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": params.top_p,
            "logprobs": True,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k  # vLLM's (and medjax.llm.serve's) extension field.
        if params.stop_strings:
            body["stop"] = list(params.stop_strings)
        return body

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        *,
        num_samples: int = 1,
    ) -> list[Generation]:
        """Replies to every conversation, one request each, conversation-major.

        Raises:
          BackendError: a request failed for good (after its retries, or at once for a
            non-retryable failure); requests not yet sent are cancelled.
        """
        if num_samples < 1:
            raise ValueError(f"OpenAICompatibleBackend.generate: num_samples={num_samples} < 1.")
        if not conversations:
            return []
        bodies = [self.request_body(c, params, num_samples) for c in conversations]
        workers = min(self.max_concurrency, len(bodies))
        pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="medjax-llm")
        try:
            futures = [pool.submit(self._complete, body) for body in bodies]
            return [g for future in futures for g in future.result()]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _complete(self, body: dict[str, Any]) -> list[Generation]:
        """One conversation's request, with its retries."""
        n = body["n"]
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._slots:
                    reply = self._post(body)
            except _AttemptError as e:
                status = f"HTTP {e.status}" if e.status is not None else "no response"
                if not e.retryable or attempt > self.max_retries:
                    raise BackendError(
                        f"POST {self.url} failed after {attempt} attempt(s): {status}: {e.detail}",
                        url=self.url,
                        status=e.status,
                        attempts=attempt,
                    ) from None
                delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                delay *= 0.5 + 0.5 * random.random()
                if e.retry_after is not None:
                    delay = min(e.retry_after, self.max_backoff_s)
                logger.warning(
                    "POST %s: %s: %s (attempt %d of %d); retrying in %.2fs.",
                    self.url,
                    status,
                    e.detail,
                    attempt,
                    self.max_retries + 1,
                    delay,
                )
                time.sleep(delay)
                continue
            return self._parse(reply, n, attempt)

    def _post(self, body: dict[str, Any]) -> bytes:
        """Sends one attempt; returns the body of a 2xx reply.

        Raises:
          _AttemptError: retryable for 408, 429, 5xx, a timeout or a connection error.
        """
        key = os.environ.get(self.api_key_env) or None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read(4 * _DETAIL_CHARS).decode("utf-8", "replace")
            except (OSError, http.client.HTTPException):
                detail = ""
            finally:
                e.close()
            detail = _redact(_error_message(detail), key)[:_DETAIL_CHARS] or str(e.reason)
            raise _AttemptError(
                e.code,
                detail,
                retryable=e.code in (408, 429) or e.code >= 500,
                retry_after=_retry_after_s(e.headers.get("Retry-After")),
            ) from None
        except TimeoutError:
            raise _AttemptError(None, f"timed out after {self.timeout_s}s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _AttemptError(None, f"timed out after {self.timeout_s}s") from None
            raise _AttemptError(
                None, f"connection failed ({_redact(str(e.reason), key)})"
            ) from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _AttemptError(None, f"connection failed ({type(e).__name__})") from None

    def _parse(self, reply: bytes, n: int, attempt: int) -> list[Generation]:
        def fail(why: str) -> BackendError:
            return BackendError(
                f"POST {self.url}: malformed reply after {attempt} attempt(s): {why}",
                url=self.url,
                status=200,
                attempts=attempt,
            )

        try:
            choices = json.loads(reply)["choices"]
            choices = sorted(choices, key=lambda c: c.get("index", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise fail(f"no list of choices ({type(e).__name__})") from None
        if len(choices) != n:
            raise fail(f"{len(choices)} choices for n={n}")
        generations = []
        for choice in choices:
            try:
                content = (choice.get("logprobs") or {}).get("content")
                generations.append(
                    Generation(
                        text=choice["message"].get("content") or "",
                        token_ids=[int(t) for t in choice.get("token_ids") or []],
                        logps=None if content is None else [float(t["logprob"]) for t in content],
                        finish_reason=choice.get("finish_reason") or "stop",
                    )
                )
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise fail(f"choice {choice.get('index')!r}: {type(e).__name__}: {e}") from None
        return generations


def _error_message(body: str) -> str:
    """The `error.message` of an OpenAI-style error body, else the body itself."""
    try:
        error = json.loads(body)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body.strip()
