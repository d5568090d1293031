"""Group statistics for group-relative advantages.

Every group-relative method in medjax (GRPO, GRAO, M-GRPO's main and sub agents) z-scores
rewards within a group: the G completions of a prompt, the K rollouts of a query, or the d*K
aligned sub-trajectories of a query. This module does that once, over segment ids, so groups
may be ragged and NaN rewards (unscorable episodes) can be left out of the statistics.

Dimension letters: N rewards, S segments (groups).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from medjax.losses import _arrays


class SegmentMoments(NamedTuple):
    """Per-segment statistics of the valid (non-NaN, id >= 0) values.

    Attributes:
      mean: [S] mean of the valid values; 0 for a segment with none.
      std: [S] standard deviation with the requested ddof; NaN where count <= ddof.
      count: [S] number of valid values.
    """

    mean: jax.Array
    std: jax.Array
    count: jax.Array


def segment_moments(
    values: jax.Array, segment_ids: jax.Array, num_segments: int, *, ddof: int = 0
) -> SegmentMoments:
    """Mean, standard deviation and count of `values` per segment, NaNs left out.

    Args:
      values: [N] float array. NaN entries are excluded from every statistic.
      segment_ids: [N] int array in [0, num_segments); negative ids mark padding.
      num_segments: S, static.
      ddof: delta degrees of freedom of the std (0: population, 1: Bessel-corrected).

    Returns:
      SegmentMoments of [S] arrays, in the float dtype of `values` (at least float32).
    """
    dtype = _arrays.compute_dtype(values)
    values = values.astype(dtype)
    valid = ~jnp.isnan(values) & (segment_ids >= 0)
    ids = jnp.where(valid, segment_ids, num_segments)  # Out of range: dropped by segment_sum.
    count = jax.ops.segment_sum(valid.astype(dtype), ids, num_segments)
    total = jax.ops.segment_sum(jnp.where(valid, values, 0.0), ids, num_segments)
    mean = total / jnp.maximum(count, 1.0)
    # Two passes (sum of squared deviations from the mean) for numerical stability.
    dev = jnp.where(valid, values - mean[jnp.clip(segment_ids, 0, num_segments - 1)], 0.0)
    sq = jax.ops.segment_sum(dev * dev, ids, num_segments)
    dof = count - ddof
    std = jnp.where(dof > 0, jnp.sqrt(sq / jnp.maximum(dof, 1.0)), jnp.nan)
    return SegmentMoments(mean, std, count)


def segment_zscores(
    values: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
    *,
    ddof: int,
    eps: float,
    scale: str = "group",
) -> jax.Array:
    """Group-relative advantages (value - group mean) / (std + eps).

    Args:
      values: [N] float rewards; NaN marks an unscorable one.
      segment_ids: [N] int group of each reward; negative ids mark padding.
      num_segments: S, static.
      ddof: ddof of the std.
      eps: added to the std (not to the variance), as TRL and the papers do.
      scale: "group" divides by the group's std, "batch" by the std of every valid value
        (the mean subtracted is still the group's, as in TRL), "none" does not divide.

    Returns:
      [N] advantages in the float dtype of `values` (at least float32). Entries whose reward
      is NaN, whose id is negative, or whose std is undefined (count <= ddof) are exactly 0.
    """
    _arrays.require_choice("scale", scale, ("group", "batch", "none"), "segment_zscores")
    moments = segment_moments(values, segment_ids, num_segments, ddof=ddof)
    safe_ids = jnp.clip(segment_ids, 0, num_segments - 1)
    centred = values.astype(moments.mean.dtype) - moments.mean[safe_ids]
    if scale == "group":
        adv = centred / (moments.std[safe_ids] + eps)
    elif scale == "batch":
        batch_std = segment_moments(values, jnp.where(segment_ids >= 0, 0, -1), 1, ddof=ddof).std
        adv = centred / (batch_std[0] + eps)
    else:
        adv = centred
    return jnp.where(jnp.isfinite(adv) & (segment_ids >= 0), adv, 0.0)
