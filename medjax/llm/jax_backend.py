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
(`shared_prefix_length`).

The KV cache is kept between calls (`keep_cache`, on unless `serving`): each prompt of a call
continues the row of the previous call's cache that shares its longest token prefix (an
agent's next turn is its last prompt, its reply and the tokens appended since), so a turn
prefills only the tokens added since the episode's last call (`sampling.sample_continuing`).
Rows no prompt continues (finished episodes) are dropped, and each row is packed to its own
tokens, so the cache holds the live episodes' tokens plus one turn's chunk and budget. The
samples are those of a prefill of the whole prompts (to float rounding in attention); the
cache is dropped when the model's weights change (a new array in any parameter) or by
`clear_cache()`.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medjax import multihost, sampling
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
# How many calls' caches are kept (`JaxPolicyBackend._kept_calls`).
_KEPT_CALLS = 2


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


def _left_padded(chunks, rows: int, width: int, pad: int):
    """[rows, width] ids and mask of `chunks` left-padded, then one-token dummy rows."""
    ids = np.full((rows, width), pad, np.int32)
    mask = np.zeros((rows, width), np.int32)
    mask[len(chunks) :, -1] = 1
    for row, chunk in enumerate(chunks):
        ids[row, width - len(chunk) :] = chunk
        mask[row, width - len(chunk) :] = 1
    return ids, mask


def _weights(model) -> list:
    return jax.tree.leaves(nnx.state(model))


@dataclasses.dataclass
class _CachedRows:
    """The KV cache of a call's rows and, on the host, the tokens each row holds.

    Attributes:
      cache: the sampler's KVCache after the call ([R] rows).
      tokens: [R, T] int32, row r's tokens (its prompt, then its sampled tokens) in
        position order, -1 after them and on padding rows (which match nothing).
      weights: the model's parameter arrays the cache was computed with.
    """

    cache: KVCache
    tokens: np.ndarray
    weights: list

    @classmethod
    def of(cls, cache, prompts, sampled, sampled_lengths, samples, model) -> "_CachedRows":
        held = [
            list(prompts[row // samples]) + sampled[row, : sampled_lengths[row]].tolist()
            for row in range(len(prompts) * samples)
        ]
        tokens = np.full((sampled.shape[0], max(map(len, held))), -1, np.int32)
        for row, ids in enumerate(held):
            tokens[row, : len(ids)] = ids
        return cls(cache, tokens, _weights(model))

    def longest_prefixes(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """For each prompt, the row sharing its longest token prefix and that prefix's
        length, at most the prompt's length - 1 (its last token must be fed to the model)."""
        source = np.zeros(len(prompts), np.int32)
        keep = np.zeros(len(prompts), np.int32)
        width = self.tokens.shape[1]
        for i, prompt in enumerate(prompts):
            n = min(len(prompt) - 1, width)
            if n <= 0:
                continue
            same = self.tokens[:, :n] == np.asarray(prompt[:n], np.int32)[None]
            shared = np.where(same.all(axis=1), n, same.argmin(axis=1))
            source[i] = int(shared.argmax())
            keep[i] = int(shared[source[i]])
        return source, keep


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
      seed: seeds the PRNG; each call advances it, so calls differ and a run replays. With
        `streams` (one int per prompt, `generate_ids`) a row draws instead from the key
        fold_in(fold_in(key(seed), stream), sample): its tokens depend on its stream, not
        on the other rows of the call (the agent loop names each episode's turn), so
        episodes split over processes sample what one process would.
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
      keep_cache: keep the KV cache of each call's rows for the next call's prompts that
        continue them (default: on unless `serving`); memory: the caches of the last two
        calls whose rows differ (a main agent's and its sub-agents').
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
        keep_cache: bool | None = None,
    ):
        self.model = model
        self.row_buckets = row_buckets
        self.share_prefix = share_prefix
        self.serving = serving
        self.keep_cache = not serving if keep_cache is None else keep_cache
        self.tokenizer = tokenizer
        self._key = self._seed_key = jax.random.key(seed)
        self.calls = 0
        # Tokens prefilled and reused over all calls (progress lines, benchmarks).
        self.stats = dict(prefilled_tokens=0, reused_tokens=0)
        # The caches of the last calls whose rows differ (most recent first): two, so that a
        # main agent and its sub-agents on one backend each continue their own rows.
        self._kept_calls: list[_CachedRows] = []

    def clear_cache(self) -> None:
        """Drops the KV cache kept from the last call (its memory is freed)."""
        self._kept_calls = []

    def _kept(self, prompts) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(which kept cache, source rows, kept lengths) for the prompts: the kept cache
        whose rows hold the most of them; None when no prompt continues a row. The caches
        are dropped if the weights changed since they were filled."""
        if not self._kept_calls:
            return None
        now, then = _weights(self.model), self._kept_calls[0].weights
        if len(now) != len(then) or any(a is not b for a, b in zip(now, then, strict=True)):
            self._kept_calls = []
            return None
        best = None
        for i, rows in enumerate(self._kept_calls):
            source, keep = rows.longest_prefixes(prompts)
            if keep.sum() > 0 and (best is None or keep.sum() > best[2].sum()):
                best = (i, source, keep)
        return best

    def encode(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        """Token ids of each conversation's prompt, generation prompt included, with the
        messages' content encoded as text (`tokenizer_lib.encode_chat`)."""
        return [tokenizer_lib.encode_chat(self.tokenizer, m) for m in conversations]

    # The agent loop passes `streams=` (`generate_ids`) to backends that say so.
    takes_streams = True

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        params: sampling.SamplingParams,
        *,
        num_samples: int = 1,
        streams: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Replies to chats; a reply ends at the tokenizer's end-of-turn (EOS) token, as a chat
        server's would, besides `params.eos_ids` (`generate_ids` stops only where told)."""
        params = params.ending_at(self.tokenizer.eos_token_id)
        return self.generate_ids(
            self.encode(conversations), params, num_samples=num_samples, streams=streams
        )

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        params: sampling.SamplingParams,
        *,
        num_samples: int = 1,
        max_new_tokens: Sequence[int] | None = None,
        streams: Sequence[int] | None = None,
    ) -> list[Generation]:
        """`TokenBackend.generate_ids`; `streams`: one int (0 .. 2**32 - 1) per prompt whose
        rows then draw from keys of their own (see the class)."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("JaxPolicyBackend.generate_ids: a prompt is empty.")
        if max_new_tokens is not None and len(max_new_tokens) != len(prompts):
            raise ValueError(
                f"JaxPolicyBackend.generate_ids: {len(max_new_tokens)} budgets for"
                f" {len(prompts)} prompts."
            )
        if streams is not None and len(streams) != len(prompts):
            raise ValueError(
                f"JaxPolicyBackend.generate_ids: {len(streams)} streams for {len(prompts)} prompts."
            )
        rows = padded_rows(len(prompts)) if self.row_buckets else len(prompts)
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
        if streams is not None:
            padded = np.zeros(rows, np.uint32)
            padded[: len(prompts)] = streams
            key = jax.vmap(jax.random.fold_in, (None, 0))(self._seed_key, jnp.asarray(padded))
        pad = params.pad_id if params.pad_id >= 0 else 0
        kept = self._kept(prompts) if self.keep_cache else None
        if kept is not None:
            which, source, keep = kept
            continued = self._kept_calls.pop(which).cache
            # Only what each prompt adds to its cached row is prefilled: left-padded chunks.
            chunks = [p[k:] for p, k in zip(prompts, keep, strict=True)]
            width = padded_length(max(len(c) for c in chunks))
            ids, mask = _left_padded(chunks, rows, width, pad)
            source = np.pad(source, (0, rows - len(prompts)))
            keep = np.pad(keep, (0, rows - len(prompts)))
            need = int(keep.max()) + width + steps
            slots = max(padded_length(need), continued.positions.shape[1])
            out, cache = sampling.sample_continuing(
                model, continued, source, keep, ids, mask, key, sampler_params,
                slots=slots, num_samples=samples, max_new_tokens=jnp.asarray(budget_of),
            )  # fmt: skip
            self.stats["reused_tokens"] += int(keep.sum())
            self.stats["prefilled_tokens"] += sum(len(c) for c in chunks)
        else:
            # A prefix every prompt shares (the system prompt and its tool list) is
            # prefilled once, not once per row.
            shared = shared_prefix_length(prompts) if self.share_prefix else 0
            prefix = jnp.asarray([prompts[0][:shared]], jnp.int32) if shared else None
            # Rows are padded with one-token dummy prompts of budget 1, and prompts
            # left-padded, to bucketed sizes: a run compiles one program per (row bucket,
            # length bucket) instead of one per number of live episodes and prompt length.
            # Past 8 rows and 512 tokens the buckets are 1.5x apart, not 2x: every padded
            # column of every row (dummies included) costs a full prefill column, which a
            # real model's prompts of a few thousand tokens feel more than the extra
            # compiles.
            chunks = [p[shared:] for p in prompts]
            width = padded_length(max(len(c) for c in chunks))
            ids, mask = _left_padded(chunks, rows, width, pad)
            out = sampling.sample(
                model, jnp.asarray(ids), jnp.asarray(mask), key, sampler_params,
                num_samples=samples, buckets=(), max_new_tokens=jnp.asarray(budget_of),
                prefix_ids=prefix, return_cache=self.keep_cache,
            )  # fmt: skip
            if self.keep_cache:
                out, cache = out
            self.stats["prefilled_tokens"] += shared + sum(len(c) for c in chunks)
        self.calls += 1
        # Rows may span hosts: every process reads them all (the same calls on every one).
        outputs = (out.tokens, out.logps, out.lengths)
        tokens, logps, lengths = (multihost.host_array(x) for x in outputs)
        if self.keep_cache:
            rows = _CachedRows.of(cache, prompts, tokens, lengths, samples, self.model)
            self._kept_calls = [rows, *self._kept_calls][:_KEPT_CALLS]
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
