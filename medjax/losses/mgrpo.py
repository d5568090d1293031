"""M-GRPO (arXiv 2511.13288): hierarchical group-relative advantages for a main agent and its
tool-using sub-agents, with trajectory alignment to fixed-size batches.

For a query q with K rollouts of the main agent M, rollout k invokes the sub-agent S d_k times.
Main advantages are z-scores of R_M over the K rollouts (Eq. 9-10, population std). Before the
sub-agent's update every rollout is aligned to exactly d sub-trajectories (Eq. 11: duplicate
own sub-trajectories when short, drop some when long), and sub advantages are z-scores of R_S
pooled over all d*K aligned sub-trajectories of the query (Eq. 12-13). Both agents then
maximise the clipped surrogate (Eq. 14, 16): see `mgrpo_policy_loss`.

Where the paper and the released code (AQ-MedAI/MrlX) differ, the paper is the default and the
code's behaviour an option: the sub reward without r_expert (`mgrpo_sub_rewards`), and the
token-level ratio of the code versus the trajectory-level ratio of Eq. 15.

Dimension letters: Q queries, K rollouts per query, R = Q*K rollouts, N sub-trajectories,
d target sub-trajectories per rollout, T length.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medjax.losses import _arrays, groups
from medjax.losses.grpo import grpo_loss

MAIN_REWARD_WEIGHTS = (0.1, 0.9)  # alpha_1 (format), alpha_2 (correct): Eq. 4.
SUB_REWARD_WEIGHTS = (0.1, 0.4, 0.5)  # beta_1 (format), beta_2 (main correct), beta_3 (expert).
RELEASED_SUB_REWARD_WEIGHTS = (0.1, 0.9)  # MrlX: format, main correct; no r_expert.


def mgrpo_main_advantages(rewards: jax.Array, num_rollouts: int, *, eps: float = 1e-6) -> jax.Array:
    """Main-agent advantages: z-scores of R_M over each query's K rollouts (Eq. 9-10).

    Args:
      rewards: [Q*K] float rewards R_M, query-major (rows q*K .. q*K+K-1 are query q's
        rollouts). NaN marks an unscorable rollout: excluded, advantage 0.
      num_rollouts: K.
      eps: added to the population std.

    Returns:
      [Q*K] advantages (float32, or float64 for float64 rewards), applied to every token of
      the rollout's main trajectory.
    """
    rewards = jnp.asarray(rewards)
    _arrays.require_rank("rewards", rewards, 1, "mgrpo_main_advantages")
    if num_rollouts < 1 or rewards.shape[0] % num_rollouts:
        raise ValueError(
            f"mgrpo_main_advantages: `rewards` has shape {tuple(rewards.shape)}, which is not a"
            f" whole number of groups of num_rollouts={num_rollouts}."
        )
    num_queries = rewards.shape[0] // num_rollouts
    ids = jnp.arange(rewards.shape[0]) // num_rollouts
    return groups.segment_zscores(rewards, ids, num_queries, ddof=0, eps=eps)


class SubTrajectoryAlignment(NamedTuple):
    """Result of `align_sub_trajectories`.

    Attributes:
      indices: [R, d] int32 indices into the sub-trajectories; row r lists rollout r's d
        aligned sub-trajectories. Rows of rollouts without sub-trajectories are -1.
      rollout_valid: [R] bool, False for rollouts with zero sub-trajectories (reported, never
        invented: mask those rows out).
      counts: [R] int32 number of sub-trajectories each rollout had, d_k.
      num_duplicated: scalar int32, total copies added to short rollouts.
      num_dropped: scalar int32, total sub-trajectories dropped from long rollouts.
    """

    indices: jax.Array
    rollout_valid: jax.Array
    counts: jax.Array
    num_duplicated: jax.Array
    num_dropped: jax.Array


def align_sub_trajectories(
    rollout_index: jax.Array,
    target_count: int,
    key: jax.Array,
    *,
    num_rollouts: int | None = None,
) -> SubTrajectoryAlignment:
    """Gives every rollout exactly `target_count` sub-trajectories (M-GRPO Eq. 11).

    A rollout with d_k >= d keeps d of its own, chosen uniformly at random without replacement
    (d_k - d dropped). A rollout with 0 < d_k < d keeps all d_k and adds d - d_k copies of its
    own, chosen at random and spread as evenly as possible (each is copied floor or ceil of
    (d - d_k) / d_k times), which keeps duplicates from skewing the pooled mean and std more
    than needed. A rollout with d_k = 0 gets a row of -1 and `rollout_valid` False. Within a
    row indices are sorted, so copies sit next to their original.

    Jit-able when `num_rollouts` is given (shapes then depend only on static values).

    Args:
      rollout_index: [N] int, the rollout (in [0, R)) that produced each sub-trajectory;
        negative entries are padding and never chosen.
      target_count: d >= 1, e.g. from `choose_target_count`.
      key: a jax.random key.
      num_rollouts: R; defaults to max(rollout_index) + 1 (needs a concrete array).

    Returns:
      SubTrajectoryAlignment; `indices.reshape(-1)` gathers a fixed [R*d] sub-agent batch.

    Raises:
      ValueError: on a non-1-D index array, d < 1, or (concrete input) an index >= R.
    """
    fn = "align_sub_trajectories"
    rollout_index = jnp.asarray(rollout_index)
    _arrays.require_rank("rollout_index", rollout_index, 1, fn)
    if target_count < 1:
        raise ValueError(f"{fn}: target_count must be >= 1, got {target_count}.")
    concrete = not isinstance(rollout_index, jax.core.Tracer)
    if num_rollouts is None:
        if not concrete:
            raise ValueError(f"{fn}: pass `num_rollouts` when calling under jit.")
        num_rollouts = int(rollout_index.max()) + 1 if rollout_index.size else 0
    elif concrete and rollout_index.size and int(rollout_index.max()) >= num_rollouts:
        raise ValueError(
            f"{fn}: `rollout_index` holds {int(rollout_index.max())}, outside [0, {num_rollouts})"
            f" for num_rollouts={num_rollouts}."
        )
    num_subs = rollout_index.shape[0]
    valid = rollout_index >= 0
    # Padding sorts after every rollout; a random key per sub-trajectory breaks ties, so each
    # rollout's sub-trajectories come out in a uniformly random order.
    owner = jnp.where(valid, rollout_index, num_rollouts)
    noise = jax.random.uniform(key, (num_subs,))
    _, _, order = jax.lax.sort((owner, noise, jnp.arange(num_subs, dtype=jnp.int32)), num_keys=2)
    counts = jnp.zeros((num_rollouts,), jnp.int32).at[owner].add(1, mode="drop")
    starts = jnp.cumsum(counts) - counts
    slot = jnp.arange(target_count, dtype=jnp.int32)
    # Slot j of rollout r takes the (j mod d_r)-th of its shuffled sub-trajectories: the first
    # d of them when d_r >= d, every one then copies in shuffled order when d_r < d.
    pos = starts[:, None] + slot[None, :] % jnp.maximum(counts, 1)[:, None]
    rollout_valid = counts > 0
    picked = order[jnp.clip(pos, 0, max(num_subs - 1, 0))] if num_subs else pos
    indices = jnp.where(rollout_valid[:, None], jnp.sort(picked, axis=-1), -1)
    duplicated = jnp.where(rollout_valid, jnp.maximum(target_count - counts, 0), 0).sum()
    dropped = jnp.maximum(counts - target_count, 0).sum()
    return SubTrajectoryAlignment(
        indices.astype(jnp.int32), rollout_valid, counts, duplicated, dropped
    )


def choose_target_count(counts, quantile: float = 0.99) -> int:
    """The smallest d with P(d_k <= d) >= quantile over observed invocation counts (Eq. 11).

    Args:
      counts: [R] ints, how many sub-trajectories each observed rollout produced.
      quantile: the coverage the paper sets to about 0.99.

    Returns:
      d as a Python int, at least 1 (a target of 0 would leave the sub-agent nothing to train).
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(
            f"choose_target_count: `counts` must be a non-empty [R] array, got {counts.shape}."
        )
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"choose_target_count: quantile must be in (0, 1], got {quantile}.")
    ordered = np.sort(counts)
    # The k-th smallest count with k = ceil(quantile * R) covers a `quantile` fraction.
    k = int(np.ceil(quantile * ordered.size - 1e-9))
    return max(int(ordered[max(k, 1) - 1]), 1)


def mgrpo_sub_advantages(
    sub_rewards: jax.Array,
    query_index: jax.Array,
    *,
    num_queries: int | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    """Sub-agent advantages pooled over each query's d*K aligned sub-trajectories (Eq. 12-13).

    Args:
      sub_rewards: [N] float rewards R_S of the aligned sub-trajectories (duplicates included,
        as the paper pools them). NaN marks an unscorable one: excluded, advantage 0.
      query_index: [N] int query of each sub-trajectory; negative marks padding (advantage 0).
      num_queries: Q; defaults to max(query_index) + 1 (needs a concrete array).
      eps: added to the population std.

    Returns:
      [N] advantages (float32, or float64 for float64 rewards).
    """
    fn = "mgrpo_sub_advantages"
    sub_rewards = jnp.asarray(sub_rewards)
    query_index = jnp.asarray(query_index)
    _arrays.require_rank("sub_rewards", sub_rewards, 1, fn)
    _arrays.require_shape("query_index", query_index, sub_rewards.shape, fn, "sub_rewards")
    if num_queries is None:
        if isinstance(query_index, jax.core.Tracer):
            raise ValueError(f"{fn}: pass `num_queries` when calling under jit.")
        num_queries = int(query_index.max()) + 1 if query_index.size else 0
    return groups.segment_zscores(sub_rewards, query_index, max(num_queries, 1), ddof=0, eps=eps)


def mgrpo_main_rewards(
    format_reward: jax.Array,
    correct_reward: jax.Array,
    *,
    weights: tuple[float, float] = MAIN_REWARD_WEIGHTS,
) -> jax.Array:
    """R_M = a1 r_format + a2 r_correct when the format is valid, else 0 (Eq. 4).

    With binary rewards and a = (0.1, 0.9) this is also the released code's scoring: 1.0 for
    a correct answer, 0.1 for a well-formed wrong one, 0 for a malformed one.

    Args:
      format_reward: [R] float in [0, 1]; 0 means the format is invalid.
      correct_reward: [R] float in [0, 1], the answer's correctness.
      weights: (a1, a2).

    Returns:
      [R] float32 rewards.
    """
    format_reward = jnp.asarray(format_reward, jnp.float32)
    correct_reward = jnp.asarray(correct_reward, jnp.float32)
    _arrays.require_shape(
        "correct_reward", correct_reward, format_reward.shape, "mgrpo_main_rewards", "format_reward"
    )
    a1, a2 = weights
    return jnp.where(format_reward > 0, a1 * format_reward + a2 * correct_reward, 0.0)


def mgrpo_sub_rewards(
    format_reward: jax.Array,
    main_correct_reward: jax.Array,
    expert_reward: jax.Array | None = None,
    *,
    variant: str = "paper",
    weights: tuple[float, ...] | None = None,
) -> jax.Array:
    """R_S for each sub-trajectory, 0 when its format is invalid (Eq. 5).

    * "paper": b1 r_format + b2 r_correct^main + b3 r_expert, b = (0.1, 0.4, 0.5), where
      r_expert is an LLM rating of how well the subtask was executed.
    * "released": the AQ-MedAI/MrlX scoring, which has no r_expert: b1 r_format +
      b2 r_correct^main with b = (0.1, 0.9), i.e. 0.1 unless the main answer is correct.

    Args:
      format_reward: [N] float in [0, 1] of the sub-trajectory; 0 means invalid.
      main_correct_reward: [N] float in [0, 1], the parent main rollout's correctness.
      expert_reward: [N] float in [0, 1]; required by "paper", must be None for "released".
      variant: "paper" or "released".
      weights: overrides the variant's default weights (3 for "paper", 2 for "released").

    Returns:
      [N] float32 rewards.
    """
    fn = "mgrpo_sub_rewards"
    _arrays.require_choice("variant", variant, ("paper", "released"), fn)
    format_reward = jnp.asarray(format_reward, jnp.float32)
    main_correct_reward = jnp.asarray(main_correct_reward, jnp.float32)
    _arrays.require_shape(
        "main_correct_reward", main_correct_reward, format_reward.shape, fn, "format_reward"
    )
    if variant == "paper":
        if expert_reward is None:
            raise ValueError(f"{fn}: variant='paper' needs `expert_reward` (r_expert), got None.")
        expert_reward = jnp.asarray(expert_reward, jnp.float32)
        _arrays.require_shape(
            "expert_reward", expert_reward, format_reward.shape, fn, "format_reward"
        )
        b1, b2, b3 = SUB_REWARD_WEIGHTS if weights is None else weights
        value = b1 * format_reward + b2 * main_correct_reward + b3 * expert_reward
    else:
        if expert_reward is not None:
            raise ValueError(
                f"{fn}: variant='released' has no r_expert term; pass expert_reward=None."
            )
        b1, b2 = RELEASED_SUB_REWARD_WEIGHTS if weights is None else weights
        value = b1 * format_reward + b2 * main_correct_reward
    return jnp.where(format_reward > 0, value, 0.0)


def mgrpo_policy_loss(
    per_token_logps: jax.Array,
    old_per_token_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    ratio_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = 0.28,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped surrogate both M-GRPO agents maximise (Eq. 14 and 16), as a loss.

    The mean over trajectories of each trajectory's token-mean surrogate (`grpo_loss` with
    loss_type "grpo"), no KL (the paper writes none; the released scripts set its
    coefficients to 0). Defaults follow the released scripts: token-level ratio,
    eps_clip 0.2 and eps_clip_high 0.28.

    Args:
      per_token_logps, old_per_token_logps, advantages, mask: as in `grpo_loss`; the rows
        are main trajectories or aligned sub-trajectories.
      ratio_level: "token" (released code) or "trajectory" (Eq. 15: the likelihood ratio of
        the whole trajectory, exp of the summed token log-ratios).
      epsilon_low, epsilon_high: clip range.

    Returns:
      (loss, metrics) as `grpo_loss` returns them.
    """
    _arrays.require_choice("ratio_level", ratio_level, ("token", "trajectory"), "mgrpo_policy_loss")
    return grpo_loss(
        per_token_logps,
        old_per_token_logps,
        advantages,
        mask,
        loss_type="grpo",
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        importance_sampling_level=ratio_level,
    )
