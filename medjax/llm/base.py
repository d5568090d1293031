"""The one protocol every LLM role speaks: chats in, generations out.

The doctor or researcher policy, the patient, judges, case/rubric/question writers and the
sub-agent summariser all sit behind `TextBackend`, so any role can be a local medjax model,
a remote OpenAI-compatible server, or a deterministic knowledge-grounded implementation.
"""

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from medjax.sampling import SamplingParams

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclasses.dataclass
class Generation:
    """One generated reply.

    Attributes:
      text: the reply, decoded from `token_ids` (special tokens kept, the stopping EOS
        token left out).
      token_ids: the sampled ids, the stopping token included; empty where a backend does
        not expose ids.
      logps: log-probs of `token_ids` at the sampling temperature (the old log-probs for
        training), or None where the backend does not expose them.
      finish_reason: "stop" (EOS or a stop sequence) or "length" (the token budget).
    """

    text: str
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logps: list[float] | None = None
    finish_reason: str = "stop"


@runtime_checkable
class TextBackend(Protocol):
    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        *,
        num_samples: int = 1,
    ) -> list[Generation]:
        """Replies to every conversation; `num_samples` per conversation, conversation-major
        (outputs c*G .. c*G+G-1 answer conversation c)."""
        ...
