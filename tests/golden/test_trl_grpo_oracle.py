"""grpo_loss and group_advantages against TRL 1.16.0's own numbers (testdata/README.md)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import losses

TESTDATA = pathlib.Path(__file__).parent / "testdata"
ORACLE = np.load(TESTDATA / "trl_grpo_loss.npz")
CASES = json.loads(str(ORACLE["cases_json"]))
# GSPO (sequence level) and two-sided (delta) cases, written by make_trl_grpo_oracle.py.
SEQ_DELTA = np.load(TESTDATA / "trl_grpo_loss_seq_delta.npz")
SEQ_DELTA_CASES = json.loads(str(SEQ_DELTA["cases_json"]))
ALL_CASES = [(ORACLE, c) for c in CASES] + [(SEQ_DELTA, c) for c in SEQ_DELTA_CASES]
ALL_IDS = [c["key"] for c in CASES] + [f"seq_delta-{c['key']}" for c in SEQ_DELTA_CASES]


def _array(oracle, case, name):
    return oracle[f"{case['key']}/{name}"]


def _loss_fn(oracle, case, dtype):
    def fn(logps):
        loss, _ = losses.grpo_loss(
            logps,
            jnp.asarray(_array(oracle, case, "old"), dtype),
            jnp.asarray(_array(oracle, case, "advantages"), dtype),
            jnp.asarray(_array(oracle, case, "mask"), dtype),
            ref_per_token_logps=jnp.asarray(_array(oracle, case, "ref"), dtype),
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


def test_seq_delta_oracle_covers_sequence_level_and_delta():
    assert len(SEQ_DELTA_CASES) == 48
    kinds = {(c["importance_sampling_level"], c["delta"]) for c in SEQ_DELTA_CASES}
    assert kinds == {(level, d) for level in ("token", "sequence") for d in (1.5, 2.0)} | {
        ("sequence", None)
    }
    for level, delta in kinds:
        subset = [
            c
            for c in SEQ_DELTA_CASES
            if c["importance_sampling_level"] == level and c["delta"] == delta
        ]
        assert {c["loss_type"] for c in subset} == {"grpo", "bnpo", "dr_grpo", "dapo"}
        assert {c["beta"] for c in subset} == {0.0, 0.04}
        assert {c["epsilon_high"] for c in subset} == {0.2, 0.28}
    assert not any(c["use_bias_correction_kl"] for c in SEQ_DELTA_CASES)
    # Ragged rows in every case; a fully masked row in half of them.
    assert sum(not _array(SEQ_DELTA, c, "mask").any(-1).all() for c in SEQ_DELTA_CASES) == 24


@pytest.mark.parametrize("case", SEQ_DELTA_CASES, ids=[c["key"] for c in SEQ_DELTA_CASES])
def test_seq_delta_oracle_reaches_every_clip_branch(case):
    """Some unmasked token is inside the clip range, clipped low, clipped high, capped by delta."""
    mask = _array(SEQ_DELTA, case, "mask") > 0
    log_ratio = _array(SEQ_DELTA, case, "logps") - _array(SEQ_DELTA, case, "old")
    if case["importance_sampling_level"] == "sequence":
        seq = (log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
        log_ratio = np.broadcast_to(seq[:, None], mask.shape)
    ratio = np.exp(log_ratio)[mask]
    adv = np.broadcast_to(_array(SEQ_DELTA, case, "advantages")[:, None], mask.shape)[mask]
    low, high = 1 - case["epsilon_low"], 1 + case["epsilon_high"]
    assert ((ratio >= low) & (ratio <= high) & (adv != 0)).any()
    assert ((ratio < low) & (adv < 0)).any()
    assert ((ratio > high) & (adv > 0)).any()
    if case["delta"] is not None:
        assert ((ratio > case["delta"]) & (adv < 0)).any()


@pytest.mark.parametrize(("oracle", "case"), ALL_CASES, ids=ALL_IDS)
def test_loss_and_grad_float64(oracle, case, x64):
    loss, grad = jax.jit(jax.value_and_grad(_loss_fn(oracle, case, jnp.float64)))(
        jnp.asarray(_array(oracle, case, "logps"), jnp.float64)
    )
    assert loss.dtype == jnp.float64
    want = float(_array(oracle, case, "loss"))
    np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(grad), _array(oracle, case, "grad"), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("oracle", "case"), ALL_CASES, ids=ALL_IDS)
def test_loss_and_grad_float32(oracle, case):
    loss, grad = jax.jit(jax.value_and_grad(_loss_fn(oracle, case, jnp.float32)))(
        jnp.asarray(_array(oracle, case, "logps"), jnp.float32)
    )
    assert loss.dtype == jnp.float32
    want = float(_array(oracle, case, "loss"))
    np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=0)
    # Elements that cancel to ~1e-7 (the k3 KL gradient near ref == logp) carry float32
    # rounding of the operands, ~1e-7 * |logp|: an absolute floor there, 1e-4 relative above.
    np.testing.assert_allclose(np.asarray(grad), _array(oracle, case, "grad"), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("oracle", "case"), ALL_CASES, ids=ALL_IDS)
def test_group_advantages(oracle, case, x64):
    adv = losses.group_advantages(
        jnp.asarray(_array(oracle, case, "rewards"), jnp.float64),
        case["num_generations"],
        scale=case["scale_rewards"],
    )
    # TRL rounds its std through float32: its advantages are float64 to ~2e-8 relative (the
    # seq_delta file keeps TRL's float32 advantages, ~1e-7).
    want = _array(oracle, case, "advantages")
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-6, atol=0)
