"""medjax.losses.mgrpo: hierarchical advantages, trajectory alignment, rewards, objective."""

import collections
import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import losses

# --- main advantages --------------------------------------------------------------------


def test_main_advantages_population_std_by_hand():
    # Query 0: [1, 0.1, 0.1, 0]: mean 0.3, squared deviations .49 + .04 + .04 + .09 = .66 over
    # K = 4. Query 1: all equal -> 0.
    adv = losses.mgrpo_main_advantages(jnp.array([1.0, 0.1, 0.1, 0.0, 0.1, 0.1, 0.1, 0.1]), 4)
    s = math.sqrt(0.66 / 4) + 1e-6
    np.testing.assert_allclose(
        adv, [0.7 / s, -0.2 / s, -0.2 / s, -0.3 / s, 0, 0, 0, 0], rtol=1e-5, atol=1e-6
    )


def test_main_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match=r"shape \(7,\).*num_rollouts=4"):
        losses.mgrpo_main_advantages(jnp.zeros(7), 4)


# --- alignment --------------------------------------------------------------------------


def _check_alignment(rollout_index, target, num_rollouts, result):
    rollout_index = np.asarray(rollout_index)
    idx = np.asarray(result.indices)
    assert idx.shape == (num_rollouts, target)
    counts = np.array([(rollout_index == r).sum() for r in range(num_rollouts)])
    np.testing.assert_array_equal(result.counts, counts)
    np.testing.assert_array_equal(result.rollout_valid, counts > 0)
    for r in range(num_rollouts):
        row = idx[r]
        own = set(np.flatnonzero(rollout_index == r).tolist())
        if counts[r] == 0:
            assert np.all(row == -1), "a rollout with no sub-trajectories got some invented"
            continue
        assert set(row.tolist()) <= own, "an index belongs to another rollout"
        multiplicity = collections.Counter(row.tolist())
        if counts[r] >= target:
            assert max(multiplicity.values()) == 1, "a duplicate in a rollout that was not short"
        else:
            assert set(row.tolist()) == own, "a short rollout lost one of its own"
            assert max(multiplicity.values()) - min(multiplicity.values()) <= 1
    assert int(result.num_duplicated) == sum(max(target - c, 0) for c in counts if c > 0)
    assert int(result.num_dropped) == sum(max(c - target, 0) for c in counts)


def test_alignment_by_hand():
    # d = 3. Rollout 0 has 3 (all kept), 1 has 1 (copied twice), 2 has 5 (2 dropped),
    # 3 has none (reported), 4 has 1; one padding entry (-1).
    rollout_index = jnp.array([0, 0, 0, 1, 2, 2, 2, 2, 2, -1, 4])
    result = losses.align_sub_trajectories(rollout_index, 3, jax.random.key(0), num_rollouts=5)
    np.testing.assert_array_equal(result.indices[0], [0, 1, 2])
    np.testing.assert_array_equal(result.indices[1], [3, 3, 3])
    np.testing.assert_array_equal(result.indices[3], [-1, -1, -1])
    np.testing.assert_array_equal(result.indices[4], [10, 10, 10])
    np.testing.assert_array_equal(result.rollout_valid, [True, True, True, False, True])
    assert int(result.num_duplicated) == 2 + 0 + 2
    assert int(result.num_dropped) == 2
    _check_alignment(rollout_index, 3, 5, result)


MAX_ROLLOUTS, MAX_COUNT = 12, 9


@functools.partial(jax.jit, static_argnames="target")
def _align_padded(rollout_index, key, target):
    return losses.align_sub_trajectories(rollout_index, target, key, num_rollouts=MAX_ROLLOUTS)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    counts=st.lists(st.integers(0, MAX_COUNT), min_size=1, max_size=MAX_ROLLOUTS),
    target=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    shuffle_seed=st.integers(0, 1000),
)
def test_alignment_invariants(counts, target, seed, shuffle_seed):
    counts = counts + [0] * (MAX_ROLLOUTS - len(counts))
    rollout_index = np.repeat(np.arange(MAX_ROLLOUTS), counts)
    # Sub-agents finish in any order, and a fixed-size buffer pads with -1.
    rollout_index = np.concatenate(
        [rollout_index, -np.ones(MAX_ROLLOUTS * MAX_COUNT - rollout_index.size)]
    )
    np.random.default_rng(shuffle_seed).shuffle(rollout_index)
    result = _align_padded(jnp.asarray(rollout_index, jnp.int32), jax.random.key(seed), target)
    _check_alignment(rollout_index, target, MAX_ROLLOUTS, result)


def test_alignment_under_jit_matches_eager():
    rollout_index = jnp.array([2, 0, 0, 1, 0, 2, 2, 2, 0, 0])
    key = jax.random.key(3)
    eager = losses.align_sub_trajectories(rollout_index, 3, key, num_rollouts=4)
    jitted = jax.jit(lambda i, k: losses.align_sub_trajectories(i, 3, k, num_rollouts=4))(
        rollout_index, key
    )
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_array_equal(a, b)


def test_alignment_choices_are_uniform():
    # Rollout 0 has 4 sub-trajectories and keeps 2: each is kept with probability 1/2.
    # Rollout 1 has 2 and needs 5: each original is copied once or twice, each equally often.
    rollout_index = jnp.array([0, 0, 0, 0, 1, 1])
    keys = jax.random.split(jax.random.key(0), 4000)
    align = jax.vmap(
        lambda k: losses.align_sub_trajectories(rollout_index, 2, k, num_rollouts=2).indices
    )
    kept = np.asarray(align(keys))[:, 0]
    freq = np.array([(kept == i).any(-1).mean() for i in range(4)])
    np.testing.assert_allclose(freq, 0.5, atol=0.04)  # 5 sigma of Binomial(4000, 1/2) is 0.04.
    align5 = jax.vmap(
        lambda k: losses.align_sub_trajectories(rollout_index, 5, k, num_rollouts=2).indices
    )
    rows = np.asarray(align5(keys))[:, 1]
    thrice = (rows == 4).sum(-1) == 3
    np.testing.assert_allclose(thrice.mean(), 0.5, atol=0.04)


def test_alignment_errors():
    with pytest.raises(ValueError, match="target_count must be >= 1"):
        losses.align_sub_trajectories(jnp.array([0, 1]), 0, jax.random.key(0))
    with pytest.raises(ValueError, match=r"holds 5, outside \[0, 3\)"):
        losses.align_sub_trajectories(jnp.array([0, 5]), 2, jax.random.key(0), num_rollouts=3)
    with pytest.raises(ValueError, match=r"`rollout_index` must have rank 1, got shape \(2, 2\)"):
        losses.align_sub_trajectories(jnp.zeros((2, 2), jnp.int32), 2, jax.random.key(0))
    with pytest.raises(ValueError, match="pass `num_rollouts`"):
        jax.jit(lambda i: losses.align_sub_trajectories(i, 2, jax.random.key(0)))(jnp.array([0, 1]))


@pytest.mark.parametrize(
    ("counts", "quantile", "want"),
    [
        (list(range(1, 101)), 0.99, 99),
        (list(range(1, 101)), 1.0, 100),
        (list(range(1, 101)), 0.5, 50),
        ([3, 8, 1, 8, 2], 0.6, 3),
        ([3, 8, 1, 8, 2], 0.99, 8),
        ([0, 0, 0], 0.99, 1),
    ],
)
def test_choose_target_count(counts, quantile, want):
    assert losses.choose_target_count(counts, quantile) == want


def test_choose_target_count_errors():
    with pytest.raises(ValueError, match="non-empty"):
        losses.choose_target_count([])
    with pytest.raises(ValueError, match="quantile"):
        losses.choose_target_count([1, 2], quantile=1.5)


# --- sub advantages ---------------------------------------------------------------------


def test_sub_advantages_pool_over_the_query_by_hand():
    # Query 0 pools [1, 0, 1, 0] (mean .5, std .5) across its rollouts; query 1 [.5, .5] -> 0;
    # a padding row (-1) -> 0.
    adv = losses.mgrpo_sub_advantages(
        jnp.array([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 7.0]), jnp.array([0, 0, 0, 0, 1, 1, -1])
    )
    s = 0.5 + 1e-6
    np.testing.assert_allclose(adv, [0.5 / s, -0.5 / s, 0.5 / s, -0.5 / s, 0, 0, 0], rtol=1e-6)


def test_sub_advantages_count_duplicates():
    # [1, 1, 0] (the first duplicated): mean 2/3, population std sqrt(2/9).
    adv = losses.mgrpo_sub_advantages(jnp.array([1.0, 1.0, 0.0]), jnp.zeros(3, jnp.int32))
    s = math.sqrt(2 / 9) + 1e-6
    np.testing.assert_allclose(adv, [(1 / 3) / s, (1 / 3) / s, (-2 / 3) / s], rtol=1e-6)


def test_sub_advantages_shape_error():
    with pytest.raises(
        ValueError, match=r"`query_index` has shape \(2,\) but `sub_rewards` has shape \(3,\)"
    ):
        losses.mgrpo_sub_advantages(jnp.zeros(3), jnp.zeros(2, jnp.int32))


# --- rewards ----------------------------------------------------------------------------


def test_main_rewards():
    r = losses.mgrpo_main_rewards(jnp.array([1.0, 1.0, 0.0]), jnp.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(r, [1.0, 0.1, 0.0], rtol=1e-6)


def test_sub_rewards_paper_and_released():
    fmt, main, expert = (
        jnp.array([1.0, 1.0, 0.0]),
        jnp.array([1.0, 0.0, 1.0]),
        jnp.array([0.5, 1.0, 1.0]),
    )
    paper = losses.mgrpo_sub_rewards(fmt, main, expert)
    np.testing.assert_allclose(paper, [0.1 + 0.4 + 0.25, 0.1 + 0.5, 0.0], rtol=1e-6)
    released = losses.mgrpo_sub_rewards(fmt, main, variant="released")
    np.testing.assert_allclose(released, [1.0, 0.1, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="needs `expert_reward`"):
        losses.mgrpo_sub_rewards(fmt, main)
    with pytest.raises(ValueError, match="no r_expert"):
        losses.mgrpo_sub_rewards(fmt, main, expert, variant="released")
    with pytest.raises(ValueError, match=r"`expert_reward` has shape \(2,\)"):
        losses.mgrpo_sub_rewards(fmt, main, jnp.ones(2))


# --- policy objective -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio_level", "adv", "want"),
    [
        ("token", -1.0, math.exp(0.1)),  # Each token ratio 1.105 inside [0.8, 1.28].
        ("trajectory", -1.0, math.exp(0.3)),  # Trajectory ratio 1.35, pessimistic side.
        ("trajectory", 1.0, -1.28),  # Clipped at 1 + 0.28.
    ],
)
def test_policy_loss_ratio_levels(ratio_level, adv, want):
    logps = jnp.array([[0.1, 0.1, 0.1, 4.0]])
    loss, _ = losses.mgrpo_policy_loss(
        logps,
        jnp.zeros((1, 4)),
        jnp.array([adv]),
        jnp.array([[1, 1, 1, 0]]),
        ratio_level=ratio_level,
    )
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_policy_loss_rejects_sequence_mean_ratio():
    with pytest.raises(ValueError, match="ratio_level"):
        losses.mgrpo_policy_loss(
            jnp.zeros((1, 2)), None, jnp.zeros(1), jnp.ones((1, 2)), ratio_level="sequence"
        )


def test_hierarchy_end_to_end_by_hand():
    # One query, K=2 rollouts. Rollout 0 made 1 sub-trajectory, rollout 1 made 3; d = 2.
    main = losses.mgrpo_main_rewards(jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0]))  # [1.0, 0.1]
    main_adv = losses.mgrpo_main_advantages(main, 2)
    np.testing.assert_allclose(main_adv, [0.45 / (0.45 + 1e-6), -0.45 / (0.45 + 1e-6)], rtol=1e-6)
    rollout_index = jnp.array([1, 0, 1, 1])
    align = losses.align_sub_trajectories(rollout_index, 2, jax.random.key(1), num_rollouts=2)
    flat = np.asarray(align.indices).reshape(-1)
    np.testing.assert_array_equal(flat[:2], [1, 1])  # Rollout 0's only one, copied.
    sub_rewards = losses.mgrpo_sub_rewards(
        jnp.ones(4), (main >= 1.0)[np.asarray(rollout_index)[flat]], variant="released"
    )
    np.testing.assert_allclose(sub_rewards, [1.0, 1.0, 0.1, 0.1], rtol=1e-6)
    sub_adv = losses.mgrpo_sub_advantages(sub_rewards, jnp.zeros(4, jnp.int32))
    np.testing.assert_allclose(sub_adv, np.array([1, 1, -1, -1]) * 0.45 / (0.45 + 1e-6), rtol=1e-6)
