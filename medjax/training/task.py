"""What the trainer asks of a task: its data, its agent's episodes, their rewards and its
evaluation. Two tasks implement it: `rl.ResearchTask` (MedResearcher-style questions over
the retrieval tools; M-GRPO's main agent and sub-agent) and `consultation.ConsultationTask`
(the MedDialogRubrics doctor).
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass
class TaskData:
    """What a task gives the trainer.

    Attributes:
      chats: the expert's chats, one per training record (`{"messages": [...], ...}`): SFT
        data and GRAO's reference answers.
      records: the training records (questions, cases), `records[i]` answered by `chats[i]`.
      eval_records: the held-out records.
    """

    chats: list[dict[str, Any]]
    records: list[Any]
    eval_records: list[Any]


Messages = list[dict[str, str]]


@runtime_checkable
class Task(Protocol):
    """A task the trainer runs (`medjax.train_lib.train(task=...)`).

    Attributes:
      dataset, eval_split, num_eval_questions: where the data comes from (named in errors).
      roles: the agent roles SFT can train (None: the task's own agent).
      result_keys: the evaluation's columns in results.md, each with what it measures.
      max_observation_chars: tool responses cut to this many characters (None: whole), in
        rollouts and in the tokenised chats alike.
      temperature: the rollouts' sampling temperature (log-probs are taken at it).
    """

    dataset: str
    eval_split: str
    num_eval_questions: int | None
    roles: Sequence[str | None]
    result_keys: Mapping[str, str]
    max_observation_chars: int | None
    temperature: float

    def environment(self) -> Any:
        """The read-only world the agent acts in (built or loaded once per process)."""

    def load(self, env: Any) -> TaskData:
        """The expert's chats with their records, and the held-out records."""

    def sft_chats(self, env: Any, chats: list[dict[str, Any]], role: str | None) -> list[Messages]:
        """The chats SFT trains `role` on."""

    def rollout(self, env: Any, backend: Any, records: list, *, num_generations: int,
                **hierarchy) -> list:  # fmt: skip
        """G episodes per record, record-major."""

    def score(self, env: Any, trajs: list, records: list,
              num_generations: int) -> tuple[np.ndarray, dict[str, float]]:  # fmt: skip
        """(rewards [N] float32, the step's reward statistics)."""

    def reference_reward(self, chat: dict[str, Any]) -> float:
        """The reward the expert's chat gets (GRAO's R(y))."""

    def evaluate(self, env: Any, backend: Any, records: list, **hierarchy) -> dict[str, Any]:
        """Greedy episodes on `records`: {result key: value}."""

    def expert_chats(self, env: Any, records: list) -> list[Messages]:
        """The scripted expert's chats for `records` (held-out expert NLL)."""
