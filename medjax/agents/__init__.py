"""The host-side agent loop: multi-turn episodes with tools and a main/sub-agent hierarchy."""

from medjax.agents.loop import (
    EARLY_STOP_PROMPT,
    AgentSpec,
    Query,
    TemplateDriftError,
    run_episodes,
    system_prompt,
)
from medjax.agents.tools import (
    DelegateResult,
    Delegation,
    ParsedReply,
    Tool,
    delegate_tool,
    parse_reply,
    remote_delegate_tool,
    render_tools,
    run_tool,
    validate_arguments,
)
from medjax.agents.trajectory import (
    Trajectory,
    Turn,
    read_jsonl,
    sub_trajectories,
    training_batch,
    write_jsonl,
)

__all__ = [
    "EARLY_STOP_PROMPT",
    "AgentSpec",
    "DelegateResult",
    "Delegation",
    "ParsedReply",
    "Query",
    "TemplateDriftError",
    "Tool",
    "Trajectory",
    "Turn",
    "delegate_tool",
    "parse_reply",
    "read_jsonl",
    "remote_delegate_tool",
    "render_tools",
    "run_episodes",
    "run_tool",
    "sub_trajectories",
    "system_prompt",
    "training_batch",
    "validate_arguments",
    "write_jsonl",
]
