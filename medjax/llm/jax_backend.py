"""A medjax model + tokenizer + sampler as a `TokenBackend`.

All prompts of one call are left-padded into one batch and sampled in a single jitted call,
so a turn of the agent loop costs one sampler call however many episodes are live. Prompt
lengths are bucketed to powers of two, so a long run compiles a bounded number of programs
(`medjax.sampling.compile_count`). With `serving=True` (the chat server) the per-request values
that the sampler takes as static arguments are kept from multiplying programs too: the
temperature reaches the program as a traced value, and the step budget and the number of
samples are rounded up to powers of two (each row still stops at its exact budget).

A prefix that all of a call's prompts share (the system prompt with its tool list: most of
an agent's first prompt) is prefilled once and its cache broadcast to every row
(`shared_prefix_length`). The rest of the history is prefilled again each turn: the KV
cache is not kept between calls. That is exact and keeps the sampler's memory bounded by one
turn; the cost is one prefill of each episode's own history per turn.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medjax import sampling
from medjax.llm import stops
from medjax.llm.base import Generation, Message
from medjax.models import tokenizer as tokenizer_lib
from medjax.models.transformer import DecoderLM, KVCache

_MIN_STEP_BUCKET = 16
# Row counts and prompt lengths past which buckets grow 1.5x instead of 2x (`generate_ids`).
_FINE_ROWS = 8
_FINE_LENGTH = 512
# A prefix all of a call's prompts share is prefilled once when it is at least this long; its
# length is rounded down to a multiple of it (one compiled program per rounded length).
_PREFIX_QUANTUM = 64


def padded_rows(rows: int) -> int:
    """The rows a call of `rows` prompts is padded to (`row_buckets`)."""
    return sampling.ladder_length(rows, fine_from=_FINE_ROWS)


def padded_length(length: int) -> int:
    """The width prompts of at most `length` tokens are left-padded to."""
    return sampling.ladder_length(length, fine_from=_FINE_LENGTH)


def shared_prefix_length(prompts: Sequence[Sequence[int]], quantum: int = _PREFIX_QUANTUM) -> int:
    """How many leading tokens every prompt shares, rounded down to a multiple of `quantum`,
    leaving each prompt at least one token of its own (0 for fewer than two prompts)."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for other in prompts[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n // quantum * quantum


class _TemperedLM(nnx.Module):
    """`model` with its logits divided by a traced temperature, so that one sampler program
    (run at temperature 1) serves every temperature. The log-probs equal those of a program
    compiled for the temperature up to float32 rounding (a few 1e-7)."""

    def __init__(self, model: DecoderLM, temperature: float):
        self.lm = model
        self.temperature = nnx.Variable(jnp.float32(temperature))

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        return self.lm.init_cache(batch_size, max_length, dtype)

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        return self.lm.logits(hidden_BxTxD) / self.temperature[...]

    def __call__(self, input_ids: jax.Array, *, return_hidden: bool = False, **kwargs):
        out = self.lm(input_ids, return_hidden=return_hidden, **kwargs)
        if return_hidden:
            return out
        if isinstance(out, tuple):
            return out[0] / self.temperature[...], out[1]
        return out / self.temperature[...]


class JaxPolicyBackend:
    """Generates with a local medjax model.

    Args:
      model: the policy.
      tokenizer: a Hugging Face tokenizer with a chat template (`medjax.models.tokenizer`).
      seed: seeds the PRNG; each call advances it, so calls differ and a run replays.
      row_buckets: pad each call's rows to a bucket (powers of two up to 8, then 12, 16, 24,
        32, ...: bounded compiles; the padding rows cost compute). False samples exactly the
        rows given. Prompt lengths are always bucketed (powers of two up to 512, then 768,
        1024, 1536, ...).
      serving: bound the programs that arbitrary request values compile (for a server): the
        temperature is traced, the step budget is rounded up to a power of two (at least 16)
        with each row held to its exact budget, the number of samples is rounded up to a
        power of two (the extra samples are dropped), and top_k / top_p are normalised
        (ignored when greedy; a top_k of at least the vocabulary is off). Greedy replies are
        those of a non-serving backend; sampled ones come from the same distribution, but the
        PRNG stream depends on the rounded shapes.
      share_prefix: prefill the tokens that all of a call's prompts share once
        (`shared_prefix_length`) instead of once per row; the samples are the same (to
        float rounding in attention).
    """

    def __init__(
        self,
        model: DecoderLM,
        tokenizer,
        *,
        seed: int = 0,
        row_buckets: bool = True,
        serving: bool = False,
        share_prefix: bool = True,
    ):
        self.model = model
        self.row_buckets = row_buckets
        self.share_prefix = share_prefix
        self.serving = serving
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
        """Replies to chats; a reply ends at the tokenizer's end-of-turn (EOS) token, as a chat
        server's would, besides `params.eos_ids` (`generate_ids` stops only where told)."""
        params = params.ending_at(self.tokenizer.eos_token_id)
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
        if max_new_tokens is not None and len(max_new_tokens) != len(prompts):
            raise ValueError(
                f"JaxPolicyBackend.generate_ids: {len(max_new_tokens)} budgets for"
                f" {len(prompts)} prompts."
            )
        # A prefix every prompt shares (the system prompt and its tool list) is prefilled
        # once, not once per row.
        shared = shared_prefix_length(prompts) if self.share_prefix else 0
        prefix = jnp.asarray([prompts[0][:shared]], jnp.int32) if shared else None
        prompts = [p[shared:] for p in prompts]
        # Rows are padded with one-token dummy prompts of budget 1, and prompts left-padded,
        # to bucketed sizes: a run compiles one program per (row bucket, length bucket)
        # instead of one per number of live episodes and prompt length. Past 8 rows and 512
        # tokens the buckets are 1.5x apart, not 2x: every padded column of every row
        # (dummies included) costs a full prefill column, which a real model's prompts of a
        # few thousand tokens feel more than the extra compiles.
        rows = len(prompts)
        if self.row_buckets:
            rows = padded_rows(rows)
        width = padded_length(max(len(p) for p in prompts))
        pad = params.pad_id if params.pad_id >= 0 else 0
        ids = np.full((rows, width), pad, np.int32)
        mask = np.zeros((rows, width), np.int32)
        mask[len(prompts) :, -1] = 1
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        model, samples, static = self.model, num_samples, params
        steps = params.max_new_tokens
        if self.serving:
            # The values below are static in the sampler: rounded or normalised, they compile
            # a bounded set of programs whatever the requests ask for.
            steps = max(sampling.bucket_length(steps), _MIN_STEP_BUCKET)
            samples = 1 << (num_samples - 1).bit_length()
            off = params.greedy or params.top_k >= self.model.config.vocab_size
            static = dataclasses.replace(
                params,
                temperature=1.0,
                top_k=0 if off else params.top_k,
                top_p=1.0 if params.greedy else params.top_p,
            )
            model = _TemperedLM(self.model, params.temperature)
        budget_of = np.full(rows, params.max_new_tokens, np.int32)
        if max_new_tokens is not None:
            budget_of[: len(prompts)] = np.minimum(max_new_tokens, params.max_new_tokens)
        budget_of[len(prompts) :] = 1
        budget_of = np.repeat(budget_of, samples)
        # Stop strings become token-id stop sequences for the sampler (a static argument:
        # the strings themselves would only add compiled variants).
        sampler_params = dataclasses.replace(
            static,
            max_new_tokens=steps,
            stop_strings=(),
            stop_sequences=params.stop_sequences
            + stops.stop_sequences(self.tokenizer, params.stop_strings),
        )
        self._key, key = jax.random.split(self._key)
        out = sampling.sample(
            model, jnp.asarray(ids), jnp.asarray(mask), key, sampler_params,
            num_samples=samples, buckets=(), max_new_tokens=jnp.asarray(budget_of),
            prefix_ids=prefix,
        )  # fmt: skip
        self.calls += 1
        tokens, logps, lengths = (np.asarray(x) for x in (out.tokens, out.logps, out.lengths))
        results = []
        for index in range(len(prompts) * num_samples):
            # Sampled rows are prompt-major with `samples` rows per prompt.
            row = index // num_samples * samples + index % num_samples
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
