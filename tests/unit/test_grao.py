"""medjax.losses.grao_loss against hand cases and an independent float64 numpy version of
the paper's Eq. 3 written out below."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from medjax import losses


def grao_numpy(s_logps, s_mask, s_rewards, y_logps, y_mask, y_rewards, g, beta, lam, eps, in_group):
    """Eq. 3 of arXiv 2508.07750, loop by loop in float64, with its analytic gradient."""
    s_logps, s_mask, y_logps, y_mask = (
        np.asarray(a, np.float64) for a in (s_logps, s_mask, y_logps, y_mask)
    )
    p_count = len(y_rewards)
    total = 0.0
    d_sample = np.zeros_like(s_logps)
    d_ref = np.zeros_like(y_logps)
    for p in range(p_count):
        rows = range(p * g, (p + 1) * g)
        rewards = np.array([s_rewards[i] for i in rows], np.float64)
        group = np.append(rewards, y_rewards[p]) if in_group else rewards
        mu, sigma = group.mean(), group.std()  # Population std.
        a = (rewards - mu) / (sigma + eps)
        a_y = (y_rewards[p] - mu) / (sigma + eps)
        j_y = sum(y_logps[p, t] for t in range(y_logps.shape[1]) if y_mask[p, t]) / y_mask[p].sum()
        objective = 0.0
        for k, i in enumerate(rows):
            j_i = (
                sum(s_logps[i, t] for t in range(s_logps.shape[1]) if s_mask[i, t])
                / s_mask[i].sum()
            )
            objective += a[k] * j_i + beta * a_y * j_y + lam * a[k] * (j_i - j_y)
            d_sample[i] = -(a[k] + lam * a[k]) / g / p_count * s_mask[i] / s_mask[i].sum()
        total += objective / g
        d_ref[p] = -(beta * a_y - lam * a.mean()) / p_count * y_mask[p] / y_mask[p].sum()
    return -total / p_count, d_sample, d_ref


def _random_case(seed, p=3, g=4, t=7, ty=5):
    rng = np.random.default_rng(seed)
    s_logps = -rng.uniform(0.05, 4.0, (p * g, t))
    s_mask = (np.arange(t)[None] < rng.integers(1, t + 1, p * g)[:, None]).astype(np.float64)
    y_logps = -rng.uniform(0.05, 4.0, (p, ty))
    y_mask = (np.arange(ty)[None] < rng.integers(1, ty + 1, p)[:, None]).astype(np.float64)
    s_rewards = rng.choice([-1.0, 0.0, 1.0], p * g)  # The paper's ternary judge scores.
    y_rewards = rng.choice([0.0, 1.0], p)
    return s_logps, s_mask, s_rewards, y_logps, y_mask, y_rewards


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("in_group", [True, False])
def test_matches_numpy_equation_float64(seed, in_group, x64):
    case = _random_case(seed)
    want, want_ds, want_dy = grao_numpy(*case, 4, 0.5, 0.6, 1e-6, in_group)
    s_logps, s_mask, s_rewards, y_logps, y_mask, y_rewards = case

    def f(s, y):
        return losses.grao_loss(
            s,
            s_mask,
            s_rewards,
            y,
            y_mask,
            y_rewards,
            num_generations=4,
            reference_in_group=in_group,
        )[0]

    loss, (ds, dy) = jax.value_and_grad(f, argnums=(0, 1))(
        jnp.asarray(s_logps), jnp.asarray(y_logps)
    )
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    np.testing.assert_allclose(ds, want_ds, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dy, want_dy, rtol=1e-12, atol=1e-15)


def test_matches_numpy_equation_float32():
    case = _random_case(7, p=2, g=8)
    want, _, _ = grao_numpy(*case, 8, 0.3, 0.9, 1e-6, True)
    f32 = [np.asarray(a, np.float32) for a in case]
    loss, _ = jax.jit(lambda *a: losses.grao_loss(*a, num_generations=8, beta=0.3, lam=0.9))(*f32)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=1e-4)


def _hand_case():
    # One prompt, G=2. Samples: logps [-1, -3] (J = -2) and [-0.5] (J = -0.5); reference
    # [-1, -1, -4] (J = -2). Rewards: samples 1, 0; reference 1.
    s_logps = jnp.array([[-1.0, -3.0, 0.0], [-0.5, 0.0, 0.0]])
    s_mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    y_logps = jnp.array([[-1.0, -1.0, -4.0]])
    y_mask = jnp.ones((1, 3))
    return s_logps, s_mask, jnp.array([1.0, 0.0]), y_logps, y_mask, jnp.array([1.0])


def test_hand_case_reference_in_group():
    # Group {1, 0, 1}: mean 2/3, population std sqrt(2/9). With a = 1 / (3 (std + eps)):
    # A_1 = a, A_2 = -2a, A_y = a. Exploration (1/2)(-2a + a) = -a/2; imitation
    # 0.5 * a * -2 = -a; alignment 0.6 * (1/2) * (a * 0 + (-2a) * 1.5) = -0.9a.
    a = 1 / (3 * (math.sqrt(2 / 9) + 1e-6))
    loss, m = losses.grao_loss(*_hand_case(), num_generations=2)
    np.testing.assert_allclose(loss, 2.4 * a, rtol=1e-6)
    np.testing.assert_allclose(m["exploration_term"], -0.5 * a, rtol=1e-6)
    np.testing.assert_allclose(m["imitation_term"], -a, rtol=1e-6)
    np.testing.assert_allclose(m["alignment_term"], -0.9 * a, rtol=1e-6)
    np.testing.assert_allclose(m["explore_logp_mean"], -1.25, rtol=1e-6)
    np.testing.assert_allclose(m["imitate_logp_mean"], -2.0, rtol=1e-6)
    np.testing.assert_allclose(m["reference_advantage_mean"], a, rtol=1e-6)


@pytest.mark.parametrize(
    ("flags", "want_in_a"),
    [
        ({"use_imitation": False}, 0.5 + 0.9),
        ({"use_exploration": False}, 1.0 + 0.9),
        ({"use_alignment": False}, 0.5 + 1.0),
        ({"use_exploration": False, "use_alignment": False}, 1.0),
    ],
)
def test_ablation_flags_drop_one_term(flags, want_in_a):
    a = 1 / (3 * (math.sqrt(2 / 9) + 1e-6))
    loss, m = losses.grao_loss(*_hand_case(), num_generations=2, **flags)
    np.testing.assert_allclose(loss, want_in_a * a, rtol=1e-6)
    # Switched-off terms are still reported.
    np.testing.assert_allclose(m["imitation_term"], -a, rtol=1e-6)


def test_all_rewards_equal_gives_zero_loss_and_gradient():
    s_logps, s_mask, _, y_logps, y_mask, _ = _hand_case()

    def f(s, y):
        return losses.grao_loss(s, s_mask, jnp.ones(2), y, y_mask, jnp.ones(1), num_generations=2)[
            0
        ]

    loss, (ds, dy) = jax.value_and_grad(f, argnums=(0, 1))(s_logps, y_logps)
    assert float(loss) == 0.0
    assert not np.any(ds) and not np.any(dy)


def test_equal_sample_rewards_leave_only_the_imitation_term():
    # Reference scored apart from the samples: the samples' std is 0, so every A_i is 0 and
    # the loss is -beta * A_y * J(y), with A_y = (1 - 0) / (0 + eps).
    s_logps, s_mask, _, y_logps, y_mask, _ = _hand_case()
    loss, m = losses.grao_loss(
        s_logps,
        s_mask,
        jnp.zeros(2),
        y_logps,
        y_mask,
        jnp.ones(1),
        num_generations=2,
        eps=0.5,
        reference_in_group=False,
    )
    np.testing.assert_allclose(loss, -0.5 * (1 / 0.5) * -2.0, rtol=1e-6)
    assert float(m["exploration_term"]) == 0.0 and float(m["alignment_term"]) == 0.0
    # The reference equal to the samples too: nothing left.
    loss0, _ = losses.grao_loss(
        s_logps,
        s_mask,
        jnp.zeros(2),
        y_logps,
        y_mask,
        jnp.zeros(1),
        num_generations=2,
        reference_in_group=False,
    )
    assert float(loss0) == 0.0


def test_masked_positions_contribute_exactly_zero():
    s_logps, s_mask, s_rewards, y_logps, y_mask, y_rewards = _hand_case()
    y_mask = jnp.array([[1, 1, 0]])
    poisoned_s = jnp.where(s_mask > 0, s_logps, -jnp.inf)
    poisoned_y = jnp.where(y_mask > 0, y_logps, jnp.nan)

    def f(s, y):
        return losses.grao_loss(s, s_mask, s_rewards, y, y_mask, y_rewards, num_generations=2)[0]

    clean = jax.value_and_grad(f, argnums=(0, 1))(s_logps, y_logps)
    dirty = jax.value_and_grad(f, argnums=(0, 1))(poisoned_s, poisoned_y)
    assert float(dirty[0]) == float(clean[0])
    np.testing.assert_array_equal(dirty[1][0], clean[1][0])
    np.testing.assert_array_equal(dirty[1][1], clean[1][1])
    assert np.all(np.asarray(dirty[1][0])[np.asarray(s_mask) == 0] == 0)


def test_nan_reward_is_left_out_of_the_group():
    # Sample 3 unscorable: the group is {1, 0, 1} as in the hand case plus a NaN.
    s_logps, s_mask, _, y_logps, y_mask, y_rewards = _hand_case()
    s3 = jnp.concatenate([s_logps, jnp.array([[-9.0, -9.0, -9.0]])])
    m3 = jnp.concatenate([s_mask, jnp.ones((1, 3), s_mask.dtype)])
    _, m = losses.grao_loss(
        s3, m3, jnp.array([1.0, 0.0, jnp.nan]), y_logps, y_mask, y_rewards, num_generations=3
    )
    a = 1 / (3 * (math.sqrt(2 / 9) + 1e-6))
    # Exploration now averages over G = 3 with A_3 = 0: (a * -2 + -2a * -0.5 + 0) / 3.
    np.testing.assert_allclose(m["exploration_term"], (-2 * a + a) / 3, rtol=1e-6)
    np.testing.assert_allclose(m["reference_advantage_mean"], a, rtol=1e-6)


def test_jit_matches_eager_and_bf16_gives_float32():
    case = _random_case(11, p=2, g=4)
    f32 = [np.asarray(a, np.float32) for a in case]
    eager, _ = losses.grao_loss(*f32, num_generations=4)
    jitted, _ = jax.jit(lambda *a: losses.grao_loss(*a, num_generations=4))(*f32)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in f32]
    loss_bf, metrics = losses.grao_loss(*bf, num_generations=4)
    assert loss_bf.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in metrics.values())


def test_gradients_numerically(x64):
    s_logps, s_mask, s_rewards, y_logps, y_mask, y_rewards = _random_case(12, p=2, g=3)

    def f(s, y):
        return losses.grao_loss(s, s_mask, s_rewards, y, y_mask, y_rewards, num_generations=3)[0]

    check_grads(f, (jnp.asarray(s_logps), jnp.asarray(y_logps)), order=2, modes=["rev"], eps=1e-4)


def test_shape_errors_name_the_arrays():
    s_logps, s_mask, s_rewards, y_logps, y_mask, y_rewards = _hand_case()
    with pytest.raises(ValueError, match=r"`sample_logps` has shape \(2, 3\).*1 \* 3 rows"):
        losses.grao_loss(s_logps, s_mask, s_rewards, y_logps, y_mask, y_rewards, num_generations=3)
    with pytest.raises(ValueError, match=r"`sample_mask` has shape \(2, 2\)"):
        losses.grao_loss(
            s_logps, jnp.ones((2, 2)), s_rewards, y_logps, y_mask, y_rewards, num_generations=2
        )
    with pytest.raises(ValueError, match=r"`reference_mask` has shape \(1, 2\)"):
        losses.grao_loss(
            s_logps, s_mask, s_rewards, y_logps, jnp.ones((1, 2)), y_rewards, num_generations=2
        )
    with pytest.raises(ValueError, match=r"`sample_rewards` has shape \(3,\)"):
        losses.grao_loss(
            s_logps, s_mask, jnp.ones(3), y_logps, y_mask, y_rewards, num_generations=2
        )
    with pytest.raises(ValueError, match=r"`reference_rewards` has shape \(2,\)"):
        losses.grao_loss(
            s_logps, s_mask, s_rewards, y_logps, y_mask, jnp.ones(2), num_generations=2
        )
    with pytest.raises(ValueError, match=r"`reference_logps` must have rank 2, got shape \(3,\)"):
        losses.grao_loss(
            s_logps, s_mask, s_rewards, y_logps[0], y_mask[0], y_rewards, num_generations=2
        )
