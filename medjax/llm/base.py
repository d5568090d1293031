"""The one protocol every LLM role speaks: chats in, generations out.

The doctor or researcher policy, the patient, judges, case/rubric/question writers and the
sub-agent summariser all sit behind `TextBackend`, so any role can be a local medjax model,
a remote OpenAI-compatible server, or a deterministic knowledge-grounded implementation.

A backend that also owns a tokenizer and takes prompts as token ids is a `TokenBackend`:
the agent loop then keeps every trajectory as the exact ids that were sampled (no
re-tokenisation drift), which is what training needs.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from medjax.sampling import SamplingParams

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclasses.dataclass
class Generation:
    """One generated reply.

    Attributes:
      text: the reply, decoded from `token_ids` (special tokens kept, a stopping EOS token
        left out, a matched stop string kept so that parsers see `</tool_call>`).
      token_ids: the sampled ids, the stopping token included; empty where a backend does
        not expose ids.
      logps: log-probs of `token_ids` at the sampling temperature (the old log-probs for
        training), or None where the backend does not expose them.
      finish_reason: "stop" (EOS, a stop sequence or a stop string) or "length" (the budget).
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


@runtime_checkable
class TokenBackend(TextBackend, Protocol):
    """A TextBackend that also continues token-id prompts with its own `tokenizer`."""

    tokenizer: Any

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        num_samples: int = 1,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Continues every prompt (token ids, chat template already applied).

        `max_new_tokens` optionally gives one budget per prompt (each at most
        `params.max_new_tokens`). Outputs are prompt-major as in `generate`.
        """
        ...
