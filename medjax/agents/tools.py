"""Tools and the papers' turn format.

A turn of the policy is `<think>...</think>` then either at most one
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` or a final `<answer>...</answer>`.
A tool is a plain Python callable with a JSON-schema description; `render_tools` writes the
descriptions into the system prompt. `parse_reply` never raises: every way a reply can be
malformed comes back as an error string, which the loop shows the model as the tool
response and counts as a format error for the reward.
"""

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_THINK = re.compile(r"<think>(.*?)</think>", re.S)

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
                f"unknown argument(s) {', '.join(map(repr, unknown))}; expected"
                f" {', '.join(map(repr, properties)) or 'none'}"
            )
    for key, value in arguments.items():
        prop = properties.get(key, {})
        kind = prop.get("type")
        if kind is not None:
            kinds = [kind] if isinstance(kind, str) else list(kind)
            if not any(_JSON_TYPES.get(k, lambda v: True)(value) for k in kinds):
                return f"argument {key!r} must be of type {'/'.join(kinds)}, got {value!r}"
        if "enum" in prop and value not in prop["enum"]:
            return f"argument {key!r} must be one of {prop['enum']}, got {value!r}"
    return None


def parse_reply(text: str, tools: Sequence[Tool] = ()) -> ParsedReply:
    """Reads a policy reply in the papers' format; malformed replies get an `error`.

    A reply with neither a tool call nor an answer is returned with all fields None but
    `think`: whether that is an error depends on the agent (a dialogue doctor's question is
    fine), so the loop decides.
    """
    think_match = _THINK.search(text)
    think = think_match.group(1).strip() if think_match else None
    calls = _TOOL_CALL.findall(text)
    answer_match = _ANSWER.search(text)
    unclosed = text.count("<tool_call>") > len(calls)
    if len(calls) > 1:
        return ParsedReply(think, error=f"{len(calls)} tool calls in one turn; call one at a time.")
    if calls and answer_match:
        return ParsedReply(think, error="Give either a tool call or a final answer, not both.")
    if answer_match:
        return ParsedReply(think, answer=answer_match.group(1).strip())
    if unclosed:
        return ParsedReply(think, error="<tool_call> is not closed with </tool_call>.")
    if not calls:
        return ParsedReply(think)
    try:
        call = json.loads(calls[0])
    except json.JSONDecodeError as e:
        return ParsedReply(think, error=f"The tool call is not valid JSON: {e.msg} at {e.pos}.")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ParsedReply(
            think, error='The tool call must be a JSON object {"name": ..., "arguments": {...}}.'
        )
    name, arguments = call["name"], call.get("arguments", {})
    by_name = {t.name: t for t in tools}
    if name not in by_name:
        known = ", ".join(by_name) or "none"
        return ParsedReply(think, tool=name, error=f"Unknown tool {name!r}; available: {known}.")
    if not isinstance(arguments, dict):
        return ParsedReply(think, tool=name, error=f"{name}: `arguments` must be a JSON object.")
    problem = validate_arguments(by_name[name].parameters, arguments)
    if problem:
        return ParsedReply(think, tool=name, arguments=arguments, error=f"{name}: {problem}.")
    return ParsedReply(think, tool=name, arguments=arguments)


def run_tool(tool: Tool, arguments: Mapping[str, Any]) -> tuple[str, str | None]:
    """Calls `tool`; returns (observation, error). A raising tool gives an error observation."""
    try:
        result = tool.fn(**arguments)
    except Exception as e:  # Any tool failure is an observation for the model, not a crash.
        message = f"{tool.name} failed: {type(e).__name__}: {e}"
        return message, message
    if isinstance(result, str):
        return result, None
    try:
        return json.dumps(result, ensure_ascii=False), None
    except (TypeError, ValueError) as e:
        message = f"{tool.name} returned a value that is not JSON-serialisable: {e}"
        return message, message
