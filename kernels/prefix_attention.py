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
* "auto": "xla" on every backend for now: the Pallas kernels have never run on a TPU or GPU.

The kernels are TPU (Mosaic) kernels: each grid's last axis is a sequential reduction over
tiles, with float32 accumulators in VMEM scratch, so VMEM use does not grow with L. Interpret
mode and compiler parameters follow the platform the program is lowered for: interpret mode
on CPU, where the tests check the numerics, Mosaic on TPU. They compile for TPU (forward and
backward, bf16 and f32, GQA, head dim 64 and 128, L up to 16,384; see
tests/kernels/test_tpu_lowering.py, ahead of time with libtpu) but have never run there. On
GPU they fail to lower: Pallas' Triton backend implements no scratch memory (nor would it run
a grid axis in sequence). GQA is handled by packing the G = H // N query heads that share a
kv head into the query rows of one program ([G * block_q, K] tiles), so K and V are read once
per group. `grouped_attention` transposes q, k and v into the kernels' head-major layouts
(see "Pallas kernels" below): XLA copies that Mosaic's block-shape rule asks for, since a
block cannot take G of the H heads of [B, L, H, K] unless G is a multiple of 8.

Dimension letters: B batch, L packed length, H query heads, N kv heads, K head dim, G
completions per prompt (also, inside the kernels, query heads per kv head).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from medjax.kernels import platforms

IMPLS = ("auto", "reference", "xla", "pallas")

# Finite, like the model's mask value: a fully masked row must not produce inf - inf = NaN.
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_NO_SEGMENT = np.iinfo(np.int32).max


# ------------------------------------------------------------------------------------------
# Visibility: the element rule and the block predicate shared by the kernels and helpers.


def _visible(seg_q, seg_k, idx_q, idx_k):
    """Element visibility; broadcasts, so it serves [L, L] masks and kernel tiles alike."""
    return (seg_q >= 0) & (seg_k >= 0) & (idx_k <= idx_q) & ((seg_k == 0) | (seg_k == seg_q))


def _segment_bounds(seg, axis=-1):
    """(lowest real segment, highest segment) over `axis` (None: all); (MAX, -1) if all
    padding."""
    lo = jnp.min(jnp.where(seg >= 0, seg, _NO_SEGMENT), axis=axis)
    return lo, jnp.max(seg, axis=axis)


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


def masked_attention(q, k, v, mask, scale=None, *, heads_first=False):
    """GQA attention of q [B, Tq, H, K] over k, v [B, Tk, N, K] ([B, N, Tk, K] with
    `heads_first`: the KV cache's layout) under a [B, Tq, Tk] bool mask; softmax in float32,
    rows with no visible key give 0. The model's plain and cached attention use it too, so
    every path shares one piece of attention math."""
    b, tq, h, kd = q.shape
    n = k.shape[1 if heads_first else 2]
    scale = kd**-0.5 if scale is None else scale
    mask = mask[:, None, None]  # [B, 1, 1, Tq, Tk] over (n, g).
    q_BxTxNxGxK = q.reshape(b, tq, n, h // n, kd)
    if heads_first:
        # q moved to [B, N, G, Tq, K] first: left to the einsum, XLA on CPU copied the
        # whole cache into another order at every decode step (SmolLM2, 16 rows of 896
        # slots: 307 ms a step against 84).
        q_BxNxGxTxK = q_BxTxNxGxK.transpose(0, 2, 3, 1, 4)
        scores = jnp.einsum("bngtk,bnsk->bngts", q_BxNxGxTxK, k, preferred_element_type=jnp.float32)
    else:
        scores = jnp.einsum("btngk,bsnk->bngts", q_BxTxNxGxK, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * scale, _MASKED)
    # A row with no visible key would otherwise average every value uniformly.
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype)
    if heads_first:
        out = jnp.einsum("bngts,bnsk->bngtk", probs, v, preferred_element_type=jnp.float32)
        out = out.transpose(0, 3, 1, 2, 4)
    else:
        out = jnp.einsum("bngts,bsnk->btngk", probs, v, preferred_element_type=jnp.float32)
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
# Pallas kernels. Their layouts obey Mosaic's rule that the last two dims of a block be
# divisible by (8, 128) or equal to the array's: queries (and out, dO, dq) as [B, N, G, L, K],
# keys and values as [B, N, L, K], per-query statistics (lse, delta) as [B, N, G, L] and
# segment ids as [B, 1, L], the last two lane-dense (a trailing dim of 1 would be padded to
# 128 lanes in HBM and VMEM). A query tile holds the G heads of one kv head as rows:
# row r = g * block_q + t; per-row values travel inside the kernels as [G * block_q, 1].


def _dot_t(a, b):
    """a @ b.T with a float32 result."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """a.T @ b with a float32 result."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _query_rows(seg_q, q_start, group):
    """[G * block_q, 1] segment ids and indices of the rows of the query tile at `q_start`,
    whose segment ids are the [1, block_q] row `seg_q`."""
    shape = (group, seg_q.shape[1], 1)
    seg_rows = jnp.broadcast_to(seg_q.T[None], shape).reshape(-1, 1)
    idx_rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    return seg_rows, idx_rows.reshape(-1, 1)


def _load_rows(ref):
    """A [G, block_q] block of per-query values as the [G * block_q, 1] column of the tile's
    rows. Mosaic cannot reshape [G, block_q] to that; it transposes one head at a time (a
    reshape between row and column needs a sublane gather, which v4 lacks)."""
    return jnp.concatenate([ref[g : g + 1, :].T for g in range(ref.shape[0])])


def _store_rows(ref, x):
    """Inverse of `_load_rows`: the [G * block_q, 1] column `x` into a [G, block_q] block."""
    block_q = ref.shape[1]
    for g in range(ref.shape[0]):
        ref[g : g + 1, :] = x[g * block_q : (g + 1) * block_q].T


def _tile_scores(q, k, seg_q, seg_k, q_start, k_start, scale):
    """Scaled, masked [G * block_q, block_k] scores of the query tile at `q_start` (rows `q`,
    segment ids the [1, block_q] row `seg_q`) against the key tile at `k_start` (`seg_k` a
    [1, block_k] row), and the mask."""
    seg_rows, idx_rows = _query_rows(seg_q, q_start, q.shape[0] // seg_q.shape[1])
    idx_k = k_start + lax.broadcasted_iota(jnp.int32, seg_k.shape, 1)
    mask = _visible(seg_rows, seg_k, idx_rows, idx_k)
    return jnp.where(mask, _dot_t(q, k) * scale, _MASKED), mask


def _backward_tile(seg_q, seg_k, q_start, k_start, q_ref, k, v, do_ref, lse_ref, delta_ref, scale):
    """The query tile's rows q and dO, and against the key tile the probabilities p
    (recomputed from the forward's lse) and the score gradients ds (before `scale`)."""
    head_dim = q_ref.shape[-1]
    q, do = q_ref[...].reshape(-1, head_dim), do_ref[...].reshape(-1, head_dim)
    s, mask = _tile_scores(q, k, seg_q, seg_k, q_start, k_start, scale)
    p = jnp.where(mask, jnp.exp(s - _load_rows(lse_ref)), 0.0)
    return q, do, p, p * (_dot_t(do, v) - _load_rows(delta_ref))


def _keep(seg_q, seg_k, q_start, k_start):
    """The block predicate for a [1, block_q] query and a [1, block_k] key segment tile."""
    q_lo, q_hi = _segment_bounds(seg_q, axis=None)
    k_lo, k_hi = _segment_bounds(seg_k, axis=None)
    return _block_visible(q_lo, q_hi, q_start + seg_q.shape[1] - 1, k_lo, k_hi, k_start)


# Each kernel runs over a 4-D grid whose last axis is the sequential reduction: key tiles for
# the forward and dq kernels (grid (b, n, i, j)), query tiles for the dk, dv kernel (grid
# (b, n, j, i)). Float32 accumulators live in VMEM scratch from its first step to its last,
# which writes the output; the steps in between skip the pairs `_keep` rules out.


def _forward_kernel(
    segq_ref, segk_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref, *, scale
):
    _, block_q, head_dim = q_ref.shape
    j = pl.program_id(3)
    q_start, k_start = pl.program_id(2) * block_q, j * k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    seg_q, seg_k = segq_ref[...], segk_ref[...]

    @pl.when(_keep(seg_q, seg_k, q_start, k_start))
    def _visit():
        q = q_ref[...].reshape(-1, head_dim)
        s, mask = _tile_scores(q, k_ref[...], seg_q, seg_k, q_start, k_start, scale)
        m = m_ref[...]
        m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        # Masked entries are zeroed, not exp(_MASKED - m): a row with nothing visible yet
        # has m == _MASKED and would count them as weight 1.
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[...]
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=-1, keepdims=True)
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        # denom >= 1 for any row with a visible key (its maximum contributes exp(0)).
        denom = l_ref[...]
        seen = denom > 0
        safe_denom = jnp.where(seen, denom, 1.0)
        o_ref[...] = (acc_ref[...] / safe_denom).reshape(o_ref.shape).astype(o_ref.dtype)
        _store_rows(lse_ref, jnp.where(seen, m_ref[...] + jnp.log(safe_denom), 0.0))


def _dq_kernel(
    segq_ref, segk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_ref, *, scale
):
    block_q = q_ref.shape[1]
    j = pl.program_id(3)
    q_start, k_start = pl.program_id(2) * block_q, j * k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    seg_q, seg_k = segq_ref[...], segk_ref[...]

    @pl.when(_keep(seg_q, seg_k, q_start, k_start))
    def _visit():
        k = k_ref[...]
        *_, ds = _backward_tile(
            seg_q, seg_k, q_start, k_start, q_ref, k, v_ref[...], do_ref, lse_ref, delta_ref, scale
        )
        acc_ref[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(
    segq_ref,
    segk_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dk_acc_ref,
    dv_acc_ref,
    *,
    scale,
):
    block_q = q_ref.shape[1]
    i = pl.program_id(3)
    q_start, k_start = i * block_q, pl.program_id(2) * k_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    seg_q, seg_k = segq_ref[...], segk_ref[...]

    @pl.when(_keep(seg_q, seg_k, q_start, k_start))
    def _visit():
        q, do, p, ds = _backward_tile(
            seg_q, seg_k, q_start, k_start, q_ref, k_ref[...], v_ref[...], do_ref, lse_ref,
            delta_ref, scale,
        )  # fmt: skip
        dv_acc_ref[...] += _t_dot(p.astype(do.dtype), do)
        dk_acc_ref[...] += _t_dot(ds.astype(q.dtype), q)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _pallas_call(kernel, *, interpret, **kwargs):
    """`pl.pallas_call` over a 4-D grid whose last axis is sequential, in the interpret mode
    and with the compiler parameters of the platform the program is lowered for
    (`platforms.by_platform`). Platforms other than TPU get Pallas' own choice; on GPU that
    fails to lower (module docstring)."""
    semantics = ("parallel", "parallel", "parallel", "arbitrary")

    def make(interpret, platform):
        params = pltpu.CompilerParams(dimension_semantics=semantics) if platform == "tpu" else None
        return pl.pallas_call(kernel, interpret=interpret, compiler_params=params, **kwargs)

    return platforms.by_platform(make, interpret)


def _query_major_specs(group, head_dim, block_q, block_k):
    """BlockSpecs over grid (b, n, i, j) (forward, dq): query tile i, key tile j. A key tile
    past query tile i's causal bound maps to the last tile within it: the index repeats, so
    TPU's pipeline copies nothing for the steps the kernel skips."""

    def key_tile(i, j):
        # lax.div, not //: floor division lowers through `sign`, whose Mosaic rule asks the
        # default device (the CPU in an ahead-of-time compile) for its TPU generation.
        return jnp.minimum(j, lax.div(i * block_q + block_q - 1, block_k))

    return {
        "seg_q": pl.BlockSpec((None, 1, block_q), lambda b, n, i, j: (b, 0, i)),
        "seg_k": pl.BlockSpec((None, 1, block_k), lambda b, n, i, j: (b, 0, key_tile(i, j))),
        "q": pl.BlockSpec(
            (None, None, group, block_q, head_dim), lambda b, n, i, j: (b, n, 0, i, 0)
        ),
        "kv": pl.BlockSpec(
            (None, None, block_k, head_dim), lambda b, n, i, j: (b, n, key_tile(i, j), 0)
        ),
        "row": pl.BlockSpec((None, None, group, block_q), lambda b, n, i, j: (b, n, 0, i)),
    }


def _key_major_specs(group, head_dim, block_q, block_k):
    """BlockSpecs over grid (b, n, j, i) (dk, dv): key tile j, query tile i. A query tile
    before key tile j's causal bound maps to the first tile after it (see above)."""

    def query_tile(j, i):
        return jnp.maximum(i, lax.div(j * block_k, block_q))

    return {
        "seg_q": pl.BlockSpec((None, 1, block_q), lambda b, n, j, i: (b, 0, query_tile(j, i))),
        "seg_k": pl.BlockSpec((None, 1, block_k), lambda b, n, j, i: (b, 0, j)),
        "q": pl.BlockSpec(
            (None, None, group, block_q, head_dim),
            lambda b, n, j, i: (b, n, 0, query_tile(j, i), 0),
        ),
        "kv": pl.BlockSpec((None, None, block_k, head_dim), lambda b, n, j, i: (b, n, j, 0)),
        "row": pl.BlockSpec(
            (None, None, group, block_q), lambda b, n, j, i: (b, n, 0, query_tile(j, i))
        ),
    }


_ARGS = ("seg_q", "seg_k", "q", "kv", "kv", "q", "row", "row")  # seg, seg, q, k, v, dO, lse, delta


def _flash_forward(q, k, v, seg, scale, block_q, block_k, interpret):
    batch, kv_heads, group, length, head_dim = q.shape
    spec = _query_major_specs(group, head_dim, block_q, block_k)
    rows = group * block_q
    return _pallas_call(
        functools.partial(_forward_kernel, scale=scale),
        grid=(batch, kv_heads, length // block_q, length // block_k),
        in_specs=[spec[name] for name in _ARGS[:5]],
        out_specs=[spec["q"], spec["row"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((rows, head_dim), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
        ],
        interpret=interpret,
        name="grouped_attention_forward",
    )(seg, seg, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seg, scale, block_q, block_k, interpret):
    """Attention in the kernels' layouts: q [B, N, G, L, K], k and v [B, N, L, K], segment
    ids [B, 1, L]; returns [B, N, G, L, K]."""
    return _flash_forward(q, k, v, seg, scale, block_q, block_k, interpret)[0]


def _flash_fwd(q, k, v, seg, scale, block_q, block_k, interpret):
    out, lse = _flash_forward(q, k, v, seg, scale, block_q, block_k, interpret)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(scale, block_q, block_k, interpret, residuals, d_out):
    q, k, v, seg, out, lse = residuals
    batch, kv_heads, group, length, head_dim = q.shape
    # delta_i = sum_k dO_ik O_ik = sum_j P_ij dP_ij (FlashAttention-2, Alg. 2): the softmax
    # Jacobian's row term, computed once instead of per key block.
    delta = jnp.einsum("bngtk,bngtk->bngt", out.astype(jnp.float32), d_out.astype(jnp.float32))
    args = (seg, seg, q, k, v, d_out, lse, delta)
    spec = _query_major_specs(group, head_dim, block_q, block_k)
    dq = _pallas_call(
        functools.partial(_dq_kernel, scale=scale),
        grid=(batch, kv_heads, length // block_q, length // block_k),
        in_specs=[spec[name] for name in _ARGS],
        out_specs=spec["q"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((group * block_q, head_dim), jnp.float32)],
        interpret=interpret,
        name="grouped_attention_dq",
    )(*args)
    # One program per (kv head, key tile) sums over the whole query group and, along its
    # last grid axis, every query tile itself: no atomics, deterministic.
    spec = _key_major_specs(group, head_dim, block_q, block_k)
    dk, dv = _pallas_call(
        functools.partial(_dkv_kernel, scale=scale),
        grid=(batch, kv_heads, length // block_k, length // block_q),
        in_specs=[spec[name] for name in _ARGS],
        out_specs=[spec["kv"], spec["kv"]],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32)] * 2,
        interpret=interpret,
        name="grouped_attention_dkv",
    )(*args)
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
        larger tile (Pallas only). On TPU both tiles must be multiples of 128 unless capped.
      block_k: key tile, likewise.
      interpret: run the Pallas kernels in interpret mode. None means on CPU only, decided
        by the platform the program is lowered for (so an ahead-of-time compile for TPU on
        a CPU host gets the Mosaic kernels), not by `jax.default_backend()`.

    Returns:
      [B, L, H, K] in q's dtype (scores and softmax in float32). Rows that see no key
      (padding) are 0 and pass no gradient to q, k or v.
    """
    q, k, v, segment_ids = map(jnp.asarray, (q, k, v, segment_ids))
    _check_inputs("grouped_attention", q, k, v, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"grouped_attention: `impl` must be one of {list(IMPLS)}, got {impl!r}.")
    if impl == "auto":
        # The Pallas kernels have run in interpret mode only (and compiled for TPU, never
        # run there); until a GPU/TPU run checks them, the XLA path is the one known correct.
        impl = "xla"
    if impl == "reference":
        return reference_grouped_attention(q, k, v, segment_ids, scale=scale)
    if impl == "xla":
        return _causal_chunked_attention(q, k, v, segment_ids, scale, block_q)
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = head_dim**-0.5 if scale is None else float(scale)
    interpret = None if interpret is None else bool(interpret)
    block_q, block_k, padded = _resolve_blocks(length, block_q, block_k)
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    # The kernels' layouts (see "Pallas kernels" above); the transposes are XLA copies.
    q_BxNxGxLxK = (
        jnp.pad(q, pad)
        .reshape(batch, padded, kv_heads, heads // kv_heads, head_dim)
        .transpose(0, 2, 3, 1, 4)
    )
    k_BxNxLxK, v_BxNxLxK = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (k, v))
    out = _flash(
        q_BxNxGxLxK,
        k_BxNxLxK,
        v_BxNxLxK,
        _pad_segments(segment_ids, padded)[:, None, :],
        scale,
        block_q,
        block_k,
        interpret,
    )
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, heads, head_dim)
    return out[:, :length]


# ------------------------------------------------------------------------------------------
# Host-side packing.
