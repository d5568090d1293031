"""Trajectories: the unit of data between rollouts, rewards and trainers.

A trajectory holds the whole chat as messages and, for token backends, as the exact token
ids the policy saw and sampled: `token_ids` is the final prompt of the episode plus its last
reply, `loss_mask` is 1 only on ids the policy generated itself (never system, user, tool
response or patient text, nor the chat template's framing), and `logps` are the sampled
log-probs there (0 elsewhere). Training reads these ids as they are, so there is no
re-tokenisation drift. Sub-agent episodes launched by `delegate` calls hang under their main
trajectory with the links M-GRPO needs: query id, rollout index and invocation index.

Trajectories serialise to JSON lines and back losslessly (`write_jsonl`, `read_jsonl`).
"""

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class Turn:
    """One policy turn and what followed it.

    Attributes:
      reply: the policy's text.
      num_tokens: ids generated in this turn.
      finish_reason: the backend's ("stop" or "length").
      tool: the tool called, or None.
      arguments: its arguments, or None.
      observation: the user turn that followed (tool response, patient reply, error or
        early-stop prompt), or None after the last turn.
      error: the format or tool error of this turn, or None.
      forced_final: this turn answered the early-stop prompt (budget exhausted).
      backend_s: seconds in the backend call that produced the reply (shared by the batch).
      tool_s: seconds running this turn's tool (for delegate, the sub-agents' batch).
    """

    reply: str
    num_tokens: int = 0
    finish_reason: str = "stop"
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    observation: str | None = None
    error: str | None = None
    forced_final: bool = False
    backend_s: float = 0.0
    tool_s: float = 0.0


@dataclasses.dataclass
class Trajectory:
    """One episode of one agent.

    Attributes:
      query_id: the query's id (a sub-agent's is its main trajectory's).
      rollout_index: which of the query's G rollouts (a sub-agent's is its main's).
      agent: the agent's name.
      invocation_index: for a sub-agent, which `delegate` call of its main trajectory
        launched it (0, 1, ...); None for a main trajectory.
      messages: the chat, system prompt first.
      token_ids: the ids of the whole episode (empty for text-only backends).
      loss_mask: 1 on the policy's own sampled ids, else 0; same length as `token_ids`.
      logps: the sampled log-probs where `loss_mask` is 1, else 0.
      turns: one `Turn` per policy turn.
      answer: the final answer, or None.
      finish_reason: "answer", "end_phrase", "no_answer" (the forced final turn gave none),
        "context" (no room left for a final turn) or "stopped" (the backend gave up).
      format_errors: how many turns had a format or tool error.
      tool_failures: tool calls that failed for reasons outside the policy (a remote
        sub-agent that could not be reached); not format errors.
      sub_trajectories: the sub-agent episodes launched by this one, in call order.
      metadata: the query's metadata (ground truth, ...), carried along.
    """

    query_id: str
    rollout_index: int
    agent: str
    invocation_index: int | None = None
    messages: list[dict[str, str]] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    loss_mask: list[int] = dataclasses.field(default_factory=list)
    logps: list[float] = dataclasses.field(default_factory=list)
    turns: list[Turn] = dataclasses.field(default_factory=list)
    answer: str | None = None
    finish_reason: str = ""
    format_errors: int = 0
    tool_failures: int = 0
    sub_trajectories: list["Trajectory"] = dataclasses.field(default_factory=list)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        return sum(t.num_tokens for t in self.turns)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Trajectory":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - fields
        if unknown:
            raise ValueError(f"Trajectory: unknown field(s) {sorted(unknown)}.")
        record = dict(record)
        record["turns"] = [Turn(**t) for t in record.get("turns", [])]
        record["sub_trajectories"] = [cls.from_dict(s) for s in record.get("sub_trajectories", [])]
        return cls(**record)


def write_jsonl(path: str | os.PathLike[str], trajectories: Iterable[Trajectory]) -> None:
    """Writes one JSON object per line (floats as shortest round-trip reprs: lossless)."""
    with open(path, "w", encoding="utf-8") as f:
        for traj in trajectories:
            f.write(json.dumps(traj.to_dict(), ensure_ascii=False, allow_nan=False) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[Trajectory]:
    """Reads `write_jsonl`'s output; a bad line raises naming the file and line number."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Trajectory.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise ValueError(f"read_jsonl: {os.fspath(path)}:{number}: {e}") from e
    return out


def sub_trajectories(mains: Sequence[Trajectory]) -> tuple[list[Trajectory], np.ndarray]:
    """Flattens the sub-agent episodes for M-GRPO.

    Returns:
      (subs, rollout_index): every sub-trajectory in order, and [N] int, the position in
      `mains` of the main trajectory that launched each: the input of
      `medjax.losses.align_sub_trajectories`.
    """
    subs, index = [], []
    for k, main in enumerate(mains):
        subs.extend(main.sub_trajectories)
        index.extend([k] * len(main.sub_trajectories))
    return subs, np.asarray(index, np.int32)


def training_batch(
    trajectories: Sequence[Trajectory], pad_id: int = 0, *, width: int | None = None
) -> dict[str, np.ndarray]:
    """Right-padded arrays for the trainer, from the stored ids as they are.

    Returns:
      {"input_ids", "attention_mask", "loss_mask", "old_logps"}, each [B, T] with T the
      longest trajectory, or `width` (at least that long) when given.
    """
    if any(not t.token_ids for t in trajectories):
        raise ValueError("training_batch: a trajectory has no token ids (text-only backend).")
    longest = max(len(t.token_ids) for t in trajectories)
    if width is not None and width < longest:
        raise ValueError(f"training_batch: width {width} < the longest trajectory ({longest}).")
    width = longest if width is None else width
    batch = {
        "input_ids": np.full((len(trajectories), width), pad_id, np.int32),
        "attention_mask": np.zeros((len(trajectories), width), np.int32),
        "loss_mask": np.zeros((len(trajectories), width), np.int32),
        "old_logps": np.zeros((len(trajectories), width), np.float32),
    }
    for row, t in enumerate(trajectories):
        n = len(t.token_ids)
        batch["input_ids"][row, :n] = t.token_ids
        batch["attention_mask"][row, :n] = 1
        batch["loss_mask"][row, :n] = t.loss_mask
        batch["old_logps"][row, :n] = t.logps
    return batch
