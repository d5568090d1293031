"""Grouped attention: Pallas (interpret mode) vs the explicit-mask reference, the packed row
vs separate causal sequences, block skipping and padding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import packing
from medjax.kernels import prefix_attention as pa

F32_TOL = 1e-5


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _inputs(seed, batch, length, heads, kv_heads, head_dim, dtype=jnp.float32):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    return (
        _normal(kq, (batch, length, heads, head_dim), dtype),
        _normal(kk, (batch, length, kv_heads, head_dim), dtype),
        _normal(kv, (batch, length, kv_heads, head_dim), dtype),
        _normal(kc, (batch, length, heads, head_dim), dtype),
    )


@functools.partial(jax.jit, static_argnames=("impl", "block_q", "block_k"))
def _out_and_grads(q, k, v, seg, cotangent, *, impl, block_q=128, block_k=128):
    """Output and (dq, dk, dv) for the cotangent."""

    def f(q, k, v):
        return pa.grouped_attention(q, k, v, seg, impl=impl, block_q=block_q, block_k=block_k)

    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(cotangent))


def _assert_all_close(got, want, tol, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want, strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol, err_msg=name
        )


def test_grouped_mask_hand_example():
    # Prompt of 2 tokens, completion 1 of 2 tokens, completion 2 of 1 token, one pad.
    seg = jnp.array([0, 0, 1, 1, 2, -1], jnp.int32)
    want = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(pa.grouped_mask(seg), want)
    np.testing.assert_array_equal(pa.grouped_mask(seg[None])[0], want)


# Ragged completions of two prompt/completion layouts in one batch, padded: L = 18.
_TWO_LAYOUTS = packing.pack_groups(
    np.array([5, 2]), np.array([[3, 1, 4], [4, 0, 2]]), prompt_capacity=6, completion_capacity=4
).segment_ids

# (name, segment_ids [B, L], heads, kv_heads, block_q, block_k)
_CASES = [
    # Ragged completions, two layouts in the batch, padding, GQA, L = 18 with 8-blocks.
    (
        "ragged_gqa_padding",
        _TWO_LAYOUTS,
        4,
        2,
        8,
        8,
    ),
    # G = 1, unequal tiles, L = 13.
    (
        "one_completion",
        packing.pack_groups(
            np.array([3]), np.array([[9]]), prompt_capacity=4, completion_capacity=9
        ).segment_ids,
        2,
        2,
        4,
        8,
    ),
    # Plain causal attention (segment 0 only), L = 20.
    ("causal", np.zeros((1, 20), np.int32), 2, 1, 16, 8),
    # Three query heads per kv head (SmolLM2's 9 / 3), key tiles larger than query tiles.
    (
        "gqa_g3",
        _TWO_LAYOUTS,
        6,
        2,
        8,
        16,
    ),
]


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_pallas_matches_reference(case):
    _, seg, heads, kv_heads, block_q, block_k = case
    q, k, v, ct = _inputs(0, seg.shape[0], seg.shape[1], heads, kv_heads, 8)
    blocks = {"block_q": block_q, "block_k": block_k}
    got = _out_and_grads(q, k, v, seg, ct, impl="pallas", **blocks)
    want = _out_and_grads(q, k, v, seg, ct, impl="reference", **blocks)
    _assert_all_close(got, want, F32_TOL)
    assert got[0].dtype == jnp.float32


def _causal_attention(q, k, v):
    """Plain causal attention of one sequence, q [T, H, K], k and v [T, N, K]."""
    t, h, d = q.shape
    k = jnp.repeat(k, h // k.shape[1], axis=1)
    v = jnp.repeat(v, h // v.shape[1], axis=1)
    scores = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    scores = jnp.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    return jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize(
    "prompt_lens, completion_lens",
    [([5, 3], [[4, 1, 6], [2, 5, 3]]), ([4, 6], [[7], [2]])],
    ids=["ragged_g3", "g1"],
)
def test_packed_row_equals_separate_sequences(prompt_lens, completion_lens):
    prompt_lens, completion_lens = np.array(prompt_lens), np.array(completion_lens)
    packed = packing.pack_groups(
        prompt_lens,
        completion_lens,
        prompt_capacity=int(prompt_lens.max()),
        completion_capacity=int(completion_lens.max()),
    )
    seg = packed.segment_ids
    q, k, v, ct = _inputs(1, seg.shape[0], seg.shape[1], 4, 2, 8)
    # Rows of [prompt | completion g] in the packed row, for every (prompt, completion).
    sequences = [
        (p, np.concatenate([np.arange(prompt_lens[p]), packed.completion_index[p, g, :n]]))
        for p, lens in enumerate(completion_lens)
        for g, n in enumerate(lens)
    ]

    def packed_outputs(q, k, v, impl):
        out = pa.grouped_attention(q, k, v, seg, impl=impl, block_q=8, block_k=8)
        return [out[p, rows] for p, rows in sequences]

    def separate_outputs(q, k, v, impl):
        del impl
        return [_causal_attention(q[p, rows], k[p, rows], v[p, rows]) for p, rows in sequences]

    @functools.partial(jax.jit, static_argnums=(0, 4))
    def outputs_and_grads(outputs_fn, q, k, v, impl):
        def loss(q, k, v):
            # The prompt's cotangent enters once per completion, as in G separate sequences.
            outs = outputs_fn(q, k, v, impl)
            pairs = zip(outs, sequences, strict=True)
            return sum(jnp.sum(o * ct[p, rows]) for o, (p, rows) in pairs)

        return outputs_fn(q, k, v, impl), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    want_outs, want_grads = outputs_and_grads(separate_outputs, q, k, v, None)
    for impl in ("reference", "xla", "pallas"):
        outs, grads = outputs_and_grads(packed_outputs, q, k, v, impl)
        _assert_all_close(outs, want_outs, F32_TOL, names=[f"{impl} {i}" for i in range(len(outs))])
        _assert_all_close(grads, want_grads, F32_TOL, [f"{impl} d{x}" for x in "qkv"])


def _prefix_grouper_layout():
    # P = 64, G = 8 completions of C = 16: L = 192, twelve 16-token blocks.
    return packing.pack_groups(
        np.array([64]), np.full((1, 8), 16), prompt_capacity=64, completion_capacity=16
    ).segment_ids


def test_block_skipping_counts():
    seg = _prefix_grouper_layout()
    # Query blocks 0..3 (prompt) visit key blocks 0..i: 1 + 2 + 3 + 4 = 10. Each of the 8
    # completion blocks visits the 4 prompt blocks and itself: 8 * 5 = 40. Total 50, against
    # 12 * 13 / 2 = 78 for causal attention over the same row (and 8 * 15 = 120 for eight
    # separate 80-token sequences).
    assert int(pa.count_visited_blocks(seg, block_q=16, block_k=16)[0]) == 50
    causal = np.zeros_like(seg)
    assert int(pa.count_visited_blocks(causal, block_q=16, block_k=16)[0]) == 78
    # With block-aligned completions the predicate is exact: it keeps precisely the pairs
    # that hold a visible (query, key) pair.
    mask = np.asarray(pa.grouped_mask(seg[0])).reshape(12, 16, 12, 16)
    np.testing.assert_array_equal(
        pa.visited_blocks(seg, block_q=16, block_k=16)[0], mask.any(axis=(1, 3))
    )
    # Ragged segments and trailing padding: never skips a visible pair.
    seg = packing.pack_groups(
        np.array([5, 9]), np.array([[3, 7, 4], [1, 6, 2]]), prompt_capacity=9, completion_capacity=7
    ).segment_ids
    visited = np.asarray(pa.visited_blocks(seg, block_q=4, block_k=8))
    mask = np.pad(np.asarray(pa.grouped_mask(seg)), ((0, 0), (0, 2), (0, 2)))  # L 30 -> 32.
    needed = mask.reshape(2, 8, 4, 4, 8).any(axis=(2, 4))
    assert np.all(visited | ~needed)
    causal = pa.count_visited_blocks(np.zeros_like(seg), block_q=4, block_k=8)
    assert visited.sum() < int(causal.sum())


def test_kernels_skip_other_completions():
    # NaN keys, values and cotangent on completion 4 (rows 112..127): a kernel that visited
    # its block for any other completion's queries (or they for its keys) would multiply the
    # NaNs by zero probabilities and spread them.
    seg = _prefix_grouper_layout()
    q, k, v, ct = _inputs(2, 1, 192, 1, 1, 8)
    poison = np.zeros((1, 192, 1, 1), bool)
    poison[:, 112:128] = True
    got = _out_and_grads(
        q,
        jnp.where(poison, jnp.nan, k),
        jnp.where(poison, jnp.nan, v),
        seg,
        jnp.where(poison, jnp.nan, ct),
        impl="pallas",
        block_q=16,
        block_k=16,
    )
    want = _out_and_grads(q, k, v, seg, ct, impl="reference")
    clean_queries = np.r_[0:112, 128:192]  # The prompt and completions 1..3, 5..8.
    clean_keys = np.r_[64:112, 128:192]  # Completion 4 also reaches the prompt's dk, dv.
    _assert_all_close(
        [
            got[0][:, clean_queries],
            got[1][:, clean_queries],
            got[2][:, clean_keys],
            got[3][:, clean_keys],
        ],
        [
            want[0][:, clean_queries],
            want[1][:, clean_queries],
            want[2][:, clean_keys],
            want[3][:, clean_keys],
        ],
        F32_TOL,
    )


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_padding_queries_are_zero_and_pass_no_gradient(impl):
    seg = np.array([[0, 0, 0, 1, 1, 2, -1, -1, -1, -1, 0, -1]], np.int32)  # Holes, too.
    pad = (seg < 0)[..., None, None]
    q, k, v, ct = _inputs(3, 1, 12, 2, 1, 8)
    # Garbage in padding rows must not reach any real output or gradient.
    garbage = [jnp.where(pad, 1e3, x) for x in (q, k, v)]
    clean = [jnp.where(pad, 0.0, x) for x in (q, k, v)]
    blocks = {"block_q": 4, "block_k": 4}
    got = _out_and_grads(*garbage, seg, ct, impl=impl, **blocks)
    for x in got:
        assert np.all(np.isfinite(x))
        np.testing.assert_array_equal(np.asarray(x)[np.broadcast_to(pad, x.shape)], 0.0)
    want = _out_and_grads(*clean, seg, jnp.where(pad, 0.0, ct), impl=impl, **blocks)
    _assert_all_close(got, want, F32_TOL)


def test_bf16_inputs():
    seg = _CASES[0][1]
    q, k, v, ct = _inputs(4, seg.shape[0], seg.shape[1], 4, 2, 8)
    as_bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, ct)]
    got = _out_and_grads(*as_bf16[:3], seg, as_bf16[3], impl="pallas", block_q=8, block_k=8)
    for x in got:
        assert x.dtype == jnp.bfloat16
    want = _out_and_grads(q, k, v, seg, ct, impl="reference")
    _assert_all_close(got, want, 2e-2)


def test_jit_grad_of_pallas():
    seg = _CASES[1][1]
    q, k, v, _ = _inputs(5, 1, seg.shape[1], 2, 2, 8)

    def loss(q, k, v, impl):
        out = pa.grouped_attention(q, k, v, seg, impl=impl, block_q=4, block_k=8)
        return jnp.sum(jnp.sin(out))

    grad = functools.partial(jax.grad(loss, argnums=(0, 1, 2)), impl="pallas")
    jax.make_jaxpr(grad)(q, k, v)
    got = jax.jit(grad)(q, k, v)
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "reference")
    _assert_all_close(got, want, F32_TOL, ("dq", "dk", "dv"))


def test_interpret_follows_the_platform_unless_given():
    # interpret=None picks interpret mode from the platform the program is lowered for (CPU
    # here); an explicit False is kept, and Pallas rejects it on CPU. The TPU side is
    # tests/kernels/test_tpu_lowering.py.
    seg = _CASES[1][1]
    q, k, v, _ = _inputs(7, 1, seg.shape[1], 2, 2, 8)

    def attend(interpret):
        return jax.jit(
            functools.partial(pa.grouped_attention, impl="pallas", block_q=4, interpret=interpret)
        )(q, k, v, seg)

    np.testing.assert_array_equal(attend(None), attend(True))
    with pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):
        attend(False)


def test_xla_chunks_equal_the_reference_and_auto_is_xla():
    # L = 18 with 8-query chunks: three chunks, the last one ragged.
    seg = _CASES[0][1]
    q, k, v, ct = _inputs(6, 2, 18, 4, 2, 8)
    want = _out_and_grads(q, k, v, seg, ct, impl="reference")
    _assert_all_close(_out_and_grads(q, k, v, seg, ct, impl="xla", block_q=8), want, F32_TOL)
    np.testing.assert_array_equal(
        pa.grouped_attention(q, k, v, seg), pa.grouped_attention(q, k, v, seg, impl="xla")
    )


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 6, 2, 8), (1, 6, 2, 8), (1, 6, 2, 8), (6,)), r"segment_ids.*rank 2.*\(6,\)"),
        (((1, 6, 2, 8), (1, 5, 2, 8), (1, 5, 2, 8), (1, 6)), r"k \(1, 5, 2, 8\)"),
        (((1, 6, 3, 8), (1, 6, 2, 8), (1, 6, 2, 8), (1, 6)), r"multiple.*q \(1, 6, 3, 8\)"),
    ],
)
def test_rejects_bad_shapes(shapes, match):
    q, k, v, seg = (jnp.zeros(s, jnp.int32 if len(s) < 3 else jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        pa.grouped_attention(q, k, v, seg, impl="pallas")
    with pytest.raises(ValueError, match=match):
        pa.reference_grouped_attention(q, k, v, seg)
