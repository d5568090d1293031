"""A medjax model + tokenizer + sampler as a `TokenBackend`.

All prompts of one call are left-padded into one batch and sampled in a single jitted call,
so a turn of the agent loop costs one sampler call however many episodes are live. Prompt
lengths are bucketed to powers of two, so a long run compiles a bounded number of programs
(`medjax.sampling.compile_count`).

Conversation continuation re-prefills the whole history each turn: the KV cache is not kept
between calls. That is exact and keeps the sampler's memory bounded by one turn; the cost is
one prefill of the history per turn, which for agent turns (tool responses of a few hundred
tokens, replies of similar length) is a small share of a turn's decode steps.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax import sampling
from medjax.llm import stops
from medjax.llm.base import Generation, Message
from medjax.models import tokenizer as tokenizer_lib
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
            tokenizer_lib.apply_chat_template(self.tokenizer, m, tokenize=True)
            for m in conversations
        ]

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        params: sampling.SamplingParams,
        *,
        num_samples: int = 1,
    ) -> list[Generation]:
        return self.generate_ids(self.encode(conversations), params, num_samples=num_samples)

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        params: sampling.SamplingParams,
        *,
        num_samples: int = 1,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("JaxPolicyBackend.generate_ids: a prompt is empty.")
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), params.pad_id if params.pad_id >= 0 else 0, np.int32)
        mask = np.zeros((len(prompts), width), np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        budgets = None
        if max_new_tokens is not None:
            if len(max_new_tokens) != len(prompts):
                raise ValueError(
                    f"JaxPolicyBackend.generate_ids: {len(max_new_tokens)} budgets for"
                    f" {len(prompts)} prompts."
                )
            budgets = np.repeat(np.minimum(max_new_tokens, params.max_new_tokens), num_samples)
        # Stop strings become token-id stop sequences for the sampler (a static argument:
        # the strings themselves would only add compiled variants).
        sampler_params = dataclasses.replace(
            params,
            stop_strings=(),
            stop_sequences=params.stop_sequences
            + stops.stop_sequences(self.tokenizer, params.stop_strings),
        )
        self._key, key = jax.random.split(self._key)
        out = sampling.sample(
            self.model, jnp.asarray(ids), jnp.asarray(mask), key, sampler_params,
            num_samples=num_samples, buckets=None,
            max_new_tokens=None if budgets is None else jnp.asarray(budgets),
        )  # fmt: skip
        self.calls += 1
        tokens, logps, lengths = (np.asarray(x) for x in (out.tokens, out.logps, out.lengths))
        budget_of = np.full(tokens.shape[0], params.max_new_tokens) if budgets is None else budgets
        results = []
        for row in range(tokens.shape[0]):
            n = int(lengths[row])
            token_ids = tokens[row, :n].tolist()
            cut = stops.stop_string_cut(self.tokenizer, token_ids, params.stop_strings)
            if cut is not None:
                token_ids, n = token_ids[:cut], cut
            ended_on_eos = bool(token_ids) and token_ids[-1] in params.eos_ids
            ended_on_sequence = any(
                tuple(token_ids[-len(s) :]) == s for s in sampler_params.stop_sequences
            )
            stopped = cut is not None or ended_on_eos or ended_on_sequence or n < budget_of[row]
            shown = token_ids[:-1] if ended_on_eos else token_ids
            results.append(
                Generation(
                    text=self.tokenizer.decode(shown, skip_special_tokens=False),
                    token_ids=token_ids,
                    logps=logps[row, :n].tolist(),
                    finish_reason="stop" if stopped else "length",
                )
            )
        return results
