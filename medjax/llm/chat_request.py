"""Chat-completions requests for `medjax.llm.serve`: every field is either served or refused
with a `RequestError` naming it (see serve's module docstring for the lists), and a valid body
becomes a `ChatRequest` holding the `SamplingParams` it asks for.
"""

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from medjax.sampling import SamplingParams

_GREEDY_BELOW = 1e-5  # Temperatures below this decode greedily (vLLM's _SAMPLING_EPS).
_MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2].
SEED_RANGE = (-(1 << 63), 1 << 63)  # What jax.random.key accepts.
# Each stop string becomes token-id sequences matched at every decode step of the program.
_MAX_STOPS = 16
_MAX_STOP_CHARS = 256


class RequestError(ValueError):
    """A request the server cannot serve; `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def is_int(value: Any) -> bool:
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


# The fields a request may carry (any other is refused, as OpenAI refuses what it does not
# know): those served, then those accepted only at a value that asks for nothing.
_SERVED_FIELDS = frozenset(
    (
        "messages", "model", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "stop", "seed", "logprobs", "top_logprobs", "stream",
        # vLLM's extensions.
        "top_k", "include_stop_str_in_output", "return_token_ids",
        # Identifiers for the caller's bookkeeping (abuse monitoring, cache routing upstream):
        # they ask nothing of the reply.
        "user", "safety_identifier", "prompt_cache_key",
    )
)  # fmt: skip
# field: (accepted values, why others are refused).
_NO_OP_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": (([],), "tools are not supported by this server"),
    "tool_choice": (("none",), "tools are not supported by this server"),
    "parallel_tool_calls": ((), "tools are not supported by this server"),
    "functions": ((), "functions are not supported by this server"),
    "function_call": ((), "functions are not supported by this server"),
    "response_format": (({"type": "text"},), "only {'type': 'text'} is supported"),
    "logit_bias": (({},), "logit bias is not supported by this server"),
    "presence_penalty": ((0,), "penalties are not supported by this server; send 0"),
    "frequency_penalty": ((0,), "penalties are not supported by this server; send 0"),
    "modalities": ((["text"],), "only ['text'] is supported"),
    "audio": ((), "audio output is not supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "reasoning effort is not supported by this model"),
    "verbosity": ((), "verbosity is not supported by this model"),
    "web_search_options": ((), "web search is not supported"),
    "stream_options": ((), "streaming is not supported"),
    "store": ((False,), "stored completions are not supported"),
    "metadata": (({},), "stored completions are not supported"),
    "service_tier": (("auto", "default"), "this server has one tier: 'auto' or 'default'"),
}
# A message's own keys; any other must be null (a round-tripped reply message carries
# `tool_calls: null`, `refusal: null`, ...).
_MESSAGE_KEYS = frozenset(("role", "content"))
MAX_TOP_LOGPROBS = 20  # OpenAI's bound.


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request.

    Attributes:
      messages: the conversation, each {"role": str, "content": str}.
      params: the sampling params (the server's token-id fields filled in).
      n: replies to generate.
      logprobs: whether to return per-token log-probs.
      top_logprobs: how many most likely tokens to list per position (0 to 20).
      seed: the PRNG seed, or None.
      include_stop_str: keep a matched stop string in `content` (vLLM's
        `include_stop_str_in_output`).
      return_token_ids: include the medjax/vLLM `token_ids` field in each choice.
    """

    messages: list[dict[str, str]]
    params: SamplingParams
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    seed: int | None = None
    include_stop_str: bool = False
    return_token_ids: bool = True


def _same_value(a: Any, b: Any) -> bool:
    """JSON equality without Python's True == 1 == 1.0 (`false` is no `0`)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _check_fields(body: dict[str, Any]) -> None:
    """Refuses a field this server does not know, or a no-op field asking for something."""
    for name in body:
        if name not in _SERVED_FIELDS and name not in _NO_OP_FIELDS:
            raise RequestError(
                f"{name}: unrecognized request field; this server does not support it.",
                param=name,
            )
    for name, (accepted, why) in _NO_OP_FIELDS.items():
        value = body.get(name)
        if value is None or any(_same_value(value, ok) for ok in accepted):
            continue
        shown = json.dumps(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise RequestError(f"{name}: {why}; got {shown}.", param=name)


def _messages(raw: Any) -> list[dict[str, str]]:
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
        for key, value in message.items():
            if key not in _MESSAGE_KEYS and value is not None:
                raise RequestError(
                    f"{field}.{key}: not supported; a message carries role and content only"
                    " (the chat template renders nothing else).",
                    param=f"{field}.{key}",
                )
        content = _content_text(message.get("content"), f"{field}.content")
        messages.append({"role": message["role"], "content": content})
    return messages


def parse_request(
    body: Any, base_params: SamplingParams, *, max_n: int | None = None
) -> ChatRequest:
    """Validates a chat-completions body.

    Args:
      body: the decoded JSON.
      base_params: supplies the token-id fields and the default max_new_tokens.
      max_n: the largest n served (None: no bound).

    Returns:
      The request, validated.

    Raises:
      RequestError: naming the first invalid field: one of a wrong type or range, one this
        server does not know, or one asking for what it does not serve (see the module's
        docstring).
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    if body.get("stream"):
        raise RequestError("stream: streaming is not supported.", param="stream")
    _check_fields(body)
    messages = _messages(body.get("messages"))

    def field(name: str, check: Callable[[Any], bool], what: str, default: Any) -> Any:
        value = body.get(name)
        if value is None:
            return default
        if not check(value):
            raise RequestError(f"{name} must be {what}, got {value!r}.", param=name)
        return value

    for name in ("user", "safety_identifier", "prompt_cache_key"):
        field(name, lambda v: isinstance(v, str), "a string", None)
    n = field("n", lambda v: is_int(v) and v >= 1, "an integer >= 1", 1)
    if max_n is not None and n > max_n:
        raise RequestError(f"n must be at most {max_n} on this server, got {n}.", param="n")
    max_tokens = field(
        "max_completion_tokens",
        lambda v: is_int(v) and v >= 1,
        "an integer >= 1",
        None,
    )
    if max_tokens is None:
        max_tokens = field(
            "max_tokens", lambda v: is_int(v) and v >= 1, "an integer >= 1",
            base_params.max_new_tokens,
        )  # fmt: skip
    temperature = field(
        "temperature",
        lambda v: _is_number(v) and 0 <= v <= _MAX_TEMPERATURE,
        f"a number in [0, {_MAX_TEMPERATURE:g}]",
        1.0,
    )
    top_p = field("top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", 1.0)
    top_k = field("top_k", lambda v: is_int(v) and v >= -1, "an integer >= -1", 0)
    stop = field(
        "stop",
        lambda v: (
            (
                all(isinstance(s, str) and 0 < len(s) <= _MAX_STOP_CHARS for s in v)
                if isinstance(v, list)
                else isinstance(v, str) and 0 < len(v) <= _MAX_STOP_CHARS
            )
            and (not isinstance(v, list) or len(v) <= _MAX_STOPS)
        ),
        f"a non-empty string or a list of at most {_MAX_STOPS} such strings, each of at most"
        f" {_MAX_STOP_CHARS} characters",
        [],
    )
    seed = field(
        "seed",
        lambda v: is_int(v) and SEED_RANGE[0] <= v < SEED_RANGE[1],
        "a 64-bit signed integer",
        None,
    )
    logprobs = field("logprobs", lambda v: isinstance(v, bool), "a boolean", False)
    top_logprobs = field(
        "top_logprobs",
        lambda v: is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
        f"an integer in [0, {MAX_TOP_LOGPROBS}]",
        0,
    )
    if body.get("top_logprobs") is not None and not logprobs:  # As OpenAI refuses it.
        raise RequestError("top_logprobs: needs logprobs set to true.", param="top_logprobs")
    include_stop_str = field(
        "include_stop_str_in_output", lambda v: isinstance(v, bool), "a boolean", False
    )
    return_token_ids = field("return_token_ids", lambda v: isinstance(v, bool), "a boolean", True)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        # The API's temperature 0 is greedy decoding; the log-probs are then untempered. As in
        # vLLM, a temperature below _GREEDY_BELOW is greedy too: dividing logits by 1e-30
        # overflows float32 and the log-probs would be NaN.
        temperature=float(temperature) if temperature >= _GREEDY_BELOW else 1.0,
        greedy=temperature < _GREEDY_BELOW,
        top_p=float(top_p),
        top_k=max(top_k, 0),
        stop_strings=tuple([stop] if isinstance(stop, str) else stop),
        eos_ids=base_params.eos_ids,
        stop_sequences=base_params.stop_sequences,
        pad_id=base_params.pad_id,
    )
    return ChatRequest(
        messages=messages,
        params=params,
        n=n,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        seed=seed,
        include_stop_str=include_stop_str,
        return_token_ids=return_token_ids,
    )


def missing_api_key(name: str | None) -> str | None:
    """Why a server asked to require the key in variable `name` must not start (the variable
    is unset or empty), or None. Names the variable, never a value."""
    if name is not None and not os.environ.get(name):
        return (
            f"the environment variable {name!r} is unset or empty; refusing to serve without"
            " authentication."
        )
    return None
