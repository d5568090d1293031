"""The GRPO family of policy losses: group advantages, KL estimators and the clipped surrogate.

Conventions follow TRL 1.16's `GRPOTrainer` (the oracle in tests/golden), so that a run in
medjax and a run in TRL with the same settings optimise the same number:

* rows are prompt-major: rows g*G .. g*G+G-1 are the G completions of prompt g;
* advantages are group-relative: group mean; std with ddof=1 over the group or the batch;
  divided by std + 1e-4 unless the scale is "none";
* the per-token surrogate is -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), plus beta times
  a KL estimate against the reference policy;
* the loss types differ only in how per-token losses are reduced (see `grpo_loss`).

Dimension letters: B sequences (P prompts x G completions), G group size, T completion length.
"""

import jax
import jax.numpy as jnp

from medjax.losses import _arrays, groups

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "trajectory")
KL_ESTIMATORS = ("k1", "k2", "k3")
REWARD_SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: jax.Array,
    num_generations: int,
    *,
    scale: str = "group",
    ddof: int = 1,
    eps: float = 1e-4,
) -> jax.Array:
    """Group-relative advantages of prompt-major rewards.

    A_i = (r_i - mean_g) / (std + eps), where mean_g is the mean of the group of row i and
    std is the group's (`scale="group"`) or the whole batch's (`scale="batch"`; the mean is
    still the group's, as in TRL). `scale="none"` gives r_i - mean_g (Dr. GRPO).

    Args:
      rewards: [B] float array, B = P * G, prompt-major. NaN marks an unscorable completion:
        it is left out of the mean and std and gets advantage 0.
      num_generations: G, completions per prompt.
      scale: "group", "batch" or "none".
      ddof: 1 is TRL's Bessel-corrected std; 0 the population std of the M-GRPO and GRAO
        papers. A group with at most `ddof` valid rewards has an undefined std: its
        advantages are 0.
      eps: added to the std.

    Returns:
      [B] advantages, float32 (float64 for float64 rewards), not reduced.
    """
    rewards = jnp.asarray(rewards)
    _arrays.require_rank("rewards", rewards, 1, "group_advantages")
    _arrays.require_choice("scale", scale, REWARD_SCALES, "group_advantages")
    num_rows = rewards.shape[0]
    if num_generations < 1 or num_rows % num_generations:
        raise ValueError(
            f"group_advantages: `rewards` has shape {tuple(rewards.shape)}, which is not a whole"
            f" number of groups of num_generations={num_generations}."
        )
    group_ids = jnp.arange(num_rows) // num_generations
    return groups.segment_zscores(
        rewards, group_ids, num_rows // num_generations, ddof=ddof, eps=eps, scale=scale
    )


def kl_penalty(
    per_token_logps: jax.Array, ref_per_token_logps: jax.Array, *, estimator: str = "k3"
) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    With d = log pi_ref - log pi: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (Schulman's
    unbiased, non-negative estimator; TRL's only choice).

    Args:
      per_token_logps: [B, T] float log-probs of the sampled tokens under the policy.
      ref_per_token_logps: [B, T] float log-probs of the same tokens under the reference.
      estimator: "k1", "k2" or "k3".

    Returns:
      [B, T] per-token KL estimates, not masked and not reduced.
    """
    _arrays.require_choice("estimator", estimator, KL_ESTIMATORS, "kl_penalty")
    delta = ref_per_token_logps - per_token_logps
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta * delta
    return jnp.exp(delta) - delta - 1.0


def grpo_loss(
    per_token_logps: jax.Array,
    old_per_token_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    ref_per_token_logps: jax.Array | None = None,
    loss_type: str = "grpo",
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    max_completion_length: int | None = None,
    kl_estimator: str = "k3",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-surrogate policy loss of the GRPO family (GRPO, BNPO, Dr. GRPO, DAPO, GSPO).

    Per token: l = -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) + beta KL, with
    r = exp(log pi - log pi_old) at the chosen importance-sampling level and r first capped
    at `delta` when given. The per-token losses are reduced by `loss_type`:

    * "grpo": mean over sequences of each sequence's token mean;
    * "bnpo": mean over all unmasked tokens;
    * "dr_grpo": sum over tokens / (B * max_completion_length);
    * "dapo": sum over tokens / number of unmasked tokens. For one batch this equals bnpo;
      across microbatches, combine `loss_numerator` / `loss_denominator` from the metrics
      to get DAPO's global token mean exactly.

    Args:
      per_token_logps: [B, T] float log pi_theta of each completion token (any float dtype;
        computed in float32 or wider). Rows are prompt-major.
      old_per_token_logps: [B, T] float log-probs under the policy that sampled, or None for
        exactly on-policy updates (then the ratio is 1 with the policy's gradient).
      advantages: [B] per-sequence or [B, T] per-token float advantages (constants).
      mask: [B, T] 0/1 or bool, 1 on the policy's own completion tokens.
      ref_per_token_logps: [B, T] float reference-policy log-probs; required when beta != 0.
      loss_type: "grpo", "bnpo", "dr_grpo" or "dapo".
      beta: KL coefficient.
      epsilon_low: lower clip, r >= 1 - epsilon_low.
      epsilon_high: upper clip, r <= 1 + epsilon_high; defaults to epsilon_low (DAPO's
        clip-higher sets it larger).
      importance_sampling_level: "token" (per-token ratios), "sequence" (GSPO: exp of the
        token-mean log-ratio of the sequence) or "trajectory" (M-GRPO Eq. 15: exp of the
        summed log-ratio, the likelihood ratio of the whole trajectory).
      delta: if set, the unclipped ratio is capped at delta (INTELLECT-2's two-sided clip).
      max_completion_length: Dr. GRPO's constant normaliser; defaults to T.
      kl_estimator: "k1", "k2" or "k3" (see `kl_penalty`).

    Returns:
      (loss, metrics). loss: scalar, float32 (float64 for float64 inputs). metrics: scalars
      `loss_numerator` and `loss_denominator` (loss = numerator / denominator; sum both over
      microbatches to combine exactly), `num_tokens`, `num_sequences` (rows with a token),
      token means `clip_low_fraction`, `clip_high_fraction`, `clip_region_fraction`,
      `ratio_mean` and, when a reference is given, `kl_mean` (weight by `num_tokens` to
      combine).

    Raises:
      ValueError: on ranks or shapes that do not match (the message names them), on an
        unknown option, or on beta != 0 without reference log-probs.
    """
    fn = "grpo_loss"
    per_token_logps = jnp.asarray(per_token_logps)
    _arrays.require_rank("per_token_logps", per_token_logps, 2, fn)
    shape = per_token_logps.shape
    _arrays.require_shape("mask", jnp.asarray(mask), shape, fn, "per_token_logps")
    for name, x in (
        ("old_per_token_logps", old_per_token_logps),
        ("ref_per_token_logps", ref_per_token_logps),
    ):
        if x is not None:
            _arrays.require_shape(name, jnp.asarray(x), shape, fn, "per_token_logps")
    advantages = jnp.asarray(advantages)
    if advantages.shape not in (shape[:1], shape):
        raise ValueError(
            f"{fn}: `advantages` has shape {tuple(advantages.shape)}; expected [B]={shape[:1]}"
            f" or [B, T]={tuple(shape)} to match `per_token_logps`."
        )
    _arrays.require_choice("loss_type", loss_type, LOSS_TYPES, fn)
    _arrays.require_choice(
        "importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS, fn
    )
    _arrays.require_choice("kl_estimator", kl_estimator, KL_ESTIMATORS, fn)
    use_kl = not (isinstance(beta, int | float) and beta == 0)
    if use_kl and ref_per_token_logps is None:
        raise ValueError(f"{fn}: beta={beta} needs `ref_per_token_logps`, which is None.")

    dtype = _arrays.compute_dtype(per_token_logps, old_per_token_logps, ref_per_token_logps)
    mask = _arrays.as_mask(mask)
    fmask = mask.astype(dtype)
    # Zero the inputs at masked positions first, so padding (-inf, NaN) can reach neither the
    # loss nor, through a 0 * inf in the backward pass, the gradient.
    logps = jnp.where(mask, per_token_logps.astype(dtype), 0.0)
    if old_per_token_logps is None:
        old = jax.lax.stop_gradient(logps)
    else:
        old = jnp.where(mask, jnp.asarray(old_per_token_logps).astype(dtype), 0.0)
    adv = jax.lax.stop_gradient(advantages.astype(dtype))
    if adv.ndim == 1:
        adv = adv[:, None]

    tokens_per_seq = fmask.sum(-1)
    seq_len = jnp.maximum(tokens_per_seq, 1.0)
    num_tokens = tokens_per_seq.sum()
    log_ratio = logps - old  # Exactly 0 at masked positions.
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = log_ratio.sum(-1, keepdims=True) / seq_len[:, None]
    else:
        log_w = log_ratio.sum(-1, keepdims=True)
    ratio = jnp.exp(log_w)
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + eps_high)
    unclipped = ratio if delta is None else jnp.minimum(ratio, delta)
    per_token = -jnp.minimum(unclipped * adv, clipped * adv)

    metrics = {}
    if ref_per_token_logps is not None:
        ref = jnp.where(mask, jnp.asarray(ref_per_token_logps).astype(dtype), 0.0)
        kl = kl_penalty(logps, ref, estimator=kl_estimator)
        metrics["kl_mean"] = _token_mean(kl, fmask, num_tokens)
        if use_kl:
            per_token = per_token + beta * kl
    per_token = jnp.where(mask, per_token, 0.0)

    num_rows = shape[0]
    if loss_type == "grpo":
        numerator = (per_token.sum(-1) / seq_len).sum()
        denominator = jnp.asarray(num_rows, dtype)
    elif loss_type == "dr_grpo":
        length = shape[1] if max_completion_length is None else max_completion_length
        numerator = per_token.sum()
        denominator = jnp.asarray(num_rows * length, dtype)
    else:  # bnpo, dapo
        numerator = per_token.sum()
        denominator = jnp.maximum(num_tokens, 1.0)
    loss = numerator / denominator

    ratio_bt = jnp.broadcast_to(ratio, shape)
    adv_bt = jnp.broadcast_to(adv, shape)
    low = (ratio_bt < 1.0 - epsilon_low) & (adv_bt < 0)
    high = (ratio_bt > 1.0 + eps_high) & (adv_bt > 0)
    metrics.update(
        loss_numerator=numerator,
        loss_denominator=denominator,
        num_tokens=num_tokens,
        num_sequences=(tokens_per_seq > 0).sum().astype(dtype),
        clip_low_fraction=_token_mean(low.astype(dtype), fmask, num_tokens),
        clip_high_fraction=_token_mean(high.astype(dtype), fmask, num_tokens),
        clip_region_fraction=_token_mean((low | high).astype(dtype), fmask, num_tokens),
        ratio_mean=_token_mean(jax.lax.stop_gradient(ratio_bt), fmask, num_tokens),
    )
    return loss, metrics


def _token_mean(x: jax.Array, fmask: jax.Array, num_tokens: jax.Array) -> jax.Array:
    return jnp.where(fmask > 0, x, 0.0).sum() / jnp.maximum(num_tokens, 1.0)
