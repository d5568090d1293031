"""medjax.sampling: greedy equals step-by-step argmax with the full forward, reproducible
sampling, top-k/top-p support, stopping, and log-probs equal to scoring the output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import models, sampling, scoring

CONFIG = models.ModelConfig(
    family="qwen2", vocab_size=67, hidden_size=32, intermediate_size=48, num_layers=2,
    num_heads=4, num_kv_heads=2, qkv_bias=True,
)  # fmt: skip
GREEDY = sampling.SamplingParams(max_new_tokens=6, greedy=True)


@pytest.fixture(scope="module")
def model():
    return models.DecoderLM(CONFIG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def prompts():
    # Left-padded: prompt 0 has 5 tokens, prompt 1 has 3.
    ids = jnp.array([[5, 9, 11, 2, 7], [0, 0, 4, 30, 8]])
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    return ids, mask


def test_greedy_equals_argmax_with_the_full_forward(model, prompts):
    ids, mask = prompts
    out = sampling.sample(model, ids, mask, jax.random.key(0), GREEDY)
    forward = jax.jit(lambda m, x: m(x))
    for row, length in ((0, 5), (1, 3)):
        seq = list(np.asarray(ids[row, -length:]))
        for _ in range(6):  # Re-encode everything each step: no cache, no padding involved.
            seq.append(int(jnp.argmax(forward(model, jnp.asarray([seq]))[0, -1])))
        np.testing.assert_array_equal(out.tokens[row], seq[length:])
    assert np.all(np.asarray(out.mask)) and list(np.asarray(out.lengths)) == [6, 6]


def test_logps_equal_scoring_at_the_same_temperature(model, prompts):
    ids, mask = prompts
    params = sampling.SamplingParams(max_new_tokens=5, temperature=0.7, top_k=20)
    out = sampling.sample(model, ids, mask, jax.random.key(1), params, num_samples=3)
    scored = scoring.score_completions(
        model, jnp.repeat(ids, 3, 0), jnp.repeat(mask, 3, 0), out.tokens, out.mask, temperature=0.7
    )
    np.testing.assert_allclose(out.logps, scored, atol=1e-5)


def test_same_key_same_samples_and_groups_differ(model, prompts):
    ids, mask = prompts
    params = sampling.SamplingParams(max_new_tokens=8, temperature=1.5)
    a = sampling.sample(model, ids, mask, jax.random.key(7), params, num_samples=4)
    b = sampling.sample(model, ids, mask, jax.random.key(7), params, num_samples=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len({tuple(np.asarray(t)) for t in a.tokens[:4]}) > 1  # G samples of one prompt.


NEG = -np.inf


def filtered(logits, **kwargs):
    return np.asarray(sampling.filter_logits(jnp.asarray(logits, jnp.float32), **kwargs))


@pytest.mark.parametrize(
    "logits,top_k,want",
    [
        ([[1.0, 3.0, 2.0, 0.5]], 2, [[NEG, 3.0, 2.0, NEG]]),
        # Every token tied with the k-th is kept (as transformers' top-k warper does).
        ([[3.0, 2.0, 2.0, 1.0]], 2, [[3.0, 2.0, 2.0, NEG]]),
        ([[0.5, 4.0, 1.0, 2.0]], 1, [[NEG, 4.0, NEG, NEG]]),
        ([[2.0, 5.0, 5.0, 1.0]], 1, [[NEG, 5.0, 5.0, NEG]]),
        ([[1.0, 3.0, 2.0, 0.5]], 4, [[1.0, 3.0, 2.0, 0.5]]),  # k = V: all kept.
        ([[1.0, 3.0, 2.0, 0.5]], 0, [[1.0, 3.0, 2.0, 0.5]]),  # 0: off.
        # Each row on its own.
        ([[1.0, 3.0, 2.0], [9.0, 7.0, 8.0]], 2, [[NEG, 3.0, 2.0], [9.0, NEG, 8.0]]),
    ],
)
def test_top_k_by_hand(logits, top_k, want):
    """Catches an off-by-one at the k-th value (`<=` drops it, or a k+1-th kept), ties
    dropped, rows mixed."""
    np.testing.assert_array_equal(filtered(logits, top_k=top_k), want)


# Probabilities 0.15, 0.5, 0.05, 0.3 (ids 0..3): sorted 0.5 (id 1), 0.3 (3), 0.15 (0), 0.05
# (2), whose mass before each is 0, 0.5, 0.8, 0.95.
PROBS = np.array([[0.15, 0.5, 0.05, 0.3]])


@pytest.mark.parametrize(
    "top_p,kept",
    [
        (0.6, [1, 3]),  # 0.3 crosses 0.6: kept, so the set's mass reaches top_p.
        (0.79, [1, 3]),
        (0.81, [0, 1, 3]),
        (0.96, [0, 1, 2, 3]),
        (0.01, [1]),  # A tiny top_p keeps the most likely token, never nothing.
        (1.0, [0, 1, 2, 3]),  # 1: off.
    ],
)
def test_top_p_by_hand(top_p, kept):
    """Catches the token that crosses top_p dropped (too little kept; nothing at all for a
    small top_p), one too many kept, the mass summed in id order instead of by probability."""
    got = filtered(np.log(PROBS), top_p=top_p)
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(got[0])), kept)
    np.testing.assert_allclose(got[0, kept], np.log(PROBS[0, kept]), rtol=1e-6)


def test_top_p_ties_and_top_k_first():
    """Ties: of two tokens at 0.3 after a 0.4, top_p 0.5 keeps the lower id (a stable sort).
    Both filters: top-k first, then top-p over the k survivors renormalised (transformers'
    warper order): of 0.4, 0.3, 0.2, 0.1 with top_k 2, 0.3 is 3/7 of what is left, so top_p
    0.55 keeps 0.4 alone (the mass before 0.3 is 4/7 > 0.55), where the unnormalised 0.4
    would have kept both."""
    got = filtered(np.log([[0.3, 0.4, 0.3]]), top_p=0.5)
    np.testing.assert_array_equal(np.isfinite(got), [[True, True, False]])
    got = filtered(np.log([[0.1, 0.3, 0.4, 0.2]]), top_k=2, top_p=0.55)
    np.testing.assert_array_equal(np.isfinite(got), [[False, False, True, False]])
    got = filtered(np.log([[0.1, 0.3, 0.4, 0.2]]), top_k=2, top_p=0.6)
    np.testing.assert_array_equal(np.isfinite(got), [[False, True, True, False]])


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.5), (10, 0.5)])
def test_top_k_and_top_p_draw_exactly_the_allowed_tokens(model, prompts, top_k, top_p):
    """Both directions: nothing outside the allowed set is drawn, and every token in it is
    (1,024 draws; the least likely allowed token is expected at least 20 times)."""
    ids, mask = prompts
    params = sampling.SamplingParams(max_new_tokens=1, top_k=top_k, top_p=top_p, temperature=2.0)
    out = sampling.sample(model, ids[:1], mask[:1], jax.random.key(2), params, num_samples=1024)
    logits = np.asarray(model(ids[:1]), np.float64)[0, -1] / 2.0
    order = np.argsort(-logits, kind="stable")[: top_k or None]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    kept = probs[np.cumsum(probs) - probs < top_p]  # A prefix: mass before each is sorted.
    assert 1024 * kept.min() / kept.sum() >= 20
    drawn = set(np.asarray(out.tokens[:, 0]).tolist())
    assert drawn == set(order[: len(kept)].tolist())


def test_eos_and_stop_sequences_end_rows(model, prompts):
    ids, mask = prompts
    first = np.asarray(sampling.sample(model, ids, mask, jax.random.key(0), GREEDY).tokens)
    # Stop row 0 at its third token by making that token an EOS id.
    eos = int(first[0, 2])
    params = sampling.SamplingParams(max_new_tokens=6, greedy=True, eos_ids=(eos,), pad_id=-1)
    out = sampling.sample(model, ids, mask, jax.random.key(0), params)
    row0 = list(first[0])
    cut = row0.index(eos) + 1
    assert int(out.lengths[0]) == cut
    np.testing.assert_array_equal(out.tokens[0, :cut], row0[:cut])
    assert np.all(np.asarray(out.tokens[0, cut:]) == -1)
    assert float(jnp.abs(out.logps[0, cut:]).sum()) == 0.0
    assert not np.any(np.asarray(out.mask[0, cut:]))
    # A two-token stop sequence taken from row 1's greedy output.
    seq = (int(first[1, 3]), int(first[1, 4]))
    params = sampling.SamplingParams(max_new_tokens=6, greedy=True, stop_sequences=(seq,))
    out = sampling.sample(model, ids, mask, jax.random.key(0), params)
    row1 = list(first[1])
    ends = [j + 2 for j in range(5) if (row1[j], row1[j + 1]) == seq]
    assert int(out.lengths[1]) == ends[0]


def test_bad_inputs():
    model = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    ones = jnp.ones((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampling.sample(
            model, ones, ones, jax.random.key(0), sampling.SamplingParams(temperature=0.0)
        )
    with pytest.raises(ValueError, match=r"`prompt_ids` \(2,\)"):
        sampling.sample(model, ones[0], ones[0], jax.random.key(0), sampling.SamplingParams())
    with pytest.raises(ValueError, match=r"`prefix_ids` has shape \(2, 2\); expected \[1, Tx"):
        sampling.sample(
            model, ones, ones, jax.random.key(0), sampling.SamplingParams(),
            prefix_ids=jnp.ones((2, 2), jnp.int32),
        )  # fmt: skip


def test_buckets_bound_compilations_and_change_no_number(model, prompts):
    ids, mask = prompts
    assert [sampling.bucket_length(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert sampling.bucket_length(5, (4, 16, 64)) == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket 16"):
        sampling.bucket_length(17, (4, 16))
    params = sampling.SamplingParams(max_new_tokens=4, greedy=True)
    want = sampling.sample(model, ids, mask, jax.random.key(0), params)
    before = sampling.compile_count()
    for width in (5, 6, 7, 8):  # Every width lands in the bucket of 8: one new program.
        padded = sampling.pad_prompts(ids, mask, width)
        got = sampling.sample(model, *padded, jax.random.key(0), params, buckets=None)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logps, want.logps, atol=1e-5)
    assert sampling.compile_count() == before + 1


def test_ladder_lengths_by_hand():
    """Powers of two up to `fine_from`, then 2^k and 3 * 2^(k-1)."""
    got = [sampling.ladder_length(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25)]
    assert got == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    got = [sampling.ladder_length(n, fine_from=8) for n in (3, 5, 8, 9, 12, 13, 17, 25)]
    assert got == [4, 8, 8, 12, 12, 16, 24, 32]
    got = [sampling.ladder_length(n, 512) for n in (300, 512, 513, 769, 1025, 1537, 2049, 3073)]
    assert got == [512, 512, 768, 1024, 1536, 2048, 3072, 4096]


def test_per_row_budgets(model, prompts):
    ids, mask = prompts
    want = sampling.sample(model, ids, mask, jax.random.key(0), GREEDY)
    got = sampling.sample(
        model, ids, mask, jax.random.key(0), GREEDY, max_new_tokens=jnp.array([2, 5])
    )
    np.testing.assert_array_equal(got.lengths, [2, 5])
    np.testing.assert_array_equal(got.tokens[0, :2], want.tokens[0, :2])
    np.testing.assert_array_equal(got.tokens[1, :5], want.tokens[1, :5])
    assert np.all(np.asarray(got.tokens[0, 2:]) == GREEDY.pad_id)
    with pytest.raises(
        ValueError, match=r"`max_new_tokens` has shape \(3,\); expected \[P \* G\] = \(2,\)"
    ):
        sampling.sample(model, ids, mask, jax.random.key(0), GREEDY, max_new_tokens=jnp.ones(3))


def test_draw_follows_the_softmax_distribution():
    probs = np.array([0.5, 0.25, 0.0, 0.15, 0.1])  # One token filtered out (-inf).
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    n = 40_000
    keys = jax.random.split(jax.random.key(11), 8)
    tokens = jnp.concatenate(
        [sampling.draw(k, jnp.broadcast_to(logits, (n // 8, 5))) for k in keys]
    )
    counts = np.bincount(np.asarray(tokens), minlength=5)
    assert counts[2] == 0
    expected = probs * n
    live = probs > 0
    chi2 = np.sum((counts[live] - expected[live]) ** 2 / expected[live])
    assert chi2 < 16.3  # The 99.9% quantile of chi-square with 3 degrees of freedom.
