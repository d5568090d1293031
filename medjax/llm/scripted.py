"""A deterministic policy for tests and ablations: a Python function writes each reply.

`ScriptedBackend(fn, tokenizer)` is a full `TokenBackend`: it encodes chats as
`tokenizer_lib.encode_chat` does (content's special tokens as text), decodes each prompt to
text, asks `fn(prompt_text)` for the reply, tokenises it as a policy's output (a special
token's text becomes its id, as a sampler would draw it), and then behaves like a sampler that
drew exactly those tokens: it stops on the first stop string or stop sequence, on the
budget, or else appends the EOS token; log-probs are 0 (a deterministic policy gives its
reply probability 1). Agent-loop tests use it to play the policy turn by turn.
"""

from collections.abc import Callable, Sequence

from medjax.llm import stops
from medjax.llm.base import Generation, Message
from medjax.models import tokenizer as tokenizer_lib
from medjax.sampling import SamplingParams


class ScriptedBackend:
    """Replies with `fn(prompt_text)`.

    Args:
      fn: maps the rendered prompt (chat template applied, generation prompt included) to
        the reply text.
      tokenizer: a Hugging Face tokenizer with a chat template.
      eos_id: appended when the reply ends without a stop; defaults to the tokenizer's EOS.
    """

    def __init__(self, fn: Callable[[str], str], tokenizer, *, eos_id: int | None = None):
        self.fn = fn
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        self.calls = 0
        self.prompts: list[list[int]] = []  # Every prompt received, in order.

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        *,
        num_samples: int = 1,
    ) -> list[Generation]:
        prompts = [tokenizer_lib.encode_chat(self.tokenizer, m) for m in conversations]
        return self.generate_ids(prompts, params, num_samples=num_samples)

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        num_samples: int = 1,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        self.calls += 1
        seqs = params.stop_sequences + stops.stop_sequences(self.tokenizer, params.stop_strings)
        out = []
        for row, prompt in enumerate(prompts):
            self.prompts.append(list(prompt))
            budget = params.max_new_tokens
            if max_new_tokens is not None:
                budget = min(budget, max_new_tokens[row])
            text = self.fn(self.tokenizer.decode(list(prompt), skip_special_tokens=False))
            ids = [*self.tokenizer.encode(text, add_special_tokens=False), self.eos_id]
            ends = [len(ids)]
            for i in range(len(ids)):
                if ids[i] in params.eos_ids or any(
                    tuple(ids[max(0, i + 1 - len(s)) : i + 1]) == s for s in seqs
                ):
                    ends.append(i + 1)
                    break
            cut = stops.stop_string_cut(self.tokenizer, ids, params.stop_strings)
            n = min(ends + ([cut] if cut else []))
            finish = "stop"
            if n > budget:
                n, finish = budget, "length"
            ids = ids[:n]
            shown = ids[:-1] if ids and ids[-1] in (*params.eos_ids, self.eos_id) else ids
            gen = Generation(
                text=self.tokenizer.decode(shown, skip_special_tokens=False),
                token_ids=ids,
                logps=[0.0] * n,
                finish_reason=finish,
            )
            out.extend(
                Generation(gen.text, list(ids), list(gen.logps), finish) for _ in range(num_samples)
            )
        return out
