"""A medjax model + tokenizer + sampler as a `TextBackend`.

All conversations of one call are tokenised with the chat template, left-padded into one
batch and sampled in a single jitted call, so a turn of the agent loop costs one sampler
call however many episodes are live. Prompt lengths are bucketed to powers of two, so a
long run compiles a bounded number of programs (`medjax.sampling.compile_count`).

Conversation continuation re-prefills the whole history each turn (the cache is not kept
between calls): simple and exact; appending to a kept cache is future work.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax import sampling
from medjax.llm.base import Generation, Message
from medjax.models.transformer import DecoderLM


class JaxPolicyBackend:
    """Generates with a local medjax model.

    Args:
      model: the policy.
      tokenizer: a Hugging Face tokenizer with a chat template (`medjax.models.tokenizer`).
      seed: seeds the PRNG; each call advances it, so calls differ and a run replays.
    """

    def __init__(self, model: DecoderLM, tokenizer, *, seed: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self._key = jax.random.key(seed)
        self.calls = 0

    def encode(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        """Token ids of each conversation's prompt, generation prompt included."""
        return [
            self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
            )
            for messages in conversations
        ]

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        params: sampling.SamplingParams,
        *,
        num_samples: int = 1,
    ) -> list[Generation]:
        if not conversations:
            return []
        prompts = self.encode(conversations)
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), params.pad_id if params.pad_id >= 0 else 0, np.int32)
        mask = np.zeros((len(prompts), width), np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        self._key, key = jax.random.split(self._key)
        out = sampling.sample(
            self.model, jnp.asarray(ids), jnp.asarray(mask), key, params,
            num_samples=num_samples, buckets=None,
        )  # fmt: skip
        self.calls += 1
        tokens, logps, lengths = (np.asarray(x) for x in (out.tokens, out.logps, out.lengths))
        results = []
        for row in range(tokens.shape[0]):
            n = int(lengths[row])
            token_ids = tokens[row, :n].tolist()
            stopped = n < params.max_new_tokens or (n > 0 and token_ids[-1] in params.eos_ids)
            shown = token_ids[:-1] if token_ids and token_ids[-1] in params.eos_ids else token_ids
            results.append(
                Generation(
                    text=self.tokenizer.decode(shown, skip_special_tokens=False),
                    token_ids=token_ids,
                    logps=logps[row, :n].tolist(),
                    finish_reason="stop" if stopped else "length",
                )
            )
        return results
