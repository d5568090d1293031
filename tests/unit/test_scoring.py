"""medjax.scoring: fused-head and grouped scoring equal the materialised, independent path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import losses, models, scoring

CONFIG = models.ModelConfig(
    family="qwen2",
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    qkv_bias=True,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(models.DecoderLM(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)


def _batch(p, g, tp, c, seed=0):
    """Left-padded prompts of ragged length, right-padded completions of ragged length."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, tp + 1, p)
    prompt_len[0] = tp
    prompt_mask = (np.arange(tp)[None] >= tp - prompt_len[:, None]).astype(np.int32)
    comp_len = rng.integers(1, c + 1, (p, g))
    comp_len[0, 0] = c
    comp_mask = (np.arange(c)[None, None] < comp_len[..., None]).astype(np.int32)
    prompt_ids = rng.integers(0, CONFIG.vocab_size, (p, tp)) * prompt_mask
    comp_ids = rng.integers(0, CONFIG.vocab_size, (p, g, c)) * comp_mask
    return [jnp.asarray(x) for x in (prompt_ids, prompt_mask, comp_ids, comp_mask)]


def _materialised(model, prompt_ids, prompt_mask, comp_ids, comp_mask, temperature=1.0):
    """Independent rows, full logits, log_softmax, gather: the path the fused head replaces."""
    p, g, c = comp_ids.shape
    ids = jnp.concatenate([jnp.repeat(prompt_ids, g, 0), comp_ids.reshape(p * g, c)], 1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, g, 0), comp_mask.reshape(p * g, c)], 1)
    tp = prompt_ids.shape[1]
    logits = model(ids, attention_mask=mask)[:, tp - 1 : tp + c - 1] / temperature
    logps = jnp.take_along_axis(
        jax.nn.log_softmax(logits), comp_ids.reshape(p * g, c)[..., None], -1
    )[..., 0]
    return jnp.where(comp_mask.reshape(p * g, c) > 0, logps, 0.0)


@pytest.mark.parametrize(("p", "g", "tp", "c"), [(2, 3, 6, 5), (1, 1, 4, 3), (3, 2, 5, 1)])
def test_grouped_equals_independent_with_gradients(split_model, p, g, tp, c):
    graphdef, params = split_model
    batch = _batch(p, g, tp, c, seed=p * 10 + g)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(p * g, c)), jnp.float32)

    def grouped(params):
        m = nnx.merge(graphdef, params)
        return scoring.score_groups(m, *batch).reshape(p * g, c)

    def materialised(params):
        return _materialised(nnx.merge(graphdef, params), *batch)

    want = jax.jit(materialised)(params)
    got = jax.jit(grouped)(params)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.asarray(got)[np.asarray(batch[3]).reshape(p * g, c) == 0] == 0)
    g_want = jax.jit(jax.grad(lambda q: (materialised(q) * weights).sum()))(params)
    g_got = jax.jit(jax.grad(lambda q: (grouped(q) * weights).sum()))(params)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_score_completions_and_entropy_match_materialised(split_model):
    graphdef, params = split_model
    model = nnx.merge(graphdef, params)
    prompt_ids, prompt_mask, comp_ids, comp_mask = _batch(2, 2, 5, 4, seed=3)
    flat_ids, flat_mask = comp_ids.reshape(4, 4), comp_mask.reshape(4, 4)
    rep_prompt, rep_mask = jnp.repeat(prompt_ids, 2, 0), jnp.repeat(prompt_mask, 2, 0)
    logps, entropy = jax.jit(
        lambda m, *a: scoring.score_completions(m, *a, temperature=0.7, return_entropy=True)
    )(model, rep_prompt, rep_mask, flat_ids, flat_mask)
    want = _materialised(model, prompt_ids, prompt_mask, comp_ids, comp_mask, temperature=0.7)
    np.testing.assert_allclose(logps, want, atol=1e-5)
    ids = jnp.concatenate([rep_prompt, flat_ids], 1)
    mask = jnp.concatenate([rep_mask, flat_mask], 1)
    logits = model(ids, attention_mask=mask)[:, 4:8] / 0.7
    probs = jax.nn.softmax(logits)
    want_entropy = -(probs * jax.nn.log_softmax(logits)).sum(-1)
    np.testing.assert_allclose(entropy, jnp.where(flat_mask > 0, want_entropy, 0.0), atol=1e-5)


def test_grpo_loss_and_grads_through_grouped_scoring(split_model):
    graphdef, params = split_model
    p, g, tp, c = 2, 4, 6, 5
    batch = _batch(p, g, tp, c, seed=7)
    mask = batch[3].reshape(p * g, c)
    rng = np.random.default_rng(2)
    rewards = jnp.asarray(rng.integers(0, 2, p * g), jnp.float32)
    adv = losses.group_advantages(rewards, g)
    old = _materialised(nnx.merge(graphdef, params), *batch) + 0.1 * jnp.asarray(
        rng.normal(size=(p * g, c))
    )

    def loss_with(score_fn):
        def f(params):
            logps = score_fn(nnx.merge(graphdef, params))
            return losses.grpo_loss(logps, old, adv, mask, loss_type="dapo", epsilon_high=0.28)[0]

        return jax.jit(jax.value_and_grad(f))

    fused = loss_with(lambda m: scoring.score_groups(m, *batch).reshape(p * g, c))(params)
    plain = loss_with(lambda m: _materialised(m, *batch))(params)
    # Advantages sum to zero in each group, so the loss is a near-cancelling sum of O(1)
    # per-token terms: bound it at per-token precision, not relative to the small result.
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(plain[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_pallas_attention_path_matches(split_model):
    graphdef, params = split_model
    model = nnx.merge(graphdef, params)
    batch = _batch(1, 2, 4, 3, seed=5)
    want = _materialised(model, *batch).reshape(1, 2, 3)
    got = jax.jit(
        lambda m, *a: scoring.score_groups(m, *a, attention_impl="pallas", logprob_impl="pallas")
    )(model, *batch)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_shape_errors():
    model = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"`completion_ids` has shape \(2, 3\); expected \[P=1, G, C\]"
    ):
        scoring.score_groups(
            model,
            jnp.zeros((1, 4), int),
            jnp.ones((1, 4)),
            jnp.zeros((2, 3), int),
            jnp.ones((2, 3)),
        )
    with pytest.raises(
        ValueError, match=r"`completion_mask` has shape \(2, 2\); expected \(2, 3\)"
    ):
        scoring.score_completions(
            model,
            jnp.zeros((2, 4), int),
            jnp.ones((2, 4)),
            jnp.zeros((2, 3), int),
            jnp.ones((2, 2)),
        )
