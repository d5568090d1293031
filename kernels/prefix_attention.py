"""Grouped (shared-prefix) attention for GRPO scoring: one prompt, G completions, one row.

Prefix Grouper's layout (Liu et al., arXiv:2506.05433): a prompt and its G completions are
packed once into a single row [prompt | c1 | ... | cG | padding], so the prompt's tokens go
through the trunk once instead of G times. Completion g must then attend causally to the
prompt and to itself only; that rule is carried by per-token segment ids:

* segment 0: prompt tokens; segment g in 1..G: tokens of completion g; -1: padding.
* key j is visible from query i (indices in the packed row) iff seg[i] >= 0, seg[j] >= 0,
  j <= i and (seg[j] == 0 or seg[j] == seg[i]).

A row of segment 0 only is plain causal attention. Because the prompt comes first, every
completion query sees all real prompt tokens, and the attention output of each row of
[prompt | completion g] equals causal attention over the separate sequence prompt + c_g,
provided the caller restarts positions after the prompt for every completion (RoPE is
applied by the caller; `medjax.packing.pack_groups` returns those positions).

`medjax.packing` builds that layout (segment ids, positions that restart after the prompt,
and the index maps back to per-completion order) for a batch of prompts.

Attention implementations (`grouped_attention(impl=...)`):

* "reference": plain jnp with an explicit [B, L, L] mask; autodiff.
* "xla": the same math per query chunk against the keys up to the chunk's end (static
  shapes, the causal half of the work); autodiff.
* "pallas": a flash-attention kernel (online softmax over key blocks) that skips every
  (query block, key block) pair which cannot hold a visible pair: key block after the query
  block (causal), all-padding blocks, and key blocks whose segment range misses the query
  block's and that hold no prompt token (the other completions). Backward is a custom VJP
  with two Pallas kernels (dq over key blocks; dk, dv over query blocks) that recompute the
  probabilities from the saved per-row logsumexp and skip the same pairs.
  `count_visited_blocks` evaluates the very predicate the kernels use.
* "auto": "xla" on every backend for now: the Pallas kernels have been checked in interpret
  mode only, never lowered for a GPU or TPU.

The kernels are written against Pallas' generic (Triton-style) lowering and are tested in
interpret mode only. GQA is handled by packing the G = H // N query heads that share a kv head
into the query rows of one program ([block_q * G, K] tiles), so K and V are read once per
group. TPU would want the group on a leading axis and scalar-prefetched block bounds.

Dimension letters: B batch, L packed length, H query heads, N kv heads, K head dim, G
completions per prompt (also, inside the kernels, query heads per kv head).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

IMPLS = ("auto", "reference", "xla", "pallas")

# Finite, like the model's mask value: a fully masked row must not produce inf - inf = NaN.
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_NO_SEGMENT = np.iinfo(np.int32).max


# ------------------------------------------------------------------------------------------
# Visibility: the element rule and the block predicate shared by the kernels and helpers.


def _visible(seg_q, seg_k, idx_q, idx_k):
    """Element visibility; broadcasts, so it serves [L, L] masks and kernel tiles alike."""
    return (seg_q >= 0) & (seg_k >= 0) & (idx_k <= idx_q) & ((seg_k == 0) | (seg_k == seg_q))


def _segment_bounds(seg):
    """(lowest real segment, highest segment) over the last axis; (MAX, -1) if all padding."""
    lo = jnp.min(jnp.where(seg >= 0, seg, _NO_SEGMENT), axis=-1)
    return lo, jnp.max(seg, axis=-1)


def _block_visible(q_lo, q_hi, q_last, k_lo, k_hi, k_first):
    """Whether a (query block, key block) pair may hold a visible pair.

    Conservative (never skips a visible pair): a key block holding a prompt token (k_lo == 0)
    is kept for any non-padding query block; otherwise the segment ranges must overlap.
    """
    causal = k_first <= q_last
    real = (q_hi >= 0) & (k_hi >= 0)
    shared = (k_lo == 0) | ((k_lo <= q_hi) & (q_lo <= k_hi))
    return causal & real & shared


def grouped_mask(segment_ids: jax.Array) -> jax.Array:
    """The explicit visibility mask of packed rows.

    Args:
      segment_ids: [..., L] int array: 0 prompt, g >= 1 completion g, -1 padding.

    Returns:
      [..., L, L] bool, [..., i, j] True iff key j is visible from query i.
    """
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.ndim < 1:
        raise ValueError(f"grouped_mask: `segment_ids` must have rank >= 1, got shape {()}.")
    idx = jnp.arange(segment_ids.shape[-1])
    return _visible(
        segment_ids[..., :, None], segment_ids[..., None, :], idx[:, None], idx[None, :]
    )


def _resolve_blocks(length: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """(block_q, block_k, padded length): tiles capped at the next power of two >= L."""
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block < 1 or block & (block - 1):
            raise ValueError(f"grouped_attention: `{name}` must be a power of two, got {block}.")
    cap = pl.next_power_of_2(length)
    block_q, block_k = min(block_q, cap), min(block_k, cap)
    # Both are powers of two, so the larger one is a multiple of the smaller.
    tile = max(block_q, block_k)
    return block_q, block_k, -(-length // tile) * tile


def _pad_segments(segment_ids: jax.Array, padded_length: int) -> jax.Array:
    pad = padded_length - segment_ids.shape[-1]
    return jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"))
def visited_blocks(segment_ids: jax.Array, *, block_q: int = 128, block_k: int = 128) -> jax.Array:
    """Which (query block, key block) pairs the Pallas kernels compute; the rest are skipped.

    Uses the kernels' own predicate, block sizes and padding rule.

    Args:
      segment_ids: [B, L] int array of packed rows.
      block_q: query tile, as passed to `grouped_attention`.
      block_k: key tile, as passed to `grouped_attention`.

    Returns:
      [B, nq, nk] bool, nq and nk the numbers of query and key blocks of the padded row.
    """
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.ndim != 2:
        raise ValueError(
            f"visited_blocks: `segment_ids` must have rank 2, got shape {segment_ids.shape}."
        )
    batch, length = segment_ids.shape
    block_q, block_k, padded = _resolve_blocks(length, block_q, block_k)
    seg = _pad_segments(segment_ids, padded)
    q_lo, q_hi = _segment_bounds(seg.reshape(batch, -1, block_q))
    k_lo, k_hi = _segment_bounds(seg.reshape(batch, -1, block_k))
    q_last = jnp.arange(padded // block_q) * block_q + block_q - 1
    k_first = jnp.arange(padded // block_k) * block_k
    return _block_visible(
        q_lo[:, :, None],
        q_hi[:, :, None],
        q_last[None, :, None],
        k_lo[:, None, :],
        k_hi[:, None, :],
        k_first[None, None, :],
    )


def count_visited_blocks(
    segment_ids: jax.Array, *, block_q: int = 128, block_k: int = 128
) -> jax.Array:
    """Number of (query block, key block) pairs computed per row and per kv head.

    Args:
      segment_ids: [B, L] int array of packed rows.
      block_q: query tile.
      block_k: key tile.

    Returns:
      [B] int32, the sum of `visited_blocks` over both block axes.
    """
    visited = visited_blocks(segment_ids, block_q=block_q, block_k=block_k)
    return visited.sum(axis=(1, 2), dtype=jnp.int32)


# ------------------------------------------------------------------------------------------
# Reference.


def _check_inputs(fn, q, k, v, segment_ids):
    for name, x, rank in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("segment_ids", segment_ids, 2)):
        if x.ndim != rank:
            raise ValueError(f"{fn}: `{name}` must have rank {rank}, got shape {x.shape}.")
    b, length, h, kd = q.shape
    shapes = f"q {q.shape}, k {k.shape}, v {v.shape}, segment_ids {segment_ids.shape}"
    if (
        k.shape != v.shape
        or k.shape[:2] != (b, length)
        or segment_ids.shape != (b, length)
        or k.shape[3] != kd
    ):
        raise ValueError(
            f"{fn}: expected q [B, L, H, K], k and v [B, L, N, K], segment_ids [B, L]; got"
            f" {shapes}."
        )
    if h % k.shape[2]:
        raise ValueError(f"{fn}: query heads H must be a multiple of kv heads N; got {shapes}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{fn}: q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}."
        )


def reference_grouped_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Grouped attention with an explicit [B, L, L] mask; the oracle of the other paths.

    Args:
      q: [B, L, H, K] queries (RoPE already applied with the packed positions).
      k: [B, L, N, K] keys, H a multiple of N; query head h reads kv head h // (H // N).
      v: [B, L, N, K] values.
      segment_ids: [B, L] int: 0 prompt, g >= 1 completion g, -1 padding.
      scale: score scale; defaults to K ** -0.5.

    Returns:
      [B, L, H, K] in q's dtype (softmax in float32). Rows that see no key (padding) are 0
      and pass no gradient.
    """
    q, k, v, segment_ids = map(jnp.asarray, (q, k, v, segment_ids))
    _check_inputs("reference_grouped_attention", q, k, v, segment_ids)
    return masked_attention(q, k, v, grouped_mask(segment_ids), scale)


def masked_attention(q, k, v, mask, scale=None):
    """GQA attention of q [B, Tq, H, K] over k, v [B, Tk, N, K] under a [B, Tq, Tk] bool
    mask; softmax in float32, rows with no visible key give 0. The model's plain and cached
    attention use it too, so every path shares one piece of attention math."""
    b, tq, h, kd = q.shape
    n = k.shape[2]
    scale = kd**-0.5 if scale is None else scale
    mask = mask[:, None, None]  # [B, 1, 1, Tq, Tk] over (n, g).
    q_BxTxNxGxK = q.reshape(b, tq, n, h // n, kd)
    scores = jnp.einsum("btngk,bsnk->bngts", q_BxTxNxGxK, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * scale, _MASKED)
    # A row with no visible key would otherwise average every value uniformly.
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum(
        "bngts,bsnk->btngk", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.reshape(b, tq, h, kd).astype(q.dtype)


def _causal_chunked_attention(q, k, v, segment_ids, scale, chunk):
    """The XLA path: query chunk i attends to keys [0, end of chunk i) only, which skips the
    causally empty upper half of the score matrix with static shapes (about half the
    FLOPs and memory of the explicit [L, L] mask); same numbers as the reference."""
    length = q.shape[1]
    idx = jnp.arange(length)
    outs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        mask = _visible(
            segment_ids[:, start:end, None],
            segment_ids[:, None, :end],
            idx[start:end, None],
            idx[None, :end],
        )
        outs.append(masked_attention(q[:, start:end], k[:, :end], v[:, :end], mask, scale))
    return jnp.concatenate(outs, axis=1)


# ------------------------------------------------------------------------------------------
# Pallas kernels. Query tiles hold the G heads of one kv head as rows: row r = t * G + g.


def _dot_t(a, b):
    """a @ b.T with a float32 result."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """a.T @ b with a float32 result."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _query_rows(seg_ref, q_start, block_q, group):
    """Segment ids and row indices of the block_q * group rows of a query tile."""
    seg_q = seg_ref[pl.ds(q_start, block_q)]
    seg_rows = jnp.broadcast_to(seg_q[:, None], (block_q, group)).reshape(-1)
    idx = q_start + lax.broadcasted_iota(jnp.int32, (block_q, group), 0)
    return seg_q, seg_rows, idx.reshape(-1)


def _tile_scores(q, k, seg_rows, idx_rows, seg_k, k_start, scale):
    """Scaled, masked [rows, block_k] scores and the mask."""
    idx_k = k_start + lax.broadcasted_iota(jnp.int32, (1, seg_k.shape[0]), 1)
    mask = _visible(seg_rows[:, None], seg_k[None, :], idx_rows[:, None], idx_k)
    return jnp.where(mask, _dot_t(q, k) * scale, _MASKED), mask


def _forward_kernel(seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_k):
    block_q, group, head_dim = q_ref.shape
    rows = block_q * group
    q_start = pl.program_id(2) * block_q
    seg_q, seg_rows, idx_rows = _query_rows(seg_ref, q_start, block_q, group)
    q_lo, q_hi = _segment_bounds(seg_q)
    q = q_ref[...].reshape(rows, head_dim)

    def visit(k_start, carry):
        acc, m, denom = carry
        seg_k = seg_ref[pl.ds(k_start, block_k)]
        s, mask = _tile_scores(
            q, k_ref[pl.ds(k_start, block_k), :], seg_rows, idx_rows, seg_k, k_start, scale
        )
        m_new = jnp.maximum(m, s.max(axis=-1))
        # Masked entries are zeroed, not exp(_MASKED - m): a row with nothing visible yet
        # has m == _MASKED and would count them as weight 1.
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[pl.ds(k_start, block_k), :]
        acc = alpha[:, None] * acc + lax.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return acc, m_new, alpha * denom + p.sum(axis=-1)

    def body(j, carry):
        k_start = j * block_k
        k_lo, k_hi = _segment_bounds(seg_ref[pl.ds(k_start, block_k)])
        keep = _block_visible(q_lo, q_hi, q_start + block_q - 1, k_lo, k_hi, k_start)
        return lax.cond(keep, functools.partial(visit, k_start), lambda c: c, carry)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), _MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    # Causal bound: no key block starting after the query block's last row.
    num_k = lax.div(q_start + block_q + block_k - 1, block_k)
    acc, m, denom = lax.fori_loop(0, num_k, body, init)
    # denom >= 1 for any row with a visible key (its maximum contributes exp(0)).
    seen = denom > 0
    safe_denom = jnp.where(seen, denom, 1.0)
    o_ref[...] = (acc / safe_denom[:, None]).reshape(block_q, group, head_dim).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_denom), 0.0).reshape(block_q, group)


def _dq_kernel(seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, block_k):
    block_q, group, head_dim = q_ref.shape
    rows = block_q * group
    q_start = pl.program_id(2) * block_q
    seg_q, seg_rows, idx_rows = _query_rows(seg_ref, q_start, block_q, group)
    q_lo, q_hi = _segment_bounds(seg_q)
    q = q_ref[...].reshape(rows, head_dim)
    do = do_ref[...].reshape(rows, head_dim)
    lse = lse_ref[...].reshape(rows)
    delta = delta_ref[...].reshape(rows)

    def visit(k_start, dq):
        seg_k = seg_ref[pl.ds(k_start, block_k)]
        k = k_ref[pl.ds(k_start, block_k), :]
        s, mask = _tile_scores(q, k, seg_rows, idx_rows, seg_k, k_start, scale)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot_t(do, v_ref[pl.ds(k_start, block_k), :]) - delta[:, None])
        return dq + lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    def body(j, dq):
        k_start = j * block_k
        k_lo, k_hi = _segment_bounds(seg_ref[pl.ds(k_start, block_k)])
        keep = _block_visible(q_lo, q_hi, q_start + block_q - 1, k_lo, k_hi, k_start)
        return lax.cond(keep, functools.partial(visit, k_start), lambda c: c, dq)

    num_k = lax.div(q_start + block_q + block_k - 1, block_k)
    dq = lax.fori_loop(0, num_k, body, jnp.zeros((rows, head_dim), jnp.float32))
    dq_ref[...] = (dq * scale).reshape(block_q, group, head_dim).astype(dq_ref.dtype)


def _dkv_kernel(
    seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, block_q
):
    length, group, head_dim = q_ref.shape
    block_k = k_ref.shape[0]
    k_start = pl.program_id(2) * block_k
    seg_k = seg_ref[pl.ds(k_start, block_k)]
    k_lo, k_hi = _segment_bounds(seg_k)
    k, v = k_ref[...], v_ref[...]

    def visit(q_start, carry):
        dk, dv = carry
        _, seg_rows, idx_rows = _query_rows(seg_ref, q_start, block_q, group)
        q = q_ref[pl.ds(q_start, block_q)].reshape(-1, head_dim)
        do = do_ref[pl.ds(q_start, block_q)].reshape(-1, head_dim)
        lse = lse_ref[pl.ds(q_start, block_q)].reshape(-1)
        delta = delta_ref[pl.ds(q_start, block_q)].reshape(-1)
        s, mask = _tile_scores(q, k, seg_rows, idx_rows, seg_k, k_start, scale)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dv = dv + _t_dot(p.astype(do.dtype), do)
        ds = p * (_dot_t(do, v) - delta[:, None])
        return dk + _t_dot(ds.astype(q.dtype), q), dv

    def body(i, carry):
        q_start = i * block_q
        q_lo, q_hi = _segment_bounds(seg_ref[pl.ds(q_start, block_q)])
        keep = _block_visible(q_lo, q_hi, q_start + block_q - 1, k_lo, k_hi, k_start)
        return lax.cond(keep, functools.partial(visit, q_start), lambda c: c, carry)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    # Causal bound: start at the query block that holds this key block's first key.
    dk, dv = lax.fori_loop(lax.div(k_start, block_q), length // block_q, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(length, group, head_dim, block_q, block_k):
    """BlockSpecs over grid (b, n, i) for arrays in [B, L, H or N, K] layout."""
    return {
        "seg": pl.BlockSpec((None, length), lambda b, n, i: (b, 0)),
        "q_tile": pl.BlockSpec((None, block_q, group, head_dim), lambda b, n, i: (b, i, n, 0)),
        "q_full": pl.BlockSpec((None, length, group, head_dim), lambda b, n, i: (b, 0, n, 0)),
        "row_tile": pl.BlockSpec((None, block_q, group), lambda b, n, i: (b, i, n)),
        "row_full": pl.BlockSpec((None, length, group), lambda b, n, i: (b, 0, n)),
        "kv_tile": pl.BlockSpec((None, block_k, None, head_dim), lambda b, n, i: (b, i, n, 0)),
        "kv_full": pl.BlockSpec((None, length, None, head_dim), lambda b, n, i: (b, 0, n, 0)),
    }


def _flash_forward(q, k, v, seg, scale, block_q, block_k, interpret):
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    spec = _specs(length, heads // kv_heads, head_dim, block_q, block_k)
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, block_k=block_k),
        grid=(batch, kv_heads, length // block_q),
        in_specs=[spec["seg"], spec["q_tile"], spec["kv_full"], spec["kv_full"]],
        out_specs=[spec["q_tile"], spec["row_tile"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, length, heads), jnp.float32),
        ],
        interpret=interpret,
        name="grouped_attention_forward",
    )(seg, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seg, scale, block_q, block_k, interpret):
    return _flash_forward(q, k, v, seg, scale, block_q, block_k, interpret)[0]


def _flash_fwd(q, k, v, seg, scale, block_q, block_k, interpret):
    out, lse = _flash_forward(q, k, v, seg, scale, block_q, block_k, interpret)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(scale, block_q, block_k, interpret, residuals, d_out):
    q, k, v, seg, out, lse = residuals
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    spec = _specs(length, heads // kv_heads, head_dim, block_q, block_k)
    # delta_i = sum_k dO_ik O_ik = sum_j P_ij dP_ij (FlashAttention-2, Alg. 2): the softmax
    # Jacobian's row term, computed once instead of per key block.
    delta = jnp.einsum("blhk,blhk->blh", out.astype(jnp.float32), d_out.astype(jnp.float32))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k),
        grid=(batch, kv_heads, length // block_q),
        in_specs=[
            spec["seg"],
            spec["q_tile"],
            spec["kv_full"],
            spec["kv_full"],
            spec["q_tile"],
            spec["row_tile"],
            spec["row_tile"],
        ],
        out_specs=spec["q_tile"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        name="grouped_attention_dq",
    )(seg, q, k, v, d_out, lse, delta)
    # One program per (kv head, key block) sums over the whole query group and every query
    # block itself: no atomics, deterministic.
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=block_q),
        grid=(batch, kv_heads, length // block_k),
        in_specs=[
            spec["seg"],
            spec["q_full"],
            spec["kv_tile"],
            spec["kv_tile"],
            spec["q_full"],
            spec["row_full"],
            spec["row_full"],
        ],
        out_specs=[spec["kv_tile"], spec["kv_tile"]],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        interpret=interpret,
        name="grouped_attention_dkv",
    )(seg, q, k, v, d_out, lse, delta)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------
# Public entry point.


def grouped_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float | None = None,
    impl: str = "auto",
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention in which completion g sees the prompt and itself, causally.

    Args:
      q: [B, L, H, K] queries (RoPE already applied with the packed positions).
      k: [B, L, N, K] keys, H a multiple of N; query head h reads kv head h // (H // N).
      v: [B, L, N, K] values.
      segment_ids: [B, L] int: 0 prompt (first in the row), g >= 1 completion g, -1 padding.
      scale: score scale; defaults to K ** -0.5.
      impl: "reference" (explicit [L, L] mask, autodiff), "xla" (query chunks of `block_q`
        against the keys up to the chunk's end, autodiff), "pallas" (block-skipping flash
        kernel with a Pallas backward), "auto" ("xla"; see the module docstring).
      block_q: query tile of the Pallas kernels and query chunk of "xla", a power of two;
        capped at the next power of two >= L. L is padded (segment -1) to a multiple of the
        larger tile (Pallas only).
      block_k: key tile, likewise.
      interpret: run the Pallas kernels in interpret mode; None means on CPU only.

    Returns:
      [B, L, H, K] in q's dtype (scores and softmax in float32). Rows that see no key
      (padding) are 0 and pass no gradient to q, k or v.
    """
    q, k, v, segment_ids = map(jnp.asarray, (q, k, v, segment_ids))
    _check_inputs("grouped_attention", q, k, v, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"grouped_attention: `impl` must be one of {list(IMPLS)}, got {impl!r}.")
    backend = jax.default_backend()
    if impl == "auto":
        # The Pallas kernels have run in interpret mode only; until a GPU/TPU run checks
        # their lowering, the XLA path is the one known correct on every backend.
        impl = "xla"
    if impl == "reference":
        return reference_grouped_attention(q, k, v, segment_ids, scale=scale)
    if impl == "xla":
        return _causal_chunked_attention(q, k, v, segment_ids, scale, block_q)
    length, head_dim = q.shape[1], q.shape[3]
    scale = head_dim**-0.5 if scale is None else float(scale)
    interpret = backend == "cpu" if interpret is None else bool(interpret)
    block_q, block_k, padded = _resolve_blocks(length, block_q, block_k)
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    out = _flash(
        jnp.pad(q, pad),
        jnp.pad(k, pad),
        jnp.pad(v, pad),
        _pad_segments(segment_ids, padded),
        scale,
        block_q,
        block_k,
        interpret,
    )
    return out[:, :length]


# ------------------------------------------------------------------------------------------
# Host-side packing.
