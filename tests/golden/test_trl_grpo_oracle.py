"""grpo_loss and group_advantages against TRL 1.16.0's own numbers (testdata/README.md)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import losses

ORACLE = np.load(pathlib.Path(__file__).parent / "testdata" / "trl_grpo_loss.npz")
CASES = json.loads(str(ORACLE["cases_json"]))


def _array(case, name):
    return ORACLE[f"{case['key']}/{name}"]


def _loss_fn(case, dtype):
    def fn(logps):
        loss, _ = losses.grpo_loss(
            logps,
            jnp.asarray(_array(case, "old"), dtype),
            jnp.asarray(_array(case, "advantages"), dtype),
            jnp.asarray(_array(case, "mask"), dtype),
            ref_per_token_logps=jnp.asarray(_array(case, "ref"), dtype),
            loss_type=case["loss_type"],
            beta=case["beta"],
            epsilon_low=case["epsilon_low"],
            epsilon_high=case["epsilon_high"],
            importance_sampling_level=case["importance_sampling_level"],
            delta=case["delta"],
            max_completion_length=case["max_completion_length"],
        )
        return loss

    return fn


def test_oracle_covers_every_loss_type_scale_and_beta():
    assert len(CASES) == 48
    assert {c["loss_type"] for c in CASES} == {"grpo", "bnpo", "dr_grpo", "dapo"}
    assert {c["scale_rewards"] for c in CASES} == {"group", "batch", "none"}
    assert {c["beta"] for c in CASES} == {0.0, 0.04}
    assert {c["epsilon_high"] for c in CASES} == {0.2, 0.28}


@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_loss_and_grad_float64(case, x64):
    loss, grad = jax.jit(jax.value_and_grad(_loss_fn(case, jnp.float64)))(
        jnp.asarray(_array(case, "logps"), jnp.float64)
    )
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(float(loss), float(_array(case, "loss")), rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(grad), _array(case, "grad"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_loss_and_grad_float32(case):
    loss, grad = jax.jit(jax.value_and_grad(_loss_fn(case, jnp.float32)))(
        jnp.asarray(_array(case, "logps"), jnp.float32)
    )
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(_array(case, "loss")), rtol=1e-4, atol=0)
    # Elements that cancel to ~1e-7 (the k3 KL gradient near ref == logp) carry float32
    # rounding of the operands, ~1e-7 * |logp|: an absolute floor there, 1e-4 relative above.
    np.testing.assert_allclose(np.asarray(grad), _array(case, "grad"), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_group_advantages(case, x64):
    adv = losses.group_advantages(
        jnp.asarray(_array(case, "rewards"), jnp.float64),
        case["num_generations"],
        scale=case["scale_rewards"],
    )
    # TRL rounds its std through float32: its advantages are float64 to ~2e-8 relative.
    np.testing.assert_allclose(np.asarray(adv), _array(case, "advantages"), rtol=1e-6, atol=0)
