"""medjax.losses.grpo: advantages, KL estimators and the clipped surrogate, by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from medjax import losses

E = math.exp


# --- group_advantages -------------------------------------------------------------------


def test_group_advantages_group_scale_by_hand():
    # Group 1: mean 0.25, Bessel std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5. Group 2: std 0.
    adv = losses.group_advantages(jnp.array([1.0, 0, 0, 0, 2, 2, 2, 2]), 4)
    want = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0]
    np.testing.assert_allclose(adv, want, rtol=1e-6)
    assert adv.dtype == jnp.float32


def test_group_advantages_population_std():
    adv = losses.group_advantages(jnp.array([1.0, 0, 0, 0]), 4, ddof=0, eps=0.0)
    np.testing.assert_allclose(
        adv, np.array([0.75, -0.25, -0.25, -0.25]) / math.sqrt(0.1875), rtol=1e-6
    )


def test_group_advantages_batch_scale_subtracts_group_mean():
    # Batch std (ddof 1) of [1,0,0,0,2,2,2,2]: sum of squared deviations 6.875 over 7.
    std = math.sqrt(6.875 / 7)
    adv = losses.group_advantages(jnp.array([1.0, 0, 0, 0, 2, 2, 2, 2]), 4, scale="batch")
    want = np.array([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / (std + 1e-4)
    np.testing.assert_allclose(adv, want, rtol=1e-6)


def test_group_advantages_no_scale():
    adv = losses.group_advantages(jnp.array([3.0, 1.0, 0.5, 0.5]), 2, scale="none")
    np.testing.assert_allclose(adv, [1.0, -1.0, 0.0, 0.0])


def test_nan_rewards_are_left_out_and_get_zero():
    # Valid [1, 0, 0]: mean 1/3, Bessel std sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3).
    # Second group has one valid reward: its std is undefined, so its advantages are 0.
    rewards = jnp.array([1.0, jnp.nan, 0.0, 0.0, jnp.nan, 5.0, jnp.nan, jnp.nan])
    adv = losses.group_advantages(rewards, 4)
    s = math.sqrt(1 / 3) + 1e-4
    np.testing.assert_allclose(
        adv, [(2 / 3) / s, 0, (-1 / 3) / s, (-1 / 3) / s, 0, 0, 0, 0], rtol=1e-6
    )
    adv0 = losses.group_advantages(rewards, 4, ddof=0, scale="none")
    np.testing.assert_allclose(adv0, [2 / 3, 0, -1 / 3, -1 / 3, 0, 0, 0, 0], rtol=1e-6)


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match=r"shape \(6,\).*num_generations=4"):
        losses.group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match=r"`rewards` must have rank 1, got shape \(2, 3\)"):
        losses.group_advantages(jnp.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="scale"):
        losses.group_advantages(jnp.zeros(4), 2, scale="global")


# --- kl_penalty ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("estimator", "want"), [("k1", -0.5), ("k2", 0.125), ("k3", E(0.5) - 0.5 - 1)]
)
def test_kl_estimators_by_hand(estimator, want):
    # ref - logp = 0.5.
    kl = losses.kl_penalty(jnp.array([[-1.5]]), jnp.array([[-1.0]]), estimator=estimator)
    np.testing.assert_allclose(kl, [[want]], rtol=1e-6)


# --- grpo_loss: reductions ------------------------------------------------------------------

LOGPS = jnp.array([[-1.0, -2.0, -7.0], [-0.5, -3.0, -3.0]])
MASK = jnp.array([[1, 1, 0], [1, 0, 0]])
ADV = jnp.array([1.0, -3.0])


@pytest.mark.parametrize(
    ("loss_type", "extra", "want"),
    [
        # On-policy (ratio 1): per-token loss -A, i.e. -1, -1 | 3.
        ("grpo", {}, (-1.0 + 3.0) / 2),  # Mean of sequence means.
        ("bnpo", {}, (-2.0 + 3.0) / 3),  # Token mean.
        ("dapo", {}, (-2.0 + 3.0) / 3),
        ("dr_grpo", {"max_completion_length": 4}, (-2.0 + 3.0) / (2 * 4)),
        ("dr_grpo", {}, (-2.0 + 3.0) / (2 * 3)),  # Defaults to T.
    ],
)
def test_reductions_by_hand(loss_type, extra, want):
    loss, metrics = losses.grpo_loss(LOGPS, LOGPS, ADV, MASK, loss_type=loss_type, **extra)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(
        metrics["loss_numerator"] / metrics["loss_denominator"], want, rtol=1e-6
    )
    assert float(metrics["num_tokens"]) == 3.0
    assert float(metrics["num_sequences"]) == 2.0
    assert float(metrics["ratio_mean"]) == 1.0


def test_on_policy_gradient_by_hand():
    # grpo: d loss / d logp_t = -A_b * ratio / n_b / B on unmasked tokens, 0 elsewhere.
    grad = jax.grad(lambda lp: losses.grpo_loss(lp, None, ADV, MASK)[0])(LOGPS)
    np.testing.assert_allclose(grad, [[-0.25, -0.25, 0.0], [1.5, 0.0, 0.0]], rtol=1e-6)


def test_old_none_means_on_policy():
    got, _ = losses.grpo_loss(LOGPS, None, ADV, MASK, loss_type="bnpo")
    want, _ = losses.grpo_loss(LOGPS, LOGPS, ADV, MASK, loss_type="bnpo")
    assert float(got) == float(want)


# --- grpo_loss: clipping ---------------------------------------------------------------------


def _one_token(log_ratio, adv, **kwargs):
    logps = jnp.array([[log_ratio]])
    return losses.grpo_loss(logps, jnp.zeros((1, 1)), jnp.array([adv]), jnp.ones((1, 1)), **kwargs)


@pytest.mark.parametrize(
    ("log_ratio", "adv", "kwargs", "want_loss", "want_grad"),
    [
        (0.5, 1.0, {}, -1.2, 0.0),  # Ratio 1.6487 clipped to 1.2: no gradient.
        (-0.5, 1.0, {}, -E(-0.5), -E(-0.5)),  # Unclipped side is the min.
        (-0.5, -1.0, {}, 0.8, 0.0),  # Ratio 0.6065 clipped to 0.8.
        (0.5, -1.0, {}, E(0.5), E(0.5)),  # Pessimistic side: unclipped ratio.
        (math.log(1.25), 1.0, {"epsilon_high": 0.28}, -1.25, -1.25),  # Clip-higher.
        (math.log(1.25), 1.0, {}, -1.2, 0.0),  # Same ratio, symmetric clip.
        (1.0, -1.0, {"delta": 2.0}, 2.0, 0.0),  # Capped at delta.
        (1.0, -1.0, {}, E(1.0), E(1.0)),
    ],
)
def test_clipping_by_hand(log_ratio, adv, kwargs, want_loss, want_grad):
    loss, _ = _one_token(log_ratio, adv, **kwargs)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    grad = jax.grad(lambda lr: _one_token(lr, adv, **kwargs)[0])(log_ratio)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=0)


def test_clip_fraction_metrics():
    # Tokens: ratio 1.6487 with A=+1 (high clip), ratio 0.6065 with A=-1 (low clip),
    # ratio 1.6487 with A=-1 (unclipped side), one masked token.
    logps = jnp.array([[0.5, -0.5], [0.5, 9.0]])
    _, m = losses.grpo_loss(
        logps, jnp.zeros((2, 2)), jnp.array([[1.0, -1.0], [-1.0, 1.0]]), jnp.array([[1, 1], [1, 0]])
    )
    np.testing.assert_allclose(m["clip_high_fraction"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["clip_low_fraction"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["clip_region_fraction"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], (2 * E(0.5) + E(-0.5)) / 3, rtol=1e-6)


@pytest.mark.parametrize(
    ("level", "log_ratio", "adv", "want"),
    [
        ("sequence", [0.2, 0.4], -1.0, E(0.3)),  # exp(mean log-ratio) 1.3499, pessimistic side.
        ("sequence", [0.2, 0.4], 1.0, -1.2),  # Clipped at 1.2.
        ("trajectory", [0.2, 0.4], -1.0, E(0.6)),  # exp(summed log-ratio), M-GRPO Eq. 15.
        # Token 1: ratio 1.2214, A=-1 -> 1.2214. Token 2: ratio 0.6703 -> -min(-0.6703, -0.8).
        ("token", [0.2, -0.4], -1.0, (E(0.2) + 0.8) / 2),
    ],
)
def test_importance_sampling_levels(level, log_ratio, adv, want):
    logps = jnp.array([[*log_ratio, 5.0]])  # The third token is masked.
    loss, _ = losses.grpo_loss(
        logps,
        jnp.zeros((1, 3)),
        jnp.array([adv]),
        jnp.array([[1, 1, 0]]),
        importance_sampling_level=level,
    )
    np.testing.assert_allclose(loss, want, rtol=1e-6)


@pytest.mark.parametrize(
    ("beta", "estimator", "kl_per_token"),
    [
        # Token 1 has d = ref - logp = 0.5, token 2 has d = 0.
        (0.1, "k3", [E(0.5) - 0.5 - 1, 0.0]),
        (0.1, "k1", [-0.5, 0.0]),
        (0.1, "k2", [0.125, 0.0]),
        (0.0, "k3", [E(0.5) - 0.5 - 1, 0.0]),  # Reported, but not in the loss.
    ],
)
def test_kl_term_and_metric(beta, estimator, kl_per_token):
    # On-policy with A = 0: the loss is beta times the token mean of the KL estimate.
    logps = jnp.array([[-1.5, -1.0]])
    loss, m = losses.grpo_loss(
        logps,
        logps,
        jnp.zeros(1),
        jnp.ones((1, 2)),
        ref_per_token_logps=jnp.array([[-1.0, -1.0]]),
        beta=beta,
        loss_type="bnpo",
        kl_estimator=estimator,
    )
    kl_mean = sum(kl_per_token) / 2
    np.testing.assert_allclose(loss, beta * kl_mean, rtol=1e-6)
    np.testing.assert_allclose(m["kl_mean"], kl_mean, rtol=1e-6)


# --- grpo_loss: properties ---------------------------------------------------------------------


def _random_batch(seed, b=4, t=6, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.1, 3.0, (b, t)).astype(dtype)
    old = logps + rng.normal(0, 0.3, (b, t)).astype(dtype)
    ref = logps + rng.normal(0, 0.3, (b, t)).astype(dtype)
    lengths = rng.integers(1, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(dtype)
    adv = rng.normal(0, 1, b).astype(dtype)
    return logps, old, ref, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_positions_contribute_exactly_zero(loss_type, level):
    logps, old, ref, mask, adv = _random_batch(0)
    poisoned = np.where(mask > 0, logps, -np.inf)
    poisoned[0, -1] = np.nan if mask[0, -1] == 0 else poisoned[0, -1]
    kwargs = dict(
        ref_per_token_logps=ref, beta=0.04, loss_type=loss_type, importance_sampling_level=level
    )

    def f(lp):
        return losses.grpo_loss(lp, np.where(mask > 0, old, np.inf), adv, mask, **kwargs)[0]

    clean_loss, clean_grad = jax.value_and_grad(f)(jnp.asarray(np.where(mask > 0, logps, 0.0)))
    loss, grad = jax.value_and_grad(f)(jnp.asarray(poisoned))
    assert float(loss) == float(clean_loss)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)
    np.testing.assert_array_equal(grad, clean_grad)


def test_jit_matches_eager():
    logps, old, ref, mask, adv = _random_batch(1)
    kwargs = dict(ref_per_token_logps=ref, beta=0.04, loss_type="dapo", epsilon_high=0.28)
    eager, m_eager = losses.grpo_loss(logps, old, adv, mask, **kwargs)
    jitted, m_jit = jax.jit(lambda *a: losses.grpo_loss(*a, **kwargs))(logps, old, adv, mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    for k in m_eager:
        np.testing.assert_allclose(m_jit[k], m_eager[k], rtol=1e-6, err_msg=k)


def test_bf16_in_float32_out():
    logps, old, ref, mask, adv = _random_batch(2)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    loss, metrics = losses.grpo_loss(
        bf(logps), bf(old), bf(adv), mask, ref_per_token_logps=bf(ref), beta=0.04
    )
    assert loss.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    # Same value as float32 inputs that hold the bf16-rounded numbers.
    f32 = lambda x: jnp.asarray(bf(x), jnp.float32)  # noqa: E731
    want, _ = losses.grpo_loss(
        f32(logps), f32(old), f32(adv), mask, ref_per_token_logps=f32(ref), beta=0.04
    )
    np.testing.assert_allclose(loss, want, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence", "trajectory"])
def test_gradients_numerically(loss_type, level, x64):
    logps, old, ref, mask, adv = _random_batch(3, dtype=np.float64)
    # Keep ratios away from the clip boundaries, where the loss has kinks.
    old = logps + 0.05 * np.sign(np.random.default_rng(4).normal(size=logps.shape))

    def f(lp):
        return losses.grpo_loss(
            lp,
            old,
            adv,
            mask,
            ref_per_token_logps=ref,
            beta=0.04,
            loss_type=loss_type,
            importance_sampling_level=level,
        )[0]

    check_grads(f, (jnp.asarray(logps),), order=2, modes=["rev"], eps=1e-4, atol=1e-5, rtol=1e-5)


def test_advantages_per_token_equal_broadcast_per_sequence():
    logps, old, _, mask, adv = _random_batch(5)
    a, _ = losses.grpo_loss(logps, old, adv, mask)
    b, _ = losses.grpo_loss(logps, old, np.repeat(adv[:, None], logps.shape[1], 1), mask)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_microbatch_sums_combine_to_the_full_batch():
    logps, old, ref, mask, adv = _random_batch(6, b=8)
    kwargs = dict(loss_type="dapo", ref_per_token_logps=ref, beta=0.04)
    full, _ = losses.grpo_loss(logps, old, adv, mask, **kwargs)
    kwargs.pop("ref_per_token_logps")
    parts = [
        losses.grpo_loss(logps[s], old[s], adv[s], mask[s], ref_per_token_logps=ref[s], **kwargs)[1]
        for s in (slice(0, 3), slice(3, 8))
    ]
    combined = sum(p["loss_numerator"] for p in parts) / sum(p["loss_denominator"] for p in parts)
    np.testing.assert_allclose(combined, full, rtol=1e-6)


def test_shape_errors_name_the_arrays():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"`advantages` has shape \(3,\); expected \[B\]=\(2,\)"):
        losses.grpo_loss(z, z, jnp.zeros(3), z)
    with pytest.raises(
        ValueError, match=r"`mask` has shape \(2, 4\) but `per_token_logps` has shape \(2, 3\)"
    ):
        losses.grpo_loss(z, z, jnp.zeros(2), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"`old_per_token_logps` has shape \(3, 2\)"):
        losses.grpo_loss(z, jnp.zeros((3, 2)), jnp.zeros(2), z)
    with pytest.raises(ValueError, match=r"`ref_per_token_logps` has shape \(2,\)"):
        losses.grpo_loss(z, z, jnp.zeros(2), z, ref_per_token_logps=jnp.zeros(2))
    with pytest.raises(ValueError, match=r"`per_token_logps` must have rank 2, got shape \(6,\)"):
        losses.grpo_loss(jnp.zeros(6), None, jnp.zeros(6), jnp.zeros(6))
    with pytest.raises(ValueError, match="loss_type"):
        losses.grpo_loss(z, z, jnp.zeros(2), z, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        losses.grpo_loss(z, z, jnp.zeros(2), z, importance_sampling_level="turn")
    with pytest.raises(ValueError, match=r"beta=0\.04 needs `ref_per_token_logps`"):
        losses.grpo_loss(z, z, jnp.zeros(2), z, beta=0.04)
