"""medjax.losses.sft_loss by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import losses


def test_token_mean_nll_by_hand():
    logps = jnp.array([[-1.0, -2.0, -jnp.inf], [-0.5, jnp.nan, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    loss, m = losses.sft_loss(logps, mask)
    np.testing.assert_allclose(loss, (1.0 + 2.0 + 0.5) / 3, rtol=1e-6)
    assert float(m["num_tokens"]) == 3.0
    np.testing.assert_allclose(m["loss_numerator"], 3.5, rtol=1e-6)
    grad = jax.grad(lambda x: losses.sft_loss(x, mask)[0])(logps)
    np.testing.assert_allclose(grad, [[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]], rtol=1e-6)
    assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0.0)


def test_empty_mask_is_zero_not_nan():
    loss, _ = losses.sft_loss(jnp.ones((2, 2)), jnp.zeros((2, 2)))
    assert float(loss) == 0.0


def test_bf16_in_float32_out_and_jit():
    logps = jnp.array([[-1.0, -2.0]], jnp.bfloat16)
    loss, _ = jax.jit(losses.sft_loss)(logps, jnp.ones((1, 2)))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, 1.5, rtol=1e-6)


def test_shape_errors():
    with pytest.raises(
        ValueError, match=r"`mask` has shape \(2, 2\) but `logps` has shape \(2, 3\)"
    ):
        losses.sft_loss(jnp.zeros((2, 3)), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"`logps` must have rank 2, got shape \(3,\)"):
        losses.sft_loss(jnp.zeros(3), jnp.zeros(3))
