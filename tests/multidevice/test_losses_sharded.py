"""The losses under jit with inputs sharded over a mesh of 8 CPU devices equal the
single-device result. Not bitwise: sharded reductions add in another order, so float32
results agree to the 1e-5 of simple float32 functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax import losses


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    return jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _batch(b=16, t=12, seed=0):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.1, 3.0, (b, t)).astype(np.float32)
    old = logps + rng.normal(0, 0.2, (b, t)).astype(np.float32)
    ref = logps + rng.normal(0, 0.2, (b, t)).astype(np.float32)
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None]).astype(np.float32)
    rewards = rng.choice([0.0, 0.5, 1.0], b).astype(np.float32)
    return logps, old, ref, mask, rewards


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_and_grad_sharded_equal_unsharded(mesh, loss_type):
    logps, old, ref, mask, rewards = _batch()

    def step(logps, old, ref, mask, rewards):
        adv = losses.group_advantages(rewards, 4)

        def f(lp):
            return losses.grpo_loss(
                lp, old, adv, mask, ref_per_token_logps=ref, beta=0.04, loss_type=loss_type
            )

        (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logps)
        return loss, metrics, grad

    want = jax.jit(step)(logps, old, ref, mask, rewards)
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    vec = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(x, rows) for x in (logps, old, ref, mask)] + [
        jax.device_put(rewards, vec)
    ]
    got = jax.jit(step, out_shardings=(None, None, rows))(*args)
    assert got[2].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-9)
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-5, err_msg=k)


def test_grao_and_mgrpo_sharded_equal_unsharded(mesh):
    logps, _, _, mask, rewards = _batch()
    y_logps, y_mask, y_rewards = logps[:4, :8], mask[:4, :8], rewards[:4]

    def step(logps, mask, rewards, y_logps, y_mask, y_rewards):
        grao, _ = losses.grao_loss(
            logps, mask, rewards, y_logps, y_mask, y_rewards, num_generations=4
        )
        main = losses.mgrpo_main_advantages(rewards, 8)
        sub = losses.mgrpo_sub_advantages(rewards, jnp.arange(16) // 8, num_queries=2)
        return grao, main, sub

    want = jax.jit(step)(logps, mask, rewards, y_logps, y_mask, y_rewards)
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    vec = NamedSharding(mesh, P(("data", "fsdp")))
    prompt_rows = NamedSharding(mesh, P("data", None))  # 4 prompts over the 4-way data axis.
    prompt_vec = NamedSharding(mesh, P("data"))
    shardings = (rows, rows, vec, prompt_rows, prompt_rows, prompt_vec)
    arrays = (logps, mask, rewards, y_logps, y_mask, y_rewards)
    args = [jax.device_put(x, s) for x, s in zip(arrays, shardings, strict=True)]
    got = jax.jit(step)(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
