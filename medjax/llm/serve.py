"""An OpenAI-compatible chat-completions server over any `TextBackend`.

python -m medjax.llm.serve --checkpoint /ckpt/qwen2.5-0.5b-instruct --port 8000
backend = OpenAICompatibleBackend("http://127.0.0.1:8000/v1", "qwen2.5-0.5b-instruct")

Endpoints: POST /v1/chat/completions (non-streaming) and GET /v1/models. Standard library
only (`http.server.ThreadingHTTPServer`): a handler thread per request, and a lock that
serialises the backend calls, since a JAX model is not meant to be called from several
threads at once (a thread-safe backend, such as a remote proxy, can drop it). Binds 127.0.0.1
unless told otherwise; with `--api-key-env VAR` and VAR set, every request needs
`Authorization: Bearer $VAR` (the key is read per request, compared in constant time, and
never logged).

Requests map onto `SamplingParams`: max_tokens (or max_completion_tokens), temperature
(0 means greedy), top_p, top_k (vLLM's extension; 0 or -1 is off), stop, n; the token-id
fields (eos_ids, stop_sequences, pad_id) come from the server's `base_params`. Each distinct
combination compiles one sampler program, as for any JaxPolicyBackend caller. `seed` is
honoured where the server has a `backend_for_seed` (the CLI does: a fresh PRNG per seeded
request, so the same seed and request give the same reply). Replies carry, per choice,
`logprobs` when asked for and the backend gives them, and a medjax extension `token_ids`: the
sampled ids, the stopping token included, so that a client can train on them. The reply text
follows the backend's convention (a matched stop string is kept, an EOS token is not).
"""

import argparse
import contextlib
import hmac
import http.server
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from medjax.llm.base import Generation, TextBackend
from medjax.models import tokenizer as tokenizer_lib
from medjax.sampling import SamplingParams

logger = logging.getLogger("medjax.llm")

_MAX_BODY_BYTES = 16 << 20


class RequestError(ValueError):
    """A request the server cannot serve; `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _content_text(content: Any, field: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    f"{field}[{i}] must be a text part {{'type': 'text', 'text': str}}.",
                    param=f"{field}[{i}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(
        f"{field} must be a string or a list of text parts, got {type(content).__name__}.",
        param=field,
    )


def parse_request(
    body: Any, base_params: SamplingParams
) -> tuple[list[dict[str, str]], SamplingParams, int, bool, int | None]:
    """Validates a chat-completions body.

    Args:
      body: the decoded JSON.
      base_params: supplies the token-id fields and the default max_new_tokens.

    Returns:
      (messages, params, n, logprobs, seed).

    Raises:
      RequestError: naming the first invalid field.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    if body.get("stream"):
        raise RequestError("stream: streaming is not supported.", param="stream")
    raw = body.get("messages")
    if raw is None:
        raise RequestError("messages: required.", param="messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list.", param="messages")
    messages = []
    for i, message in enumerate(raw):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{field} must be an object.", param=field)
        if not isinstance(message.get("role"), str):
            raise RequestError(f"{field}.role must be a string.", param=f"{field}.role")
        content = _content_text(message.get("content"), f"{field}.content")
        messages.append({"role": message["role"], "content": content})

    def field(name: str, check: Callable[[Any], bool], what: str, default: Any) -> Any:
        value = body.get(name)
        if value is None:
            return default
        if not check(value):
            raise RequestError(f"{name} must be {what}, got {value!r}.", param=name)
        return value

    n = field("n", lambda v: _is_int(v) and v >= 1, "an integer >= 1", 1)
    max_tokens = field(
        "max_completion_tokens",
        lambda v: _is_int(v) and v >= 1,
        "an integer >= 1",
        None,
    )
    if max_tokens is None:
        max_tokens = field(
            "max_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1",
            base_params.max_new_tokens,
        )  # fmt: skip
    temperature = field("temperature", lambda v: _is_number(v) and v >= 0, "a number >= 0", 1.0)
    top_p = field("top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", 1.0)
    top_k = field("top_k", lambda v: _is_int(v) and v >= -1, "an integer >= -1", 0)
    stop = field(
        "stop",
        lambda v: (
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) and s for s in v))
        ),
        "a string or a list of non-empty strings",
        [],
    )
    seed = field("seed", _is_int, "an integer", None)
    logprobs = field("logprobs", lambda v: isinstance(v, bool), "a boolean", False)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        # The API's temperature 0 is greedy decoding; the log-probs are then untempered.
        temperature=float(temperature) if temperature > 0 else 1.0,
        greedy=temperature == 0,
        top_p=float(top_p),
        top_k=max(top_k, 0),
        stop_strings=tuple([stop] if isinstance(stop, str) else stop),
        eos_ids=base_params.eos_ids,
        stop_sequences=base_params.stop_sequences,
        pad_id=base_params.pad_id,
    )
    return messages, params, n, logprobs, seed


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
    ):
        super().__init__(address, _Handler)
        self.backend = backend
        self.model_name = model_name
        self.base_params = base_params
        self.tokenizer = tokenizer
        self.api_key_env = api_key_env
        self.backend_for_seed = backend_for_seed
        self.backend_lock = threading.Lock() if serialize else contextlib.nullcontext()
        self.created = int(time.time())

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
        messages, params, n, want_logprobs, seed = parse_request(body, self.base_params)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(
                f"model: {model!r} is not served here; this server serves {self.model_name!r}.",
                param="model",
                status=404,
            )
        backend = self.backend
        if seed is not None and self.backend_for_seed is not None:
            backend = self.backend_for_seed(seed)
        with self.backend_lock:
            generations = backend.generate([messages], params, num_samples=n)
        if len(generations) != n:
            raise RuntimeError(f"the backend returned {len(generations)} replies for n={n}.")
        choices = [self._choice(i, g, want_logprobs) for i, g in enumerate(generations)]
        prompt_tokens = 0
        if self.tokenizer is not None:
            prompt_tokens = len(
                tokenizer_lib.apply_chat_template(self.tokenizer, messages, tokenize=True)
            )
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

    def _choice(self, index: int, generation: Generation, want_logprobs: bool) -> dict[str, Any]:
        logprobs = None
        if want_logprobs and generation.logps is not None:
            tokens = generation.token_ids or [None] * len(generation.logps)
            logprobs = {
                "content": [
                    {"token": self._token_text(t), "logprob": lp, "bytes": None, "top_logprobs": []}
                    for t, lp in zip(tokens, generation.logps, strict=False)
                ]
            }
        return {
            "index": index,
            "message": {"role": "assistant", "content": generation.text},
            "finish_reason": generation.finish_reason,
            "logprobs": logprobs,
            "token_ids": list(generation.token_ids),
        }

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None or self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the key (always, when none is set)."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if not key:
            return True
        given = header or ""
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ChatCompletionServer
    server_version = "medjax"
    timeout = 120  # Seconds a silent client may hold a handler thread.

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines go to the medjax logger, not stderr; headers are never logged.
        logger.debug("serve: %s %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("serve: the client of %s left before the reply.", self.path)

    def _send_error(self, status: int, message: str, *, param: str | None = None) -> None:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(status)
        if kind is None:
            kind = "server_error" if status >= 500 else "invalid_request_error"
        error = {"message": message, "type": kind, "param": param, "code": status}
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
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

    def do_POST(self) -> None:
        if not self._check_auth():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_error(404, f"no route POST {self.path}.")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send_error(411, "a Content-Length header is required.")
            return
        if not 0 <= length <= _MAX_BODY_BYTES:
            self._send_error(413, f"the body must be at most {_MAX_BODY_BYTES} bytes.")
            return
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            self._send_error(400, f"the body is not valid JSON: {e}.")
            return
        try:
            reply = self.server.complete(body)
        except RequestError as e:
            self._send_error(e.status, str(e), param=e.param)
            return
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
      tokenizer: renders tokens in `logprobs` and counts prompt tokens in `usage` (both are
        left empty without it).
      api_key_env: when set and that environment variable is non-empty, requests must carry
        `Authorization: Bearer <its value>` (401 otherwise).
      serialize: hold a lock around backend calls (JAX models are not meant to be called
        concurrently); False only for thread-safe backends.
      backend_for_seed: builds the backend for a request that carries `seed`; None ignores
        the seed.
    """
    if api_key_env and not os.environ.get(api_key_env):
        logger.warning("serve: %s is not set; serving without authentication.", api_key_env)
    return ChatCompletionServer(
        (host, port),
        backend=backend,
        model_name=model_name,
        base_params=base_params or SamplingParams(max_new_tokens=256),
        tokenizer=tokenizer,
        api_key_env=api_key_env,
        serialize=serialize,
        backend_for_seed=backend_for_seed,
    )


def eos_ids_of(tokenizer: Any, checkpoint: str | os.PathLike | None = None) -> tuple[int, ...]:
    """The ids that end a reply: the tokenizer's EOS token, plus the `eos_token_id` of the
    checkpoint's generation_config.json when there is one (Qwen instruct models list both
    <|im_end|> and <|endoftext|> there)."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    config = pathlib.Path(checkpoint) / "generation_config.json" if checkpoint else None
    if config is not None and config.exists():
        extra = json.loads(config.read_text()).get("eos_token_id")
        ids += [int(i) for i in (extra if isinstance(extra, list) else [extra]) if i is not None]
    return tuple(dict.fromkeys(ids))


def main(argv: Sequence[str] | None = None) -> None:
    """Loads a checkpoint and serves it until interrupted (SIGINT or SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="python -m medjax.llm.serve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="Hugging Face model folder.")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port.")
    parser.add_argument("--model-name", help="the served id (default: the folder's name).")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of unseeded requests.")
    parser.add_argument("--api-key-env", help="require the key held in this variable.")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--default-max-tokens", type=int, default=256)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import jax.numpy as jnp

    from medjax.llm.jax_backend import JaxPolicyBackend
    from medjax.models import checkpoint as checkpoint_lib

    model = checkpoint_lib.from_pretrained(args.checkpoint, dtype=getattr(jnp, args.dtype))
    tokenizer = tokenizer_lib.load_tokenizer(args.tokenizer or args.checkpoint)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base_params = SamplingParams(
        max_new_tokens=args.default_max_tokens,
        eos_ids=eos_ids_of(tokenizer, args.checkpoint),
        pad_id=int(pad_id),
    )
    server = make_server(
        JaxPolicyBackend(model, tokenizer, seed=args.seed),
        host=args.host,
        port=args.port,
        model_name=args.model_name or pathlib.Path(args.checkpoint).resolve().name,
        base_params=base_params,
        tokenizer=tokenizer,
        api_key_env=args.api_key_env,
        backend_for_seed=lambda seed: JaxPolicyBackend(model, tokenizer, seed=seed),
    )
    # SIGTERM unwinds serve_forever like Ctrl-C does, so the socket is closed either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"medjax.llm.serve: serving {server.model_name} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
