"""medjax.packing: the packed-group layout on hand examples, eager and under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import packing


def test_pack_groups_hand_example():
    # Prompt 0: 2 tokens, completions of 2 and 1; prompt 1: 3 tokens, completions of 0 and 2.
    packed = packing.pack_groups(
        np.array([2, 3]), np.array([[2, 1], [0, 2]]), prompt_capacity=3, completion_capacity=2
    )
    np.testing.assert_array_equal(
        packed.segment_ids, [[0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 2, 2, -1, -1]]
    )
    np.testing.assert_array_equal(
        packed.positions, [[0, 1, 2, 3, 2, -1, -1], [0, 1, 2, 3, 4, -1, -1]]
    )
    # Flat source: 3 prompt slots, then completion 1 (2 slots), then completion 2 (2 slots).
    np.testing.assert_array_equal(
        packed.source_index, [[0, 1, 3, 4, 5, -1, -1], [0, 1, 2, 5, 6, -1, -1]]
    )
    np.testing.assert_array_equal(packed.completion_index, [[[2, 3], [4, 0]], [[0, 0], [3, 4]]])
    # Token 0 is predicted by the last prompt token, token t > 0 by token t - 1.
    np.testing.assert_array_equal(packed.predict_index, [[[1, 2], [1, 0]], [[0, 0], [2, 3]]])
    np.testing.assert_array_equal(packed.completion_mask, [[[1, 1], [1, 0]], [[0, 0], [1, 1]]])
    for field in packed[:5]:
        assert field.dtype == np.int32

    prompt_ids = np.array([[11, 12, 0], [21, 22, 23]])
    completion_ids = np.array([[[31, 32], [41, 0]], [[0, 0], [61, 62]]])
    tokens = packing.pack_tokens(prompt_ids, completion_ids, packed.source_index, pad_id=-7)
    np.testing.assert_array_equal(
        tokens, [[11, 12, 31, 32, 41, -7, -7], [21, 22, 23, 61, 62, -7, -7]]
    )
    np.testing.assert_array_equal(
        packing.gather_packed(tokens, packed.completion_index) * packed.completion_mask,
        completion_ids,
    )
    values = jnp.arange(14.0).reshape(2, 7, 1)
    np.testing.assert_array_equal(
        packing.gather_packed(values, packed.predict_index)[..., 0],
        [[[1, 2], [1, 0]], [[7, 7], [9, 10]]],
    )


def test_pack_groups_rejects_bad_lengths():
    with pytest.raises(ValueError, match=r"\(2,\).*\(3, 2\)"):
        packing.pack_groups(
            np.ones(2, int), np.ones((3, 2), int), prompt_capacity=2, completion_capacity=2
        )
    with pytest.raises(ValueError, match="prompt_capacity=2"):
        packing.pack_groups(
            np.array([0]), np.ones((1, 2), int), prompt_capacity=2, completion_capacity=2
        )
    with pytest.raises(ValueError, match="completion_capacity=2"):
        packing.pack_groups(
            np.array([1]), np.array([[3, 1]]), prompt_capacity=2, completion_capacity=2
        )
    # Rows of 2 + 2 + 1 and 3 + 0 + 2 tokens: a row_length of 4 holds neither.
    with pytest.raises(ValueError, match=r"rows need \[5, 5\] tokens; row_length is 4"):
        packing.pack_groups(
            np.array([2, 3]), np.array([[2, 1], [0, 2]]), prompt_capacity=3,
            completion_capacity=2, row_length=4,
        )  # fmt: skip


def test_pack_groups_row_length_packs_the_same_rows_shorter():
    """The hand example's rows (5 tokens each) in rows of 5 instead of 3 + 2 x 2 = 7: every
    map the same, only the trailing padding gone."""
    lens = np.array([2, 3]), np.array([[2, 1], [0, 2]])
    full = packing.pack_groups(*lens, prompt_capacity=3, completion_capacity=2)
    short = packing.pack_groups(*lens, prompt_capacity=3, completion_capacity=2, row_length=5)
    for name in ("segment_ids", "positions", "source_index"):
        np.testing.assert_array_equal(getattr(short, name), getattr(full, name)[:, :5])
    for name in ("completion_index", "predict_index", "completion_mask"):
        np.testing.assert_array_equal(getattr(short, name), getattr(full, name))


def test_pack_groups_under_jit_with_traced_lengths():
    fn = jax.jit(lambda p, c: packing.pack_groups(p, c, prompt_capacity=3, completion_capacity=2))
    got = fn(jnp.array([2, 3]), jnp.array([[2, 1], [0, 2]]))
    want = packing.pack_groups(
        np.array([2, 3]), np.array([[2, 1], [0, 2]]), prompt_capacity=3, completion_capacity=2
    )
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
