"""Batched generation with a preallocated KV cache, on the same graph the trainer uses.

Each prompt is prefilled once and its cache broadcast to its G samples (a prefix that all
prompts share, `prefix_ids`, once for all of them); then one jitted
`lax.while_loop` decodes a token per step for every row until each row has stopped (EOS,
a stop sequence, or its budget) or the step budget ends. The log-probs returned are those of
the tempered, untruncated distribution, log softmax(z / T)[token]: what the trainer's
scoring computes at the same temperature, i.e. the old log-probs of GRPO.

Rows are prompt-major: rows p*G .. p*G+G-1 are prompt p's G samples.

Dimension letters: P prompts, G samples per prompt, B = P * G rows, Tp prompt length,
N new tokens, V vocab.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from medjax import partitioning
from medjax.models.transformer import DecoderLM, KVCache


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each token.

    Attributes:
      max_new_tokens: N, the step budget.
      temperature: logits are divided by it (> 0); the returned log-probs use it too.
      top_k: keep the k most likely tokens (0: off).
      top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1: off).
      greedy: argmax instead of sampling (log-probs still at `temperature`).
      eos_ids: token ids that end a row (the token itself is kept and scored).
      stop_sequences: token-id sequences that end a row once generated (e.g. the ids of
        "End Inquiry"); single special tokens such as `</tool_call>` can go in `eos_ids`.
      stop_strings: text that ends a reply, matched on the decoded text by the text backends
        (`medjax.llm`), which cut the reply after the token that completes it; the sampler
        itself only sees `stop_sequences` (the backends add the usual tokenisations).
      pad_id: written after a row has stopped.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()
    pad_id: int = 0

    def ending_at(self, eos_id: int | None) -> "SamplingParams":
        """These params with `eos_id` (a tokenizer's end-of-turn token) among `eos_ids`;
        unchanged when it is None or already there."""
        if eos_id is None or eos_id in self.eos_ids:
            return self
        return dataclasses.replace(self, eos_ids=(*self.eos_ids, eos_id))


class SampleOutput(NamedTuple):
    """Generated tokens.

    Attributes:
      tokens: [B, N] int32 sampled ids, `pad_id` after a row stopped.
      logps: [B, N] float32 log p(token) at the sampling temperature; 0 where masked.
      mask: [B, N] bool, True on generated tokens (the stopping token included).
      lengths: [B] int32 number of generated tokens.
    """

    tokens: jax.Array
    logps: jax.Array
    mask: jax.Array
    lengths: jax.Array


def filter_logits(logits_BxV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets the logits of tokens outside the top-k / top-p set to -inf.

    Top-k keeps every token at least as likely as the k-th (ties with it included); then
    top-p keeps, of what is left and renormalised, the most likely tokens until their mass
    reaches top_p, the token that crosses it included, so at least one token always
    survives; of tied tokens it takes the lower ids first (a stable sort). The order (top-k,
    then top-p) and top-k's ties are those of transformers' warpers. `top_k` 0 and `top_p`
    1 are off.
    """
    if top_k:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        order = jnp.argsort(-logits_BxV, axis=-1)
        sorted_logits = jnp.take_along_axis(logits_BxV, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Mass strictly before each token: a token is kept while that is below top_p, so
        # the most likely token always survives.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(order.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits_BxV = jnp.where(keep, logits_BxV, -jnp.inf)
    return logits_BxV


def draw(key: jax.Array, logits_BxV: jax.Array) -> jax.Array:
    """One token per row from softmax(logits) by inverting the CDF with one uniform per row
    (`key`: one key, or [B] keys, one per row).

    The same distribution as `jax.random.categorical` (Gumbel-max), which draws V uniforms
    per row: on a CPU those random bits cost more than the model's whole decode step for a
    32k vocabulary. Tokens with probability 0 (filtered to -inf) are never drawn.
    """
    probs = jax.nn.softmax(logits_BxV, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    if key.ndim:
        u = jax.vmap(jax.random.uniform)(key)[:, None] * cdf[:, -1:]
    else:
        u = jax.random.uniform(key, (logits_BxV.shape[0], 1)) * cdf[:, -1:]
    token = jnp.sum(cdf <= u, axis=-1)  # The first index whose CDF exceeds u.
    # Rounding can put u at the total mass: fall back to the last token with mass.
    last = logits_BxV.shape[-1] - 1 - jnp.argmax((probs > 0)[:, ::-1], axis=-1)
    return jnp.minimum(token, last)


def _broadcast_cache(cache: KVCache, g: int) -> KVCache:
    rep = lambda x, axis: jnp.repeat(x, g, axis=axis)  # noqa: E731
    return KVCache(
        k=rep(cache.k, 1), v=rep(cache.v, 1), positions=rep(cache.positions, 0),
        index=cache.index, lengths=rep(cache.lengths, 0),
    )  # fmt: skip


def _rows_on_mesh(cache: KVCache) -> KVCache:
    """The cache's rows over the batch's mesh axes (under `partitioning.activations_on`)."""

    return KVCache(
        k=partitioning.constrain_batch(cache.k, axis=1),
        v=partitioning.constrain_batch(cache.v, axis=1),
        positions=partitioning.constrain_batch(cache.positions), index=cache.index,
        lengths=partitioning.constrain_batch(cache.lengths),
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "num_samples", "mesh"))
def _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    key,
    row_budget,
    params: SamplingParams,
    num_samples,
    prefix_ids=None,
    mesh=None,
):
    """On `mesh` (the parameters'), each device samples only its rows: the prompts, the KV
    cache and the tokens are pinned to the batch's mesh axes, as the model pins its
    residual stream (left to itself the compiler has every device sample every row)."""
    with partitioning.activations_on(mesh):
        return _generate_rows(
            graphdef, state, prompt_ids, prompt_mask, key, row_budget, params, num_samples,
            prefix_ids,
        )  # fmt: skip


def _generate_rows(
    graphdef, state, prompt_ids, prompt_mask, key, row_budget, params, num_samples, prefix_ids
):
    model = nnx.merge(graphdef, state)
    prompt_ids = partitioning.constrain_batch(prompt_ids)
    prompt_mask = partitioning.constrain_batch(prompt_mask)
    p, tp = prompt_ids.shape
    n = params.max_new_tokens
    if prefix_ids is None:
        cache = model.init_cache(p, tp + n)
    else:
        # The prefix every prompt shares, prefilled once and broadcast: the prompts' own
        # tokens then continue from it (positions from the cache's lengths).
        cache = model.init_cache(1, prefix_ids.shape[1] + tp + n)
        _, cache = model(prefix_ids, cache=cache, return_hidden=True, cache_is_empty=True)
        cache = _broadcast_cache(cache, p)
    # Only the last column's logits are needed (left-padded prompts all end there): the LM
    # head on every prompt position would be a third of the prefill's work.
    cache = _rows_on_mesh(cache)
    hidden, cache = model(
        prompt_ids, attention_mask=prompt_mask, cache=cache, return_hidden=True,
        cache_is_empty=prefix_ids is None,
    )  # fmt: skip
    return _decode(model, hidden, cache, key, row_budget, params, num_samples)


def _kept_rows(cache: KVCache, source_rows, keep, slots: int) -> KVCache:
    """A cache of `slots` slots whose row r holds the first keep[r] tokens of the given
    cache's row source_rows[r], in slots 0 .. keep[r] - 1 (the rest empty).

    A row's real tokens sit in its slots in position order, with empty slots (position -1)
    between the chunks of earlier calls: sorting the slots by position (those to drop last)
    packs the kept ones to the front, so the cache never holds more than each row's own
    tokens plus one call's chunk and budget."""
    positions = cache.positions[source_rows]
    kept = (positions >= 0) & (positions < keep[:, None])
    order = jnp.argsort(jnp.where(kept, positions, jnp.iinfo(jnp.int32).max), axis=1)
    extra = slots - positions.shape[1]
    take = order[None, :, None, :, None]

    def move(x):
        x = jnp.take_along_axis(x[:, source_rows], take, axis=3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0)))

    slot = jnp.arange(slots, dtype=jnp.int32)[None]
    return KVCache(
        k=move(cache.k), v=move(cache.v),
        positions=jnp.where(slot < keep[:, None], slot, -1),
        index=jnp.max(keep).astype(jnp.int32), lengths=keep.astype(jnp.int32),
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "num_samples", "slots", "mesh"))
def _continue(
    graphdef, state, cache, source_rows, keep, chunk_ids, chunk_mask, key, row_budget,
    params: SamplingParams, num_samples, slots, mesh=None,
):  # fmt: skip
    """`_generate` for prompts that continue rows of an earlier call's cache."""
    with partitioning.activations_on(mesh):
        model = nnx.merge(graphdef, state)
        cache = _rows_on_mesh(_kept_rows(cache, source_rows, keep, slots))
        hidden, cache = model(
            partitioning.constrain_batch(chunk_ids),
            attention_mask=partitioning.constrain_batch(chunk_mask),
            cache=cache,
            return_hidden=True,
        )
        return _decode(model, hidden, cache, key, row_budget, params, num_samples)


def _decode(model, hidden, cache, key, row_budget, params, num_samples):
    """Samples from the prompts' last hidden states [P, T, D] and their cache: G rows per
    prompt, a token per step until each row has stopped. Returns the tokens, log-probs and
    lengths of every row and the cache with the sampled tokens in it."""
    n = params.max_new_tokens
    b = hidden.shape[0] * num_samples
    cache = _rows_on_mesh(_broadcast_cache(cache, num_samples))
    last = jnp.repeat(model.logits(hidden[:, -1:])[:, 0], num_samples, axis=0)
    last = partitioning.constrain_batch(last)
    stops = [jnp.asarray(s, jnp.int32) for s in params.stop_sequences]
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # A raw uint32 key: the same bits, typed.
    if key.ndim:
        # One key per prompt: sample g of prompt p draws step i from fold_in(key[p], g) and
        # i, whatever other rows share the call.
        per_sample = jax.vmap(jax.random.fold_in, (None, 0))
        key = jax.vmap(per_sample, (0, None))(key, jnp.arange(num_samples)).reshape(b)
        key = partitioning.constrain_batch(key)

    def step(carry):
        i, key, last, cache, done, lengths, tokens, logps = carry
        if key.ndim:
            sub = jax.vmap(jax.random.fold_in, (0, None))(key, i)
        else:
            key, sub = jax.random.split(key)
        tempered = last / params.temperature
        logp_all = jax.nn.log_softmax(tempered, axis=-1)
        if params.greedy:
            token = jnp.argmax(tempered, axis=-1)
        else:
            filtered = filter_logits(tempered, top_k=params.top_k, top_p=params.top_p)
            token = draw(sub, filtered)
        token = token.astype(jnp.int32)
        logp = jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]
        live = ~done
        token = jnp.where(live, token, params.pad_id)
        tokens = tokens.at[:, i].set(token)
        logps = logps.at[:, i].set(jnp.where(live, logp, 0.0))
        lengths = lengths + live
        stopped = (
            jnp.isin(token, jnp.asarray(params.eos_ids, jnp.int32)) if params.eos_ids else False
        )
        for seq in stops:
            k = seq.shape[0]
            # -1 before the first generated token: nothing there can match a stop sequence.
            history = jnp.pad(tokens, ((0, 0), (k, 0)), constant_values=-1)
            window = jax.lax.dynamic_slice_in_dim(history, i + 1, k, axis=1)
            stopped = stopped | jnp.all(window == seq[None], axis=-1)
        done = done | (live & stopped) | (lengths >= row_budget)
        logits, cache = model(token[:, None], attention_mask=live[:, None], cache=cache)
        return i + 1, key, logits[:, -1], _rows_on_mesh(cache), done, lengths, tokens, logps

    def cond(carry):
        i, _, _, _, done, *_ = carry
        return (i < n) & ~jnp.all(done)

    rows = partitioning.constrain_batch
    init = (
        jnp.int32(0), key, last, cache, rows(jnp.zeros((b,), bool)),
        rows(jnp.zeros((b,), jnp.int32)), rows(jnp.full((b, n), params.pad_id, jnp.int32)),
        rows(jnp.zeros((b, n), jnp.float32)),
    )  # fmt: skip
    _, _, _, cache, _, lengths, tokens, logps = jax.lax.while_loop(cond, step, init)
    return tokens, logps, lengths, cache


def bucket_length(length: int, buckets: tuple[int, ...] | None = None) -> int:
    """The smallest bucket >= length: the next power of two, or from a configured list."""
    if buckets is None:
        return 1 << max(length - 1, 0).bit_length()
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(f"bucket_length: {length} exceeds the largest bucket {max(buckets)}.")
    return fitting[0]


def ladder_length(length: int, fine_from: int = 1) -> int:
    """The smallest padded size >= length: a power of two up to `fine_from`, then the
    smallest of 2^k and 3 * 2^(k-1) (..., 512, 768, 1024, 1536, 2048, ...).

    Above `fine_from` at most a third of a padded row is padding (a power of two can waste
    half of it) for about twice the compiled programs: worth it where the work, not the
    compilation, dominates (long prompts, many rows)."""
    power = 1 << max(length - 1, 0).bit_length()
    three_quarters = 3 * power // 4
    return three_quarters if power > fine_from and three_quarters >= length else power


def pad_prompts(prompt_ids, prompt_mask, length: int, pad_id: int = 0):
    """Left-pads [P, Tp] prompts to [P, length] (positions come from the mask, so padding
    changes no number, only the compiled shape)."""
    extra = length - prompt_ids.shape[1]
    if extra < 0:
        raise ValueError(f"pad_prompts: prompts of length {prompt_ids.shape[1]} exceed {length}.")
    pad = ((0, 0), (extra, 0))
    return jnp.pad(prompt_ids, pad, constant_values=pad_id), jnp.pad(prompt_mask, pad)


def compile_count() -> int:
    """How many generation programs have been compiled in this process (one per distinct
    prompt shape, G and SamplingParams): bucket prompt lengths to keep it bounded."""
    return _generate._cache_size() + _continue._cache_size()


def sample(
    model: DecoderLM,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    params: SamplingParams,
    *,
    num_samples: int = 1,
    buckets: tuple[int, ...] | None = (),
    max_new_tokens: jax.Array | None = None,
    prefix_ids: jax.Array | None = None,
    return_cache: bool = False,
) -> SampleOutput | tuple[SampleOutput, KVCache]:
    """Generates `num_samples` continuations of every prompt.

    Args:
      model: the policy.
      prompt_ids: [P, Tp] int, left-padded (every prompt ends in the last column).
      prompt_mask: [P, Tp] 1 on real prompt tokens.
      key: a jax.random key; the same key gives the same samples. Or [P] keys, one per
        prompt: each row's draws then depend only on its prompt's key and sample index, not
        on which other prompts share the call (episodes split over processes or batched
        differently sample the same tokens).
      params: SamplingParams (static: each distinct value compiles once).
      num_samples: G.
      buckets: prompt lengths are left-padded up to a bucket so that a long run compiles a
        bounded number of programs: () keeps Tp as it is, None rounds up to a power of two,
        a tuple lists the allowed lengths (see `compile_count`).
      max_new_tokens: optional [P * G] int per-row budgets (each at most
        `params.max_new_tokens`, which stays the static step count).
      prefix_ids: optional [1, Tx] tokens that come before every prompt (a shared system
        prompt): prefilled once instead of once per row, with the same result as prompts
        that begin with them. Each distinct Tx compiles its own program.
      return_cache: also return the [P * G]-row KVCache with the prompts and the sampled
        tokens in it, for `sample_continuing`.

    Returns:
      SampleOutput with [P * G, N] arrays, prompt-major rows (and the cache).
    """
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"sample: `prompt_ids` {tuple(prompt_ids.shape)} and `prompt_mask`"
            f" {tuple(prompt_mask.shape)} must both be [P, Tp]."
        )
    if params.temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0, got {params.temperature}.")
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    if buckets != ():
        target = bucket_length(prompt_ids.shape[1], buckets)
        prompt_ids, prompt_mask = pad_prompts(prompt_ids, prompt_mask, target, params.pad_id)
    row_budget = _row_budget(max_new_tokens, prompt_ids.shape[0] * num_samples, params, "sample")
    if prefix_ids is not None:
        prefix_ids = jnp.asarray(prefix_ids, jnp.int32)
        if prefix_ids.ndim != 2 or prefix_ids.shape[0] != 1 or prefix_ids.shape[1] == 0:
            raise ValueError(
                f"sample: `prefix_ids` has shape {tuple(prefix_ids.shape)}; expected [1, Tx > 0]."
            )
    graphdef, state = nnx.split(model)
    tokens, logps, lengths, cache = _generate(
        graphdef, state, prompt_ids, prompt_mask, key, row_budget, params, num_samples,
        prefix_ids, partitioning.mesh_of(state),
    )  # fmt: skip
    out = _output(tokens, logps, lengths)
    return (out, cache) if return_cache else out


def _output(tokens, logps, lengths) -> SampleOutput:
    # A row holds its tokens up to and including the one that stopped it.
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return SampleOutput(tokens, logps, mask, lengths)


def _row_budget(max_new_tokens, rows: int, params: SamplingParams, fn: str) -> jax.Array:
    if max_new_tokens is None:
        return jnp.full((rows,), params.max_new_tokens, jnp.int32)
    row_budget = jnp.asarray(max_new_tokens, jnp.int32)
    if row_budget.shape != (rows,):
        raise ValueError(
            f"{fn}: `max_new_tokens` has shape {tuple(row_budget.shape)}; expected"
            f" [P * G] = ({rows},)."
        )
    return row_budget


def sample_continuing(
    model: DecoderLM,
    cache: KVCache,
    source_rows,
    keep,
    chunk_ids: jax.Array,
    chunk_mask: jax.Array,
    key: jax.Array,
    params: SamplingParams,
    *,
    slots: int,
    num_samples: int = 1,
    max_new_tokens: jax.Array | None = None,
) -> tuple[SampleOutput, KVCache]:
    """`sample` for prompts that continue the rows of an earlier call's cache (returned with
    `return_cache=True`, or by this function): prompt p is the first keep[p] tokens of that
    cache's row source_rows[p] followed by its own chunk, so only the chunk is prefilled.

    The samples are those of `sample` on the whole prompts with the same key (the cached
    keys and values are the ones a prefill of those tokens computes, to float rounding).

    Args:
      model: the policy whose cache `cache` is (the same weights).
      cache: a KVCache of R rows.
      source_rows: [P] int, the cache row each prompt continues (rows may repeat).
      keep: [P] int, how many of that row's leading tokens the prompt keeps (at most the
        row's length; 0 keeps none).
      chunk_ids, chunk_mask: [P, W] the rest of each prompt, left-padded (at least one real
        token a row: its logits start the sampling).
      key, params, num_samples, max_new_tokens: as in `sample`.
      slots: S of the returned cache, static: at least max(keep) + W + params.max_new_tokens
        (one compiled program per value).

    Returns:
      (SampleOutput with [P * G, N] arrays, the [P * G]-row cache with the prompts and the
      sampled tokens in it).
    """
    chunk_ids, chunk_mask = jnp.asarray(chunk_ids, jnp.int32), jnp.asarray(chunk_mask)
    source_rows = jnp.asarray(source_rows, jnp.int32)
    keep = jnp.asarray(keep, jnp.int32)
    p, w = chunk_ids.shape
    if chunk_mask.shape != (p, w) or source_rows.shape != (p,) or keep.shape != (p,):
        raise ValueError(
            f"sample_continuing: `chunk_ids` {tuple(chunk_ids.shape)}, `chunk_mask`"
            f" {tuple(chunk_mask.shape)}, `source_rows` {tuple(source_rows.shape)} and `keep`"
            f" {tuple(keep.shape)} must be [P, W], [P, W], [P] and [P]."
        )
    need = int(jnp.max(keep)) + w + params.max_new_tokens
    if slots < max(need, cache.positions.shape[1]):
        raise ValueError(
            f"sample_continuing: slots={slots} cannot hold max(keep) + W + max_new_tokens ="
            f" {need} tokens nor the cache's {cache.positions.shape[1]} slots."
        )
    if params.temperature <= 0:
        raise ValueError(f"sample_continuing: temperature must be > 0, got {params.temperature}.")
    row_budget = _row_budget(max_new_tokens, p * num_samples, params, "sample_continuing")
    graphdef, state = nnx.split(model)
    tokens, logps, lengths, cache = _continue(
        graphdef, state, cache, source_rows, keep, chunk_ids, chunk_mask, key, row_budget,
        params, num_samples, slots, partitioning.mesh_of(state),
    )  # fmt: skip
    return _output(tokens, logps, lengths), cache
