"""GRAO, Group Relative Alignment Optimization (arXiv 2508.07750), as a pure loss.

For each prompt q with reference answer y and G samples o_i (shared/papers.md, section 4):

    J_explore(o_i) = (1/|o_i|) sum_t log pi(o_i,t | q, o_i,<t)
    J_imitate(y)   = (1/|y|)   sum_t log pi(y_t | q, y_<t)
    J(q) = (1/G) sum_i [ A_i J_explore(o_i) + beta A_y J_imitate(y)
                         + lam A_i (J_explore(o_i) - J_imitate(y)) ]        (Eq. 3)

with A the group z-scores of the rewards (Eq. 4, population std). The loss is -mean_q J(q).
Eq. 3 is rebuilt from the paper's gradient decomposition, which it agrees with; the
imitation term does not depend on i, so the 1/G average leaves it as beta A_y J_imitate(y).

Dimension letters: P prompts, G samples per prompt, T sample length, Y reference length.
"""

import jax
import jax.numpy as jnp

from medjax.losses import _arrays, groups


def grao_loss(
    sample_logps: jax.Array,
    sample_mask: jax.Array,
    sample_rewards: jax.Array,
    reference_logps: jax.Array,
    reference_mask: jax.Array,
    reference_rewards: jax.Array,
    *,
    num_generations: int,
    beta: float = 0.5,
    lam: float = 0.6,
    eps: float = 1e-6,
    reference_in_group: bool = True,
    use_exploration: bool = True,
    use_imitation: bool = True,
    use_alignment: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRAO loss: exploration, imitation and alignment terms weighted by group advantages.

    Args:
      sample_logps: [P*G, T] float per-token log-probs of the G samples of each prompt,
        prompt-major (rows p*G .. p*G+G-1 belong to prompt p).
      sample_mask: [P*G, T] 0/1 or bool, 1 on the samples' own tokens.
      sample_rewards: [P*G] float rewards of the samples; NaN marks an unscorable sample (left
        out of the group statistics, advantage 0).
      reference_logps: [P, Y] float per-token log-probs of each prompt's reference answer y.
      reference_mask: [P, Y] 0/1 or bool, 1 on y's tokens.
      reference_rewards: [P] float reward of each reference answer.
      num_generations: G.
      beta: weight of the imitation term (paper: 0.5).
      lam: weight of the alignment regulariser (paper: 0.6).
      eps: added to the population std of the group's rewards.
      reference_in_group: if True the group is {o_1..o_G, y} (G+1 rewards), as the paper
        computes A_y "in one group (o_i, y)"; if False the statistics come from the G samples
        alone and y is scored against them.
      use_exploration, use_imitation, use_alignment: ablation switches; a switched-off term
        is still reported in the metrics but left out of the loss.

    Returns:
      (loss, metrics). loss: scalar -mean over prompts of J(q), float32 (float64 for float64
      inputs); advantages carry no gradient. metrics: the mean over prompts of each weighted
      term (`exploration_term` = (1/G) sum_i A_i J_explore, `imitation_term` =
      beta A_y J_imitate, `alignment_term` = lam (1/G) sum_i A_i (J_explore - J_imitate)),
      `explore_logp_mean` and `imitate_logp_mean` (mean length-normalised log-likelihoods),
      `reference_advantage_mean`, and `loss_numerator` / `loss_denominator` (sum over
      prompts, number of prompts) for exact combination across microbatches.

    Raises:
      ValueError: when ranks or shapes disagree (the message names the arrays).
    """
    fn = "grao_loss"
    sample_logps = jnp.asarray(sample_logps)
    reference_logps = jnp.asarray(reference_logps)
    sample_rewards = jnp.asarray(sample_rewards)
    reference_rewards = jnp.asarray(reference_rewards)
    _arrays.require_rank("sample_logps", sample_logps, 2, fn)
    _arrays.require_rank("reference_logps", reference_logps, 2, fn)
    _arrays.require_shape(
        "sample_mask", jnp.asarray(sample_mask), sample_logps.shape, fn, "sample_logps"
    )
    _arrays.require_shape(
        "reference_mask", jnp.asarray(reference_mask), reference_logps.shape, fn, "reference_logps"
    )
    num_prompts = reference_logps.shape[0]
    if num_generations < 1 or sample_logps.shape[0] != num_prompts * num_generations:
        raise ValueError(
            f"{fn}: `sample_logps` has shape {tuple(sample_logps.shape)} but `reference_logps` has"
            f" shape {tuple(reference_logps.shape)}; with num_generations={num_generations} the"
            f" samples need {num_prompts} * {num_generations} rows."
        )
    _arrays.require_shape(
        "sample_rewards", sample_rewards, sample_logps.shape[:1], fn, "sample_logps[:, 0]"
    )
    _arrays.require_shape(
        "reference_rewards",
        reference_rewards,
        reference_logps.shape[:1],
        fn,
        "reference_logps[:, 0]",
    )

    dtype = _arrays.compute_dtype(sample_logps, reference_logps)
    j_explore = _length_normalised_logp(sample_logps, sample_mask, dtype)  # [P*G]
    j_imitate = _length_normalised_logp(reference_logps, reference_mask, dtype)  # [P]

    sample_adv, reference_adv = _grao_advantages(
        sample_rewards.astype(dtype),
        reference_rewards.astype(dtype),
        num_generations,
        eps=eps,
        reference_in_group=reference_in_group,
    )
    sample_adv = jax.lax.stop_gradient(sample_adv).reshape(num_prompts, num_generations)
    reference_adv = jax.lax.stop_gradient(reference_adv)
    j_explore = j_explore.reshape(num_prompts, num_generations)

    exploration = (sample_adv * j_explore).mean(-1)  # [P]
    imitation = beta * reference_adv * j_imitate  # [P]
    alignment = lam * (sample_adv * (j_explore - j_imitate[:, None])).mean(-1)  # [P]
    objective = (
        use_exploration * exploration + use_imitation * imitation + use_alignment * alignment
    )
    numerator = -objective.sum()
    denominator = jnp.asarray(num_prompts, dtype)
    metrics = {
        "exploration_term": exploration.mean(),
        "imitation_term": imitation.mean(),
        "alignment_term": alignment.mean(),
        "explore_logp_mean": j_explore.mean(),
        "imitate_logp_mean": j_imitate.mean(),
        "reference_advantage_mean": reference_adv.mean(),
        "loss_numerator": numerator,
        "loss_denominator": denominator,
    }
    return numerator / denominator, metrics


def _length_normalised_logp(logps: jax.Array, mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[N, L] log-probs -> [N] mean over unmasked tokens (0 for a row with none)."""
    mask = _arrays.as_mask(mask)
    # where, not multiply: padding may hold -inf, and 0 * -inf would be NaN.
    total = jnp.where(mask, logps.astype(dtype), 0.0).sum(-1)
    return total / jnp.maximum(mask.sum(-1).astype(dtype), 1.0)


def _grao_advantages(
    sample_rewards: jax.Array,
    reference_rewards: jax.Array,
    num_generations: int,
    *,
    eps: float,
    reference_in_group: bool,
) -> tuple[jax.Array, jax.Array]:
    """Group z-scores (population std + eps) of the samples and of the reference answer."""
    num_prompts = reference_rewards.shape[0]
    sample_ids = jnp.arange(num_prompts * num_generations) // num_generations
    if reference_in_group:
        values = jnp.concatenate([sample_rewards, reference_rewards])
        ids = jnp.concatenate([sample_ids, jnp.arange(num_prompts)])
        adv = groups.segment_zscores(values, ids, num_prompts, ddof=0, eps=eps)
        return adv[: sample_ids.shape[0]], adv[sample_ids.shape[0] :]
    moments = groups.segment_moments(sample_rewards, sample_ids, num_prompts, ddof=0)
    sample_adv = groups.segment_zscores(sample_rewards, sample_ids, num_prompts, ddof=0, eps=eps)
    reference_adv = (reference_rewards - moments.mean) / (moments.std + eps)
    return sample_adv, jnp.where(jnp.isfinite(reference_adv), reference_adv, 0.0)
