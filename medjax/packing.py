"""The packed-group layout of grouped scoring: one prompt and its G completions in one row.

Row p holds prompt p's real tokens, then its completions back to back at their real lengths,
then padding, so all padding sits at the end of the row (whole padding blocks are skipped by
`medjax.kernels.prefix_attention`). Row length L = prompt_capacity + G * completion_capacity.
Segment ids mark the prompt (0), completion g (g + 1) and padding (-1); positions restart
after the prompt for every completion, so each completion sees the RoPE positions it would
have as a separate sequence. The index maps:

* `source_index` [P, L]: where each packed token comes from in the flat source
  [prompt_ids (prompt_capacity) | completion_ids of c1, c2, ... (completion_capacity each)];
  -1 on padding. `pack_tokens` applies it.
* `completion_index` [P, G, C]: row position of completion token t of completion g.
* `predict_index` [P, G, C]: row position whose output (logits) predicts completion token t
  of completion g: the previous token, i.e. the LAST PROMPT token for t = 0 and the
  completion's own token t - 1 for t > 0. `gather_packed` applies it.
* `completion_mask` [P, G, C]: t < completion length; both index maps hold 0 where it is
  False (a safe index for a gather whose result is then masked).

Everything here is jnp and jit-able; lengths may be traced.

Dimension letters: P prompts, G completions per prompt, C completion capacity, L row length.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PackedGroups(NamedTuple):
    """Layout of P packed rows [prompt | c1 | ... | cG | padding]; see the module docstring.

    Attributes:
      segment_ids: [P, L] int32: 0 prompt, g + 1 completion g (0-based g), -1 padding.
      positions: [P, L] int32 RoPE positions: p for prompt token p, prompt_len + t for
        completion token t of every completion; -1 on padding.
      source_index: [P, L] int32 index into [prompt_ids | completion_ids flattened over
        (G, C)] of each packed token; -1 on padding.
      completion_index: [P, G, C] int32 row position of completion token t; 0 if masked.
      predict_index: [P, G, C] int32 row position whose output predicts completion token t:
        prompt_len - 1 for t = 0, completion_index - 1 for t > 0; 0 if masked.
      completion_mask: [P, G, C] bool, t < completion length.
    """

    segment_ids: jax.Array
    positions: jax.Array
    source_index: jax.Array
    completion_index: jax.Array
    predict_index: jax.Array
    completion_mask: jax.Array


def _concrete(x: jax.Array) -> bool:
    return not isinstance(x, jax.core.Tracer)


def pack_groups(
    prompt_lens: jax.Array,
    completion_lens: jax.Array,
    *,
    prompt_capacity: int,
    completion_capacity: int,
    row_length: int | None = None,
) -> PackedGroups:
    """Packs each prompt with its G completions into one row; jit-able (lengths may be traced).

    Row p is prompt p's real tokens, then completions 1..G back to back at their real
    lengths, then padding: L = prompt_capacity + G * completion_capacity, or `row_length`.

    Args:
      prompt_lens: [P] int, 1 <= prompt_lens <= prompt_capacity (the last prompt token
        predicts each completion's first token, so a prompt cannot be empty).
      completion_lens: [P, G] int, 0 <= completion_lens <= completion_capacity.
      prompt_capacity: width of the right-padded prompt_ids array, [P, prompt_capacity].
      completion_capacity: C, width of the right-padded completion_ids array, [P, G, C].
      row_length: L, when rows need less than the capacities' sum (a prompt and its
        completions rarely all reach their capacities): every row's prompt_len + sum of its
        completion_lens must fit, which is checked for concrete lengths (traced ones past
        it lose their last tokens).

    Returns:
      A `PackedGroups` of int32 arrays (bool mask).

    Raises:
      ValueError: on ranks that do not match, or (for concrete inputs) lengths out of range.
    """
    prompt_lens = jnp.asarray(prompt_lens, jnp.int32)
    completion_lens = jnp.asarray(completion_lens, jnp.int32)
    if prompt_lens.ndim != 1 or completion_lens.ndim != 2:
        raise ValueError(
            "pack_groups: expected prompt_lens [P] and completion_lens [P, G]; got shapes"
            f" {prompt_lens.shape} and {completion_lens.shape}."
        )
    if completion_lens.shape[0] != prompt_lens.shape[0]:
        raise ValueError(
            f"pack_groups: prompt_lens has shape {prompt_lens.shape} but completion_lens has"
            f" shape {completion_lens.shape}; P must match."
        )
    if _concrete(prompt_lens) and (
        np.any(prompt_lens < 1) or np.any(prompt_lens > prompt_capacity)
    ):
        raise ValueError(
            f"pack_groups: prompt_lens {np.asarray(prompt_lens).tolist()} must lie in"
            f" [1, prompt_capacity={prompt_capacity}]."
        )
    if _concrete(completion_lens) and (
        np.any(completion_lens < 0) or np.any(completion_lens > completion_capacity)
    ):
        raise ValueError(
            f"pack_groups: completion_lens {np.asarray(completion_lens).tolist()} must lie"
            f" in [0, completion_capacity={completion_capacity}]."
        )
    num_prompts, group = completion_lens.shape
    cap = completion_capacity
    length = prompt_capacity + group * cap if row_length is None else row_length
    if row_length is not None and _concrete(prompt_lens) and _concrete(completion_lens):
        need = np.asarray(prompt_lens) + np.asarray(completion_lens).sum(axis=1)
        if np.any(need > length):
            raise ValueError(
                f"pack_groups: rows need {need.tolist()} tokens; row_length is {length}."
            )
    # Row position of each completion's first token.
    starts = prompt_lens[:, None] + jnp.cumsum(completion_lens, axis=1) - completion_lens
    t = jnp.arange(cap, dtype=jnp.int32)
    mask = t < completion_lens[..., None]
    completion_index = jnp.where(mask, starts[..., None] + t, 0)
    previous = jnp.where(t == 0, prompt_lens[:, None, None] - 1, completion_index - 1)
    predict_index = jnp.where(mask, previous, 0)

    col = jnp.arange(length, dtype=jnp.int32)
    in_prompt = col < prompt_lens[:, None]
    rows = jnp.arange(num_prompts)[:, None, None]
    g = jnp.arange(group, dtype=jnp.int32)[None, :, None]
    # Masked completion slots scatter out of range and are dropped.
    cols = jnp.where(mask, completion_index, length)
    segment_ids = jnp.where(in_prompt, 0, -1).at[rows, cols].set(g + 1, mode="drop")
    positions = (
        jnp.where(in_prompt, col, -1)
        .at[rows, cols]
        .set(prompt_lens[:, None, None] + t, mode="drop")
    )
    source_index = (
        jnp.where(in_prompt, col, -1).at[rows, cols].set(prompt_capacity + g * cap + t, mode="drop")
    )
    return PackedGroups(
        segment_ids=segment_ids.astype(jnp.int32),
        positions=positions.astype(jnp.int32),
        source_index=source_index.astype(jnp.int32),
        completion_index=completion_index.astype(jnp.int32),
        predict_index=predict_index.astype(jnp.int32),
        completion_mask=mask,
    )


def pack_tokens(
    prompt_ids: jax.Array,
    completion_ids: jax.Array,
    source_index: jax.Array,
    *,
    pad_id: int = 0,
) -> jax.Array:
    """Builds packed token rows from right-padded prompts and completions.

    Args:
      prompt_ids: [P, prompt_capacity] int tokens, real tokens first.
      completion_ids: [P, G, C] int tokens, real tokens first.
      source_index: [P, L] from `pack_groups`.
      pad_id: token placed on padding.

    Returns:
      [P, L] tokens in prompt_ids' dtype.
    """
    prompt_ids, completion_ids, source_index = map(
        jnp.asarray, (prompt_ids, completion_ids, source_index)
    )
    if prompt_ids.ndim != 2 or completion_ids.ndim != 3 or source_index.ndim != 2:
        raise ValueError(
            "pack_tokens: expected prompt_ids [P, Pc], completion_ids [P, G, C] and"
            f" source_index [P, L]; got shapes {prompt_ids.shape}, {completion_ids.shape} and"
            f" {source_index.shape}."
        )
    flat = jnp.concatenate(
        [prompt_ids, completion_ids.reshape(completion_ids.shape[0], -1).astype(prompt_ids.dtype)],
        axis=1,
    )
    tokens = jnp.take_along_axis(flat, jnp.maximum(source_index, 0), axis=1)
    return jnp.where(source_index >= 0, tokens, jnp.asarray(pad_id, prompt_ids.dtype))


def gather_packed(values: jax.Array, index: jax.Array) -> jax.Array:
    """Gathers per-token values of packed rows into per-completion layout.

    Args:
      values: [P, L, ...] per-position values (hidden states, logits, log-probs).
      index: [P, G, C] row positions, e.g. `predict_index` (outputs that predict each
        completion token) or `completion_index` (the completion tokens themselves).

    Returns:
      [P, G, C, ...] values; entries where `completion_mask` is False are values[:, 0] and
      must be masked by the caller.
    """
    values, index = jnp.asarray(values), jnp.asarray(index)
    if values.ndim < 2 or index.ndim != 3 or index.shape[0] != values.shape[0]:
        raise ValueError(
            f"gather_packed: expected values [P, L, ...] and index [P, G, C]; got shapes"
            f" {values.shape} and {index.shape}."
        )
    p, g, c = index.shape
    flat = index.reshape(p, g * c).reshape((p, g * c, *(1,) * (values.ndim - 2)))
    out = jnp.take_along_axis(values, flat, axis=1)
    return out.reshape((p, g, c, *values.shape[2:]))
