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

Stop strings. The agent loop stops each turn on `</tool_call>` or `</answer>` and parses the
reply, so it needs the matched stop string at the end of the text, as a local backend leaves
it. OpenAI, and vLLM and SGLang by default, leave it out (`finish_reason` "stop" either way);
a server may also keep it (vLLM with `include_stop_str_in_output`, SGLang with
`no_stop_trim`, passed through `extra_body`). With `stop_in_output="restore"` (the default)
the backend puts it back; see `restore_stop_string` for the rule and its limits.
"""

import concurrent.futures
import email.utils
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from medjax.llm.base import Generation, Message
from medjax.sampling import SamplingParams

logger = logging.getLogger("medjax.llm")

# How much of a failed response's body an error message quotes.
_DETAIL_CHARS = 300
# The fields `request_body` sets itself, which `extra_body` may not replace.
_OWN_FIELDS = frozenset(
    ("model", "messages", "n", "max_tokens", "temperature", "top_p", "top_k", "stop", "logprobs")
)
STOP_IN_OUTPUT = ("restore", "as_returned")
# A stop string the unclosed-tag rule can restore: a bare closing tag such as "</answer>".
_CLOSING_TAG = re.compile(r"</([A-Za-z_][\w.:-]*)>")
# Where the server does not say which stop string matched (OpenAI's choices carry neither).
UNREPORTED = object()


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


def reported_stop(choice: Mapping[str, Any]) -> object:
    """The stop a server says ended a choice, or `UNREPORTED`.

    vLLM's `stop_reason` and SGLang's `matched_stop` hold the matched stop string, a stop
    token's id (an int, an EOS included on SGLang), or null for EOS on vLLM; OpenAI's choices
    carry neither field.
    """
    for field in ("stop_reason", "matched_stop"):
        if field in choice:
            return choice[field]
    return UNREPORTED


def unclosed_tag_stop(text: str, stop_strings: Sequence[str]) -> str | None:
    """The closing-tag stop string whose opening tag is the last one left open in `text`.

    Args:
      text: a reply that ended on a stop the server did not name.
      stop_strings: the stop strings of the request; only bare closing tags ("</answer>")
        take part.

    Returns:
      E.g. "</tool_call>" for '<think>a</think><tool_call>{"name": ...', "</answer>" for
      "<tool_call>...</tool_call><answer>flu"; None when every such tag is closed (or never
      opened), as after an EOS.
    """
    best, best_at = None, -1
    for stop in stop_strings:
        tag = _CLOSING_TAG.fullmatch(stop)
        if tag is None:
            continue
        opened_at = text.rfind(f"<{tag[1]}>")
        # Open: opened after its last close. The innermost (latest) open tag closes first.
        if opened_at > best_at and text.find(stop, opened_at) < 0:
            best, best_at = stop, opened_at
    return best


def restore_stop_string(
    text: str,
    finish_reason: str,
    stop_strings: Sequence[str],
    *,
    reported: object = UNREPORTED,
) -> str:
    """A reply's text with the stop string that ended it at its end, as a local backend
    returns it, whether the server kept that string or left it out.

    The rule, first match wins:
      1. `finish_reason` other than "stop" ("length", "content_filter"), or no stop strings
         sent: nothing to restore.
      2. The text already ends with a sent stop string: the server kept it.
      3. The server named the stop (`reported`, from vLLM's `stop_reason` or SGLang's
         `matched_stop`): a sent stop string is appended; null or a token id (EOS, a stop
         token) appends nothing.
      4. Otherwise (OpenAI's replies say nothing): the unclosed-tag rule appends the closing
         tag of the last tag left open (`unclosed_tag_stop`), and nothing when all are closed.

    Limits of rule 4, none of which arise where the server reports the stop (rule 3):
      - A stop string that is not a closing tag ("End Inquiry") is never restored: an
        OpenAI reply that ends on it reads exactly like one that ends on EOS.
      - A reply that hit EOS with a tag still open ('<answer>flu' then EOS) gets that tag
        closed, so a reply that a local backend would show unclosed reads as closed.
      - Only bare opening tags count ("<answer>", not "<answer id=1>"), and crossed tags
        ("<a><b></a>") are closed innermost first.

    Args:
      text: the reply as the server returned it.
      finish_reason: the choice's finish reason.
      stop_strings: the `stop` list of the request.
      reported: what the server said matched (`reported_stop(choice)`), or `UNREPORTED`.

    Returns:
      `text`, possibly with one stop string appended.
    """
    if finish_reason != "stop" or not stop_strings:
        return text
    if any(text.endswith(stop) for stop in stop_strings):
        return text
    if reported is not UNREPORTED:
        return text + reported if isinstance(reported, str) and reported in stop_strings else text
    return text + (unclosed_tag_stop(text, stop_strings) or "")


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
      stop_in_output: "restore" (default): each reply ends with the stop string that ended
        it, whether the server kept it or left it out (`restore_stop_string`), so that the
        agent loop parses `</tool_call>` and `</answer>` from any server. "as_returned": the
        text exactly as the server sent it; for a server known to keep the matched stop
        that does not name it, where the unclosed-tag guess should not apply.
      extra_body: fields added to every request, for a server's extensions (vLLM's
        `{"include_stop_str_in_output": True}`, SGLang's `{"no_stop_trim": True}`). It may
        not set a field the backend sets itself; OpenAI refuses fields it does not know.

    Raises:
      ValueError: a setting out of range, an unknown `stop_in_output`, or an `extra_body`
        that is not a JSON object of new fields.
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
        stop_in_output: str = "restore",
        extra_body: Mapping[str, Any] | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"OpenAICompatibleBackend: max_concurrency={max_concurrency} < 1.")
        if max_retries < 0:
            raise ValueError(f"OpenAICompatibleBackend: max_retries={max_retries} < 0.")
        if timeout_s <= 0:
            raise ValueError(f"OpenAICompatibleBackend: timeout_s={timeout_s} must be > 0.")
        if stop_in_output not in STOP_IN_OUTPUT:
            raise ValueError(
                f"OpenAICompatibleBackend: stop_in_output={stop_in_output!r}; expected one of"
                f" {', '.join(STOP_IN_OUTPUT)}."
            )
        self.extra_body = _checked_extra_body(extra_body)
        self.stop_in_output = stop_in_output
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
        self._warned_unreported = False

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
        return body | self.extra_body

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
            return self._parse(reply, n, attempt, body.get("stop") or [])

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

    def _parse(
        self, reply: bytes, n: int, attempt: int, stop_strings: Sequence[str]
    ) -> list[Generation]:
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
                text = choice["message"].get("content") or ""
                if not isinstance(text, str):
                    raise TypeError(f"message.content is {type(text).__name__}, not a string")
                finish_reason = choice.get("finish_reason") or "stop"
                if self.stop_in_output == "restore":
                    text = self._restored(text, finish_reason, stop_strings, reported_stop(choice))
                generations.append(
                    Generation(
                        text=text,
                        token_ids=[int(t) for t in choice.get("token_ids") or []],
                        logps=None if content is None else [float(t["logprob"]) for t in content],
                        finish_reason=finish_reason,
                    )
                )
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise fail(f"choice {choice.get('index')!r}: {type(e).__name__}: {e}") from None
        return generations

    def _restored(
        self, text: str, finish_reason: str, stop_strings: Sequence[str], reported: object
    ) -> str:
        restored = restore_stop_string(text, finish_reason, stop_strings, reported=reported)
        silent = [s for s in stop_strings if _CLOSING_TAG.fullmatch(s) is None]
        if (
            restored == text
            and finish_reason == "stop"
            and reported is UNREPORTED
            and silent
            and not any(text.endswith(s) for s in stop_strings)
            and not self._warned_unreported
        ):
            # Once per backend: every EOS reply of such a server would repeat it.
            self._warned_unreported = True
            logger.warning(
                "POST %s: the server does not say which stop ended a reply (no stop_reason or"
                " matched_stop), so a reply without an open tag is taken as ended by EOS and"
                " the stop string(s) %s are never restored; use a server that names the"
                " matched stop (vLLM, SGLang) or keeps it.",
                self.url,
                ", ".join(repr(s) for s in silent),
            )
        return restored


def _checked_extra_body(extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    """`extra_body` as a dict, refused where it would replace the backend's own fields or
    could not be sent as JSON."""
    if extra_body is None:
        return {}
    if not isinstance(extra_body, Mapping) or not all(isinstance(k, str) for k in extra_body):
        raise ValueError("OpenAICompatibleBackend: extra_body must map field names to values.")
    clashes = sorted(_OWN_FIELDS & set(extra_body))
    if clashes:
        raise ValueError(
            f"OpenAICompatibleBackend: extra_body may not set {', '.join(clashes)}; the backend"
            " sets it from the SamplingParams."
        )
    try:
        # A copy: a caller's later change to its mapping cannot reach the requests.
        return json.loads(json.dumps(dict(extra_body), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"OpenAICompatibleBackend: extra_body is not JSON: {e}.") from None


def _error_message(body: str) -> str:
    """The `error.message` of an OpenAI-style error body, else the body itself."""
    try:
        error = json.loads(body)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body.strip()
