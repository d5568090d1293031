"""Tools and the papers' turn format.

A turn of the policy is `<think>...</think>` then either at most one
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` or a final `<answer>...</answer>`.
A tool is a plain Python callable with a JSON-schema description; `render_tools` writes the
descriptions into the system prompt. `parse_reply` never raises, for any text, in time linear
in its length: every way a reply can be malformed comes back as an error string, which the
loop shows the model as the tool response and counts as a format error for the reward. A
call's arguments, when given, nest at most `MAX_JSON_DEPTH` deep, hold only 64-bit integers and
finite numbers, and encode as UTF-8 (a lone surrogate such as `"\\ud800"` is refused), so they
survive the tools, the tokenizer and `write_jsonl`.
"""

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Tool arguments are flat in practice; deeper nesting is refused before `json.loads`, whose
# recursion would otherwise raise RecursionError on a reply of a few thousand brackets.
MAX_JSON_DEPTH = 32
# Integers a call may hold: 64-bit, so that no tool or array sees a Python bignum (and
# `int()` never meets Python's 4,300-digit limit on converting strings).
MAX_INT_DIGITS = 19
INT_BOUND = 2**63
# Characters of an offending value quoted in an error message.
_SHOWN_CHARS = 60
# Strings (skipped whole, closed or not) and brackets of a JSON text.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.S)
# Code points U+D800..U+DFFF: a Python string can hold them alone, UTF-8 cannot.
_SURROGATE = re.compile(r"[\ud800-\udfff]")

# JSON-schema type names and the Python values they admit (bool is not a number here).
_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


@dataclasses.dataclass(frozen=True)
class Tool:
    """A callable the policy may call by name.

    Attributes:
      name: what the policy writes in `"name"`.
      description: one or two sentences for the system prompt.
      parameters: a JSON schema of type "object" (`properties`, `required`); arguments are
        checked against it (required keys, no unknown keys, `type` of each property, `enum`).
      fn: called as `fn(**arguments)`; its result (a string, or anything JSON-serialisable)
        is the observation. None for a delegate tool, which the loop runs itself.
      delegate: for M-GRPO's `delegate(task, context)`: the sub-agent (an
        `medjax.agents.AgentSpec`) whose whole episode the call runs, or a remote
        sub-agent's client (`remote_delegate_tool`).
      summariser: optional TextBackend that condenses the sub-agent's trajectory into the
        returned summary; without it the sub-agent's own final answer is returned.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Callable[..., Any] | None = None
    delegate: Any = None
    summariser: Any = None

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


DELEGATE_PARAMETERS = {
    "type": "object",
    "properties": {
        "task": {"type": "string", "description": "What the sub-agent must find out."},
        "context": {"type": "string", "description": "What it needs to know to do so."},
    },
    "required": ["task"],
}


def delegate_tool(sub_agent, *, summariser=None, name: str = "delegate") -> Tool:
    """M-GRPO's delegation tool: runs a whole `sub_agent` episode per call."""
    return Tool(
        name=name,
        description=(
            "Hand a sub-task to a research sub-agent with its own tools; it returns a summary"
            " of what it found."
        ),
        parameters=DELEGATE_PARAMETERS,
        delegate=sub_agent,
        summariser=summariser,
    )


@dataclasses.dataclass(frozen=True)
class Delegation:
    """One `delegate` call as a remote sub-agent receives it."""

    query_id: str
    rollout_index: int
    invocation_index: int
    task: str
    context: str = ""

    @property
    def prompt(self) -> str:
        """The sub-agent's query: the task, and the context when there is one."""
        return f"{self.task}\n\nContext: {self.context}" if self.context else self.task


@dataclasses.dataclass(frozen=True)
class DelegateResult:
    """A remote sub-agent's answer to one `Delegation`.

    Attributes:
      summary: what the main agent reads (None: the sub-agent gave no answer).
      trajectory: the sub-trajectory as the main side records it (for a remote sub-agent a
        stub: its id and policy version in `metadata`, its outcome, no tokens).
      error: why the call failed (then summary and trajectory are None).
    """

    summary: str | None = None
    trajectory: Any = None
    error: str | None = None


def remote_delegate_tool(client, *, name: str = "delegate") -> Tool:
    """`delegate` served by another process: `client(list[Delegation])` returns one
    `DelegateResult` per call, in order (decoupled M-GRPO's main trainer)."""
    return dataclasses.replace(delegate_tool(None, name=name), delegate=client)


TRUNCATION_MARK = "\n[... truncated]"


def truncate_text(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters, marked where cut."""
    if len(text) <= max_chars:
        return text
    keep = max(max_chars - len(TRUNCATION_MARK), 0)
    return text[:keep] + TRUNCATION_MARK


def truncate_output(tool: Tool, max_chars: int) -> Tool:
    """The tool with its observations cut to `max_chars` (small-context policies)."""
    if tool.fn is None:
        raise ValueError(f"truncate_output: {tool.name!r} is a delegate tool; cut its summary.")
    fn = tool.fn

    def cut(**arguments):
        out = fn(**arguments)
        text = out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)
        return truncate_text(text, max_chars)

    return dataclasses.replace(tool, fn=cut)


def render_tools(tools: Sequence[Tool]) -> str:
    """The system-prompt section that lists the tools and the call format."""
    if not tools:
        return ""
    lines = "\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one of these tools per turn:\n<tools>\n"
        f"{lines}\n</tools>\n\n"
        'Think inside <think></think>, then either call a tool as <tool_call>{"name": <name>,'
        ' "arguments": <arguments as a JSON object>}</tool_call> or give your final answer as'
        " <answer>...</answer>. Tool outputs come back inside <tool_response></tool_response>."
    )


@dataclasses.dataclass(frozen=True)
class ParsedReply:
    """What a reply asks for.

    Attributes:
      think: the reasoning inside `<think>`, or None.
      answer: the final answer inside `<answer>`, or None.
      tool: the name of the tool called, or None.
      arguments: the call's arguments (validated), or None.
      error: why the reply is malformed, or None: the observation shown to the model.
    """

    think: str | None = None
    answer: str | None = None
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    error: str | None = None


def validate_arguments(schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> str | None:
    """Why `arguments` do not fit the object `schema`, or None where they do."""
    properties = schema.get("properties", {})
    missing = [k for k in schema.get("required", ()) if k not in arguments]
    if missing:
        return f"missing required argument(s) {', '.join(map(repr, missing))}"
    if schema.get("additionalProperties", False) is False:
        unknown = [k for k in arguments if k not in properties]
        if unknown:
            return (
                f"unknown argument(s) {', '.join(map(_shown, unknown))}; expected"
                f" {', '.join(map(repr, properties)) or 'none'}"
            )
    for key, value in arguments.items():
        prop = properties.get(key, {})
        kind = prop.get("type")
        if kind is not None:
            kinds = [kind] if isinstance(kind, str) else list(kind)
            if not any(_JSON_TYPES.get(k, lambda v: True)(value) for k in kinds):
                return f"argument {key!r} must be of type {'/'.join(kinds)}, got {_shown(value)}"
        if "enum" in prop and value not in prop["enum"]:
            return f"argument {key!r} must be one of {prop['enum']}, got {_shown(value)}"
    return None


def _shown(value: Any) -> str:
    """`value`'s repr on one line, cut to `_SHOWN_CHARS` (repr escapes newlines and
    surrogates, so the message stays one line of encodable text)."""
    return _cut(repr(value))


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 3]}..."


def encodable(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD, so that it encodes as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def _tagged(text: str, open_tag: str, close_tag: str, *, first: bool = False) -> list[str]:
    """The texts between `open_tag` and the next `close_tag`, left to right, not overlapping
    (what `re.findall(open(.*?)close, re.S)` returns), in time linear in `len(text)`: the
    lazy regex rescans the rest of the text from every unclosed opening tag."""
    found, pos = [], 0
    while (start := text.find(open_tag, pos)) != -1:
        start += len(open_tag)
        end = text.find(close_tag, start)
        if end == -1:  # No later opening tag can be closed either.
            break
        found.append(text[start:end])
        if first:
            break
        pos = end + len(close_tag)
    return found


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether the brackets of the JSON `text` nest deeper than `limit` (strings skipped)."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return True
        elif token in "]}":
            depth -= 1
    return False


class _NumberError(ValueError):
    """A JSON number a tool call may not hold; the message says which and why."""


def _parse_int(digits: str) -> int:
    # Checked on the digits, before `int()`: a 4,301-digit string makes `int()` raise.
    if len(digits.lstrip("-")) > MAX_INT_DIGITS or not -INT_BOUND <= int(digits) < INT_BOUND:
        raise _NumberError(f"integer {_cut(digits)} ({len(digits)} characters) is not 64-bit")
    return int(digits)


def _parse_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _NumberError(f"number {_cut(literal)} is not finite")
    return value


def _parse_constant(name: str) -> float:
    # Python's json reads NaN and Infinity; strict JSON (and `write_jsonl`) does not.
    raise _NumberError(f"{name} is not a JSON number")


def parse_reply(text: str, tools: Sequence[Tool] = ()) -> ParsedReply:
    """Reads a policy reply in the papers' format; malformed replies get an `error`.

    A reply with neither a tool call nor an answer is returned with all fields None but
    `think`: whether that is an error depends on the agent (a dialogue doctor's question is
    fine), so the loop decides.
    """
    # Free text is made encodable rather than refused: it is read, never executed (unlike a
    # call's arguments), and a text backend's reply may hold a lone surrogate.
    thinks = _tagged(text, "<think>", "</think>", first=True)
    think = encodable(thinks[0].strip()) if thinks else None
    calls = _tagged(text, "<tool_call>", "</tool_call>")
    answers = _tagged(text, "<answer>", "</answer>", first=True)
    unclosed = text.count("<tool_call>") > len(calls)
    if len(calls) > 1:
        return ParsedReply(think, error=f"{len(calls)} tool calls in one turn; call one at a time.")
    if calls and answers:
        return ParsedReply(think, error="Give either a tool call or a final answer, not both.")
    if answers:
        return ParsedReply(think, answer=encodable(answers[0].strip()))
    if unclosed:
        return ParsedReply(think, error="<tool_call> is not closed with </tool_call>.")
    if not calls:
        return ParsedReply(think)
    if _json_depth_exceeds(calls[0], MAX_JSON_DEPTH):
        return ParsedReply(
            think, error=f"The tool call nests brackets deeper than {MAX_JSON_DEPTH} levels."
        )
    try:
        call = json.loads(
            calls[0],
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except _NumberError as e:
        return ParsedReply(think, error=f"The tool call holds a number it may not: {e}.")
    except json.JSONDecodeError as e:
        return ParsedReply(think, error=f"The tool call is not valid JSON: {e.msg} at {e.pos}.")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ParsedReply(
            think, error='The tool call must be a JSON object {"name": ..., "arguments": {...}}.'
        )
    try:
        # Only a lone surrogate (from a "\\ud800" escape) fails here: the arguments would
        # reach the tools, the tokenizer and `write_jsonl` as text no encoder accepts.
        json.dumps(call, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return ParsedReply(
            think,
            error="The tool call holds a lone surrogate escape (\\ud800-\\udfff), which is not"
            " text; write the character itself.",
        )
    name, arguments = call["name"], call.get("arguments", {})
    by_name = {t.name: t for t in tools}
    if name not in by_name:
        known = ", ".join(by_name) or "none"
        return ParsedReply(
            think, tool=name, error=f"Unknown tool {_shown(name)}; available: {known}."
        )
    if not isinstance(arguments, dict):
        return ParsedReply(think, tool=name, error=f"{name}: `arguments` must be a JSON object.")
    problem = validate_arguments(by_name[name].parameters, arguments)
    if problem:
        return ParsedReply(think, tool=name, arguments=arguments, error=f"{name}: {problem}.")
    return ParsedReply(think, tool=name, arguments=arguments)


def run_tool(tool: Tool, arguments: Mapping[str, Any]) -> tuple[str, str | None]:
    """Calls `tool`; returns (observation, error). A raising tool gives an error observation.

    Both are UTF-8-encodable (`encodable`): a tool echoing odd input must not crash the
    tokenizer that reads its output.
    """
    try:
        result = tool.fn(**arguments)
    except Exception as e:  # Any tool failure is an observation for the model, not a crash.
        message = encodable(f"{tool.name} failed: {type(e).__name__}: {e}")
        return message, message
    if isinstance(result, str):
        return encodable(result), None
    try:
        return encodable(json.dumps(result, ensure_ascii=False)), None
    except (TypeError, ValueError) as e:
        message = encodable(f"{tool.name} returned a value that is not JSON-serialisable: {e}")
        return message, message
