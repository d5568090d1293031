"""Supervised fine-tuning loss with the same conventions as the RL losses."""

import jax
import jax.numpy as jnp

from medjax.losses import _arrays


def sft_loss(logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean negative log-likelihood of the policy's own tokens.

    Args:
      logps: [B, T] float log-probs of the target tokens.
      mask: [B, T] 0/1 or bool, 1 on tokens the policy should learn (never tool output or
        patient text).

    Returns:
      (loss, metrics). loss: scalar -sum(logps * mask) / max(sum(mask), 1), float32 (float64
      for float64 input). metrics: `loss_numerator`, `loss_denominator` (sum both over
      microbatches for the exact global token mean) and `num_tokens`.
    """
    logps = jnp.asarray(logps)
    _arrays.require_rank("logps", logps, 2, "sft_loss")
    _arrays.require_shape("mask", jnp.asarray(mask), logps.shape, "sft_loss", "logps")
    dtype = _arrays.compute_dtype(logps)
    mask = _arrays.as_mask(mask)
    numerator = -jnp.where(mask, logps.astype(dtype), 0.0).sum()
    num_tokens = mask.sum().astype(dtype)
    denominator = jnp.maximum(num_tokens, 1.0)
    metrics = {
        "loss_numerator": numerator,
        "loss_denominator": denominator,
        "num_tokens": num_tokens,
    }
    return numerator / denominator, metrics
