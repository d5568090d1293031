"""An OpenAI-compatible chat-completions server over any `TextBackend`.

python -m medjax.llm.serve --checkpoint /ckpt/qwen2.5-0.5b-instruct --port 8000
backend = OpenAICompatibleBackend("http://127.0.0.1:8000/v1", "qwen2.5-0.5b-instruct")

Endpoints: POST /v1/chat/completions (non-streaming) and GET /v1/models. Standard library
only (`http.server.ThreadingHTTPServer`): a handler thread per connection, and a lock that
serialises the backend calls, since a JAX model is not meant to be called from several
threads at once (a thread-safe backend, such as a remote proxy, can drop it). Binds 127.0.0.1
unless told otherwise; with `--api-key-env VAR`, every request needs `Authorization: Bearer
$VAR` (the key is read per request, compared in constant time, and never logged; the server
refuses to start when VAR is unset or empty, and answers 401 if it is emptied later).

Limits, each an option of `make_server` and the CLI: a prompt must leave room for one token
in the context, and an explicit max_tokens must fit in what the prompt leaves (400 otherwise,
as OpenAI does; an omitted max_tokens is cut to fit); n is at most `max_n`; a client has
`request_timeout_s` to send its whole request (a slow or stalled one gets 408 and is
dropped); the listen backlog is `backlog`; and at most `max_sampling_variants` distinct
(greedy, top_k, top_p, stop) combinations are served, since each compiles a sampler program.
Every client error is a 4xx with an OpenAI-style JSON body naming the field.

Requests map onto `SamplingParams`: max_tokens (or max_completion_tokens), temperature
(0 means greedy, at most 2), top_p, top_k (vLLM's extension; 0 or -1 is off), stop, n; the
token-id fields (eos_ids, stop_sequences, pad_id) come from the server's `base_params`. The
CLI's backend is a `JaxPolicyBackend(serving=True)`, in which any temperature, max_tokens and
n share programs (traced or rounded up). `seed` is honoured where the server has a
`backend_for_seed` (the CLI does: a fresh PRNG per seeded request, so the same seed and
request give the same reply).

Every request field is either served or refused with a 400 naming it (`param`), as OpenAI
refuses what it does not know; none is silently ignored:
  * served: messages, model, n, max_tokens, max_completion_tokens, temperature, top_p, stop,
    seed, logprobs, top_logprobs (0 to 20), stream (false), vLLM's top_k,
    include_stop_str_in_output and return_token_ids, and the identifiers user,
    safety_identifier and prompt_cache_key (accepted; they change no reply);
  * accepted only at their no-op values, refused otherwise: tools ([]), tool_choice ("none"),
    response_format ({"type": "text"}), logit_bias ({}), presence_penalty and
    frequency_penalty (0), modalities (["text"]), store (false), metadata ({}), service_tier
    ("auto", "default"); any other field given a non-null value (functions, audio, ...) and
    any field this server does not know are refused. A message may carry only role and
    content (other keys null).
Tools are refused rather than rendered: serving them needs the template's tool rendering and
a per-family parser from the reply's text into `tool_calls` (and constrained decoding for
tool_choice "required"); medjax's agents put their tools in the system prompt themselves.
logit_bias and the penalties would change the sampler's logits, which it does not take per
request.

Replies carry, per choice, the content, finish_reason ("stop" for EOS or a stop string,
"length" for the budget), and:
  * a matched stop string is left out of `content`, as OpenAI does; `stop_reason` (vLLM's
    field) carries the string that matched (null otherwise), so a caller restores it with
    `content + (stop_reason or "")`, or asks `include_stop_str_in_output: true` to have it
    kept (text the stopping token carried past it is dropped either way);
  * `logprobs` when asked for and the backend gives them: per sampled token its text,
    log-prob at the sampling temperature and UTF-8 `bytes` (a token holding part of a
    multi-byte character carries its own bytes; its `token` text then holds U+FFFD), and
    `top_logprobs`, the k most likely tokens of the same distribution, scored by one forward
    pass of the prompt and the reply on the backend's model (equal to the sampler's to float
    rounding; served only by backends with a `model` and an `encode`, i.e. JaxPolicyBackend);
  * a medjax extension `token_ids`: the sampled ids, the stopping token included, so that a
    client can train on them (dropped with `return_token_ids: false`). `token_ids` and
    `logprobs.content` cover every sampled token, those of a stop string and of the EOS token
    included, so they may run past `content`.
"""

import argparse
import contextlib
import dataclasses
import hmac
import http.server
import io
import json
import logging
import math
import os
import pathlib
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from medjax.llm import reply_tokens
from medjax.llm.base import Generation, TextBackend
from medjax.llm.chat_request import (
    SEED_RANGE,
    ChatRequest,
    RequestError,
    is_int,
    missing_api_key,
    parse_request,
)
from medjax.models import tokenizer as tokenizer_lib
from medjax.sampling import SamplingParams

logger = logging.getLogger("medjax.llm")

_MAX_BODY_BYTES = 16 << 20


def _sampling_variant(params: SamplingParams) -> tuple[Any, ...]:
    """What of a request's params picks a compiled sampler program besides the values a
    serving backend traces or rounds (temperature, max_tokens, n)."""
    if params.greedy:
        return (True, 0, 1.0, params.stop_strings)
    return (False, params.top_k, params.top_p, params.stop_strings)


class ChatCompletionServer(http.server.ThreadingHTTPServer):
    """The HTTP server; build it with `make_server`.

    Attributes:
      url: the API root, "http://HOST:PORT/v1".
    """

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        backend: TextBackend,
        model_name: str,
        base_params: SamplingParams,
        tokenizer: Any,
        api_key_env: str | None,
        serialize: bool,
        backend_for_seed: Callable[[int], TextBackend] | None,
        context_length: int | None,
        max_n: int | None,
        max_sampling_variants: int | None,
        request_timeout_s: float,
        backlog: int,
        max_body_bytes: int,
    ):
        # Read by server_activate's listen(): the default of 5 resets connections under load.
        self.request_queue_size = backlog
        super().__init__(address, _Handler)
        self.backend = backend
        self.model_name = model_name
        self.base_params = base_params
        self.tokenizer = tokenizer
        self.api_key_env = api_key_env
        self.backend_for_seed = backend_for_seed
        self.context_length = context_length
        self.max_n = max_n
        self.max_sampling_variants = max_sampling_variants
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        self.backend_lock = threading.Lock() if serialize else contextlib.nullcontext()
        self.created = int(time.time())
        self._variants: set[tuple[Any, ...]] = set()
        self._variants_lock = threading.Lock()
        self._token_bytes = reply_tokens.TokenBytes(tokenizer) if tokenizer is not None else None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def complete(self, body: Any) -> dict[str, Any]:
        """The chat-completions reply to a decoded request body.

        Raises:
          RequestError: an invalid request (400) or an unknown model (404).
          Exception: whatever the backend raised.
        """
        request = parse_request(body, self.base_params, max_n=self.max_n)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(
                f"model: {model!r} is not served here; this server serves {self.model_name!r}.",
                param="model",
                status=404,
            )
        backend = self.backend
        if request.seed is not None and self.backend_for_seed is not None:
            backend = self.backend_for_seed(request.seed)
        if request.top_logprobs and not reply_tokens.scores_top_logprobs(backend):
            raise RequestError(
                "top_logprobs: this server's backend does not expose its model's logits.",
                param="top_logprobs",
            )
        prompt_tokens = self._prompt_tokens(request.messages)
        params = self._fit_context(body, request.params, prompt_tokens)
        self._admit_variant(params)
        n = request.n
        top = [None] * n
        with self.backend_lock:
            generations = backend.generate([request.messages], params, num_samples=n)
            if len(generations) != n:
                raise RuntimeError(f"the backend returned {len(generations)} replies for n={n}.")
            if request.logprobs and request.top_logprobs:
                top = reply_tokens.top_logprobs(
                    backend.model,
                    backend.encode([request.messages])[0],
                    [g.token_ids for g in generations],
                    temperature=params.temperature,
                    k=request.top_logprobs,
                )
        choices = [
            self._choice(i, g, request, t)
            for i, (g, t) in enumerate(zip(generations, top, strict=True))
        ]
        completion_tokens = sum(len(g.token_ids) for g in generations)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """The prompt's length in tokens (0 without a tokenizer)."""
        if self.tokenizer is None:
            return 0
        try:
            ids = tokenizer_lib.encode_chat(self.tokenizer, messages)
        except Exception as e:
            # A template may reject a conversation (an unknown role, an order it forbids).
            reason = (str(e).splitlines() or [""])[0]
            raise RequestError(
                f"messages: the chat template rejected them: {type(e).__name__}: {reason}",
                param="messages",
            ) from None
        return len(ids)

    def _fit_context(
        self, body: dict[str, Any], params: SamplingParams, prompt_tokens: int
    ) -> SamplingParams:
        """Checks the prompt and the reply budget against the context.

        An explicit max_tokens that does not fit is refused, as OpenAI does (the client asked
        for it); the server's default is cut to what the prompt leaves.
        """
        context = self.context_length
        if context is None:
            return params
        if prompt_tokens >= context:
            raise RequestError(
                f"messages: the prompt is {prompt_tokens} tokens; the context is {context}"
                " tokens and must leave room for at least one reply token.",
                param="messages",
            )
        room = context - prompt_tokens
        name = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k)), None)
        if params.max_new_tokens <= room:
            return params
        if name is not None:
            raise RequestError(
                f"{name}: {params.max_new_tokens} new tokens after a prompt of {prompt_tokens}"
                f" exceed the context of {context} tokens; ask for at most {room}.",
                param=name,
            )
        return dataclasses.replace(params, max_new_tokens=room)

    def _admit_variant(self, params: SamplingParams) -> None:
        """Refuses a request that would compile a sampler program past the bound."""
        if self.max_sampling_variants is None:
            return
        variant = _sampling_variant(params)
        with self._variants_lock:
            if variant in self._variants:
                return
            if len(self._variants) < self.max_sampling_variants:
                self._variants.add(variant)
                return
            fields = ("temperature", "top_k", "top_p", "stop")
            name = next(
                (
                    f
                    for i, f in enumerate(fields)
                    if all(v[i] != variant[i] for v in self._variants)
                ),
                "stop",
            )
        raise RequestError(
            f"{name}: this server serves at most {self.max_sampling_variants} distinct"
            " combinations of (temperature 0 or not, top_k, top_p, stop), each a compiled"
            " program, and all are taken; reuse the values of an earlier request.",
            param=name,
        )

    def _choice(
        self,
        index: int,
        generation: Generation,
        request: ChatRequest,
        top: list[list[tuple[int, float]]] | None,
    ) -> dict[str, Any]:
        """One reply's choice: the content cut at a matched stop string, its log-probs."""
        content, matched = reply_tokens.cut_at_stop(
            generation.text, request.params.stop_strings, keep=request.include_stop_str
        )
        logprobs = None
        if request.logprobs and generation.logps is not None:
            tokens = generation.token_ids or [None] * len(generation.logps)
            entries = []
            for i, (token, logp) in enumerate(zip(tokens, generation.logps, strict=False)):
                entry = self._logprob_entry(token, logp)
                entry["top_logprobs"] = (
                    [self._logprob_entry(t, lp) for t, lp in top[i]]
                    if top is not None and i < len(top)
                    else []
                )
                entries.append(entry)
            logprobs = {"content": entries}
        choice = {
            "index": index,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop" if matched is not None else generation.finish_reason,
            # vLLM's field: the stop string that ended the reply (null for EOS or the budget).
            "stop_reason": matched,
            "logprobs": logprobs,
        }
        if request.return_token_ids:
            choice["token_ids"] = list(generation.token_ids)
        return choice

    def _logprob_entry(self, token_id: int | None, logp: float) -> dict[str, Any]:
        """OpenAI's {token, logprob, bytes} of one token (bytes null for an unknown id)."""
        if token_id is None or self.tokenizer is None:
            return {"token": "", "logprob": float(logp), "bytes": None}
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return {
            "token": text,
            "logprob": float(logp),
            "bytes": list(self._token_bytes(token_id)) if self._token_bytes else None,
        }

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the key (always, when no key variable is
        configured; never, when the configured variable has been emptied since the start)."""
        if self.api_key_env is None:
            return True
        key = os.environ.get(self.api_key_env)
        if not key:
            return False
        given = header or ""
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


class _RequestTimeoutError(Exception):
    """The client did not send its whole request within the server's request timeout."""


class _DeadlineReader(io.RawIOBase):
    """A socket's input with one deadline for a whole request: a per-read timeout alone lets
    a client that trickles a byte at a time hold a handler thread for ever."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _RequestTimeoutError
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            raise _RequestTimeoutError from None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ChatCompletionServer
    server_version = "medjax"
    timeout = None  # The deadline reader bounds reads; see `handle_one_request`.

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        # The deadline covers a keep-alive connection's wait for the next request too.
        self._reader.deadline = time.monotonic() + self.server.request_timeout_s
        try:
            super().handle_one_request()
        except _RequestTimeoutError:
            logger.debug("serve: %s timed out sending its request.", self.address_string())
            self.close_connection = True
            # The reply goes out only if the client sent a request line before stalling.
            if getattr(self, "raw_requestline", b""):
                self._send_error(
                    408, f"the request was not received within {self.server.request_timeout_s:g}s."
                )
        except OSError as e:
            logger.debug("serve: the connection of %s failed: %s", self.address_string(), e)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines go to the medjax logger, not stderr; headers are never logged.
        logger.debug("serve: %s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line or header, an unknown method),
        as JSON; an unknown method is the client's error (405), not 501."""
        if code == 501:
            code, message = 405, f"method {self.command!r} is not allowed; use GET or POST."
        elif code == 505:
            code = 400
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # So that the status line and headers go out.
        self._send_error(code, message or self.responses.get(code, ("error",))[0])

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            # A reply gets the whole timeout, whatever the request's reading left.
            self.connection.settimeout(self.server.request_timeout_s)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            logger.debug("serve: the client of %s left before the reply.", self.path)
            self.close_connection = True

    def _send_error(self, status: int, message: str, *, param: str | None = None) -> None:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(status)
        if kind is None:
            kind = "server_error" if status >= 500 else "invalid_request_error"
        error = {"message": message, "type": kind, "param": param, "code": status}
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if status == 405:
            headers["Allow"] = "GET, POST"
        # The body may be unread: the connection cannot carry another request.
        self.close_connection = True
        self._send_json(status, {"error": error}, headers)

    def _check_auth(self) -> bool:
        if self.server.authorized(self.headers.get("Authorization")):
            return True
        logger.warning("serve: %s %s: missing or wrong API key.", self.command, self.path)
        self._send_error(401, "missing or wrong API key (Authorization: Bearer ...).")
        return False

    def do_GET(self) -> None:
        if not self._check_auth():
            return
        if self.path.rstrip("/") != "/v1/models":
            self._send_error(404, f"no route GET {self.path}.")
            return
        model = {
            "id": self.server.model_name,
            "object": "model",
            "created": self.server.created,
            "owned_by": "medjax",
        }
        self._send_json(200, {"object": "list", "data": [model]})

    def _read_body(self) -> Any:
        """The request's JSON body; RequestError for a missing, malformed or oversize one."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(
                "Transfer-Encoding: not supported; send a Content-Length.", status=411
            )
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError("Content-Length: required.", status=411)
        if not re.fullmatch(r"[0-9]{1,15}", raw.strip()):
            raise RequestError(f"Content-Length must be a non-negative integer, got {raw!r}.")
        length = int(raw)
        if length > self.server.max_body_bytes:
            raise RequestError(
                f"Content-Length: the body must be at most {self.server.max_body_bytes} bytes,"
                f" got {length}.",
                status=413,
            )
        data = self.rfile.read(length)
        if len(data) < length:
            raise RequestError(f"the body ended after {len(data)} of {length} bytes.")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            reason = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
            raise RequestError(f"the body is not valid JSON: {reason}.") from None

    def do_POST(self) -> None:
        if not self._check_auth():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_error(404, f"no route POST {self.path}.")
            return
        try:
            body = self._read_body()
            reply = self.server.complete(body)
        except RequestError as e:
            self._send_error(e.status, str(e), param=e.param)
            return
        except _RequestTimeoutError:
            raise
        except Exception as e:
            logger.exception("serve: the backend failed on POST %s.", self.path)
            self._send_error(500, f"the backend failed: {type(e).__name__}: {e}")
            return
        self._send_json(200, reply)


def make_server(
    backend: TextBackend,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str = "medjax",
    base_params: SamplingParams | None = None,
    tokenizer: Any = None,
    api_key_env: str | None = None,
    serialize: bool = True,
    backend_for_seed: Callable[[int], TextBackend] | None = None,
    context_length: int | None = None,
    max_n: int | None = 16,
    max_sampling_variants: int | None = 16,
    request_timeout_s: float = 30.0,
    backlog: int = 256,
    max_body_bytes: int = _MAX_BODY_BYTES,
) -> ChatCompletionServer:
    """Binds a chat-completions server; run it with `serve_forever()` (e.g. in a thread),
    stop it with `shutdown()` and `server_close()`.

    Args:
      backend: generates the replies.
      host: the address to bind; 127.0.0.1 keeps it on this machine.
      port: the port; 0 picks a free one (read it from `server.url`).
      model_name: the id served at /v1/models; requests naming another model get 404.
      base_params: its eos_ids, stop_sequences and pad_id go into every request's params;
        its max_new_tokens is the default max_tokens.
      tokenizer: counts prompt tokens (for `usage` and the context check) and renders tokens
        in `logprobs` (their text and UTF-8 bytes, `TokenBytes`); None takes the backend's
        `tokenizer` attribute where it has one (without any, both are left empty and prompts
        are not checked).
      api_key_env: names the environment variable holding the key that requests must carry
        as `Authorization: Bearer <key>` (401 otherwise); unset or empty, the server refuses
        to start (ValueError).
      serialize: hold a lock around backend calls (JAX models are not meant to be called
        concurrently); False only for thread-safe backends.
      backend_for_seed: builds the backend for a request that carries `seed`; None ignores
        the seed.
      context_length: tokens of prompt plus reply the model takes; None takes the backend's
        `model.config.max_position_embeddings` where it has one, else checks nothing.
      max_n: the largest n served (400 beyond it); None: no bound.
      max_sampling_variants: how many distinct (greedy, top_k, top_p, stop) combinations
        are served (400 for a new one past it); None: no bound.
      request_timeout_s: the time a client has to send a whole request (and, on a kept-alive
        connection, to start the next one); a client that has not is answered 408 and
        dropped.
      backlog: the listen queue; connections past it are refused or reset.
      max_body_bytes: the largest body accepted (413 beyond it).
    """
    if reason := missing_api_key(api_key_env):
        raise ValueError(f"api_key_env: {reason}")
    if tokenizer is None:
        tokenizer = getattr(backend, "tokenizer", None)
    if context_length is None:
        config = getattr(getattr(backend, "model", None), "config", None)
        context_length = getattr(config, "max_position_embeddings", None)
    if context_length is not None and tokenizer is None:
        raise ValueError("context_length: checking prompts against it needs a tokenizer.")
    for name, value in (("max_n", max_n), ("max_sampling_variants", max_sampling_variants)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}.")
    if not request_timeout_s > 0:
        raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}.")
    return ChatCompletionServer(
        (host, port),
        backend=backend,
        model_name=model_name,
        base_params=base_params or SamplingParams(max_new_tokens=256),
        tokenizer=tokenizer,
        api_key_env=api_key_env,
        serialize=serialize,
        backend_for_seed=backend_for_seed,
        context_length=context_length,
        max_n=max_n,
        max_sampling_variants=max_sampling_variants,
        request_timeout_s=request_timeout_s,
        backlog=backlog,
        max_body_bytes=max_body_bytes,
    )


def eos_ids_of(tokenizer: Any, checkpoint: str | os.PathLike | None = None) -> tuple[int, ...]:
    """The ids that end a reply: the tokenizer's EOS token, plus the `eos_token_id` of the
    checkpoint's generation_config.json when there is one (Qwen instruct models list both
    <|im_end|> and <|endoftext|> there).

    Raises:
      ValueError: generation_config.json is not a JSON object, or its `eos_token_id` is not
        an integer or a list of them; names the file.
    """
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    config = pathlib.Path(checkpoint) / "generation_config.json" if checkpoint else None
    if config is not None and config.is_file():
        try:
            settings = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{config}: not valid JSON: {e}") from None
        extra = settings.get("eos_token_id") if isinstance(settings, dict) else None
        extra = extra if isinstance(extra, list) else [extra]
        if not isinstance(settings, dict) or not all(i is None or is_int(i) for i in extra):
            raise ValueError(f"{config}: eos_token_id must be an integer or a list of integers.")
        ids += [i for i in extra if i is not None]
    return tuple(dict.fromkeys(ids))


_CLI = "medjax.llm.serve"


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag in one line on stderr (argparse's usage block left out)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{_CLI}: {message}\n")


def _flag_problem(args: argparse.Namespace) -> str | None:
    """The first flag out of range, as one line, or None."""
    checks = [
        ("--port", args.port, 0 <= args.port <= 65535, "in [0, 65535]"),
        ("--seed", args.seed, SEED_RANGE[0] <= args.seed < SEED_RANGE[1], "a 64-bit integer"),
        ("--default-max-tokens", args.default_max_tokens, args.default_max_tokens >= 1, ">= 1"),
        ("--max-context", args.max_context, args.max_context is None or args.max_context >= 2,
         ">= 2 (a prompt token and a reply token)"),
        ("--max-n", args.max_n, args.max_n >= 1, ">= 1"),
        ("--max-sampling-variants", args.max_sampling_variants,
         args.max_sampling_variants >= 1, ">= 1"),
        ("--request-timeout", args.request_timeout,
         math.isfinite(args.request_timeout) and args.request_timeout > 0, "a finite number > 0"),
        ("--backlog", args.backlog, args.backlog >= 1, ">= 1"),
    ]  # fmt: skip
    for flag, value, ok, what in checks:
        if not ok:
            return f"argument {flag}: must be {what}, got {value}."
    return None


def _one_line(error: BaseException, path: str) -> str:
    """An exception as one line that names `path` (loaders' own messages usually do)."""
    message = (str(error).strip().splitlines() or [""])[0]
    if not isinstance(error, (OSError, ValueError)) or not message:
        message = f"{type(error).__name__}: {message}".rstrip(": ")
    return message if path in message else f"{path}: {message}"


def main(argv: Sequence[str] | None = None) -> None:
    """Loads a checkpoint and serves it until interrupted (SIGINT or SIGTERM).

    A bad flag, a missing or unreadable checkpoint or tokenizer, and an address that cannot
    be bound end the process with one line on stderr naming the flag or file (exit status 2
    for a flag out of range, 1 otherwise), before anything is served.
    """
    parser = _Parser(prog=f"python -m {_CLI}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face model folder.")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port.")
    parser.add_argument("--model-name", help="the served id (default: the folder's name).")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of unseeded requests.")
    parser.add_argument(
        "--api-key-env", help="require the key held in this variable (refuses to start unset)."
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument(
        "--max-context", type=int, help="prompt + reply tokens (default: the checkpoint's)."
    )
    parser.add_argument("--max-n", type=int, default=16, help="the largest n served.")
    parser.add_argument(
        "--max-sampling-variants", type=int, default=16,
        help="distinct (greedy, top_k, top_p, stop) combinations served.",
    )  # fmt: skip
    parser.add_argument(
        "--request-timeout", type=float, default=30.0,
        help="seconds a client has to send a whole request.",
    )  # fmt: skip
    parser.add_argument("--backlog", type=int, default=256, help="the listen queue.")
    args = parser.parse_args(argv)
    if problem := _flag_problem(args):
        parser.error(problem)
    if reason := missing_api_key(args.api_key_env):  # Before loading the checkpoint.
        sys.exit(f"{_CLI}: --api-key-env: {reason}")

    from medjax.llm.jax_backend import JaxPolicyBackend
    from medjax.models import checkpoint as checkpoint_lib

    for flag, path in (("--checkpoint", args.checkpoint), ("--tokenizer", args.tokenizer)):
        if path is not None and not os.path.exists(path):
            sys.exit(f"{_CLI}: {flag} {path}: no such file or directory.")
    if not checkpoint_lib.is_checkpoint(args.checkpoint):
        sys.exit(
            f"{_CLI}: --checkpoint {args.checkpoint}: not a checkpoint (a folder with"
            " config.json, or a .gguf file)."
        )
    # Loading errors are the user's file, not a bug to trace: one line naming the file.
    try:
        model = checkpoint_lib.from_pretrained(args.checkpoint, dtype=getattr(jnp, args.dtype))
    except Exception as e:
        sys.exit(f"{_CLI}: --checkpoint {_one_line(e, args.checkpoint)}")
    flag, path = ("--tokenizer", args.tokenizer) if args.tokenizer else ("--checkpoint", None)
    try:
        tokenizer = tokenizer_lib.load_tokenizer(args.tokenizer or args.checkpoint)
        eos_ids = eos_ids_of(tokenizer, args.checkpoint)
    except Exception as e:
        sys.exit(f"{_CLI}: {flag} {_one_line(e, path or args.checkpoint)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base_params = SamplingParams(
        max_new_tokens=args.default_max_tokens, eos_ids=eos_ids, pad_id=int(pad_id)
    )
    try:
        server = make_server(
            JaxPolicyBackend(model, tokenizer, seed=args.seed, serving=True),
            host=args.host,
            port=args.port,
            model_name=args.model_name or pathlib.Path(args.checkpoint).resolve().name,
            base_params=base_params,
            tokenizer=tokenizer,
            api_key_env=args.api_key_env,
            backend_for_seed=lambda seed: JaxPolicyBackend(
                model, tokenizer, seed=seed, serving=True
            ),
            context_length=args.max_context or model.config.max_position_embeddings,
            max_n=args.max_n,
            max_sampling_variants=args.max_sampling_variants,
            request_timeout_s=args.request_timeout,
            backlog=args.backlog,
        )
    except OSError as e:
        sys.exit(f"{_CLI}: --host/--port {args.host}:{args.port}: cannot listen there: {e}")
    # Configured only now: a failed start leaves its one line alone on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM unwinds serve_forever like Ctrl-C does, so the socket is closed either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"{_CLI}: serving {server.model_name} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
