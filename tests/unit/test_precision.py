"""Mixed precision: bfloat16 parameters with float32 master weights, bfloat16 moments, and
what bfloat16 does to SmolLM2's loss and gradients.

The hand-computed cases use bfloat16's grid: 8 significant bits, so just below 1.0 the step
is 2^-8 = 0.00390625 and from 256 to 512 it is 2."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medjax import models, scoring
from medjax.models import smollm2
from medjax.models import tokenizer as tokenizer_lib
from medjax.training import optim, steps
from medjax.training.runtime import TrainError
from medjax.training.stages import SFTStage


def adam_steps(tx, params, grad, n):
    state = tx.init(params)
    for _ in range(n):
        updates, state = tx.update(grad, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_master_weights_keep_the_updates_bfloat16_rounds_away():
    # Adam on a constant gradient moves a weight by lr each step (m/sqrt(v) = 1 after bias
    # correction): ten steps of 1e-3 take 1.0 to 0.99, whose nearest bfloat16 is 0.98828125
    # (0.99 lies 0.0017 above it, 0.0022 below 0.9921875). Without a master copy each step's
    # 1.0 - 0.001 rounds back to 1.0 (half a step below 1.0 is 0.00195), forever.
    # Catches: updates applied to the bfloat16 weights, a master copy that is not kept, or
    # parameters not taken from it.
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    grad = {"w": jnp.ones((3,), jnp.bfloat16)}
    plain = optim.make_optimizer(1e-3, max_grad_norm=None)
    got, _ = adam_steps(plain, params, grad, 10)
    np.testing.assert_array_equal(np.asarray(got["w"], np.float32), [1.0, 1.0, 1.0])

    mixed = optim.make_optimizer(1e-3, max_grad_norm=None, master_dtype="float32")
    got, state = adam_steps(mixed, params, grad, 10)
    assert got["w"].dtype == jnp.bfloat16 and state.master["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(state.master["w"]), 0.99, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["w"], np.float32), [0.98828125] * 3)


def test_bfloat16_moments_store_adams_state_rounded():
    # One step on a gradient of 0.3 from f32 weights: mu = 0.1 * 0.3 = 0.03 and
    # nu = 0.001 * 0.09 = 9e-5 are computed in float32, then stored rounded to bfloat16:
    # 0.03 = 1.92 * 2^-6 -> 246/128 * 2^-6 = 0.030029296875, and 9e-5 = 1.4746 * 2^-14 ->
    # 189/128 * 2^-14. The update itself comes from the unrounded moments, so the first
    # step equals float32 Adam's: 1.0 - 1e-3. Catches moments kept in float32, the
    # optimizer's step count cast too (it stays int32), or the update taken after rounding.
    params = {"w": jnp.ones((2,), jnp.float32)}
    grad = {"w": jnp.full((2,), 0.3, jnp.float32)}
    tx = optim.make_optimizer(1e-3, max_grad_norm=None, moments_dtype="bfloat16")
    got, state = adam_steps(tx, params, grad, 1)
    adam = state[-1][0]
    assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.bfloat16
    assert adam.count.dtype == jnp.int32 and int(adam.count) == 1
    np.testing.assert_array_equal(np.asarray(adam.mu["w"], np.float64), [0.030029296875] * 2)
    np.testing.assert_array_equal(np.asarray(adam.nu["w"], np.float64), [189 / 128 * 2**-14] * 2)
    np.testing.assert_allclose(np.asarray(got["w"]), 1.0 - 1e-3, rtol=0, atol=1e-7)


def test_a_bad_precision_name_stops_the_stage():
    # Built when the stage is made, before the run writes anything.
    bad = functools.partial(optim.make_optimizer, master_dtype="flot32")
    with pytest.raises(TrainError) as e:
        SFTStage(optimizer=bad)
    assert str(e.value) == (
        "SFTStage 'sft': optimizer: make_optimizer: master_dtype 'flot32' is not one of"
        " ('float32', 'bfloat16', 'float16')."
    )
    with pytest.raises(ValueError, match=r"moments_dtype 'int8' is not one of"):
        optim.make_optimizer(1e-3, moments_dtype="int8")


class Weight(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((), jnp.bfloat16))


def linear_loss_fn(model, batch):
    # d(sum of w * x)/dw = sum of x: the gradient is the batch's sum, whatever w is; the
    # denominator counts rows (summed over microbatches like the losses' token counts).
    numerator = jnp.sum(model.w.get_value() * batch["x"].astype(jnp.bfloat16))
    denominator = jnp.float32(batch["x"].shape[0])
    return numerator, {"loss_numerator": numerator, "loss_denominator": denominator}


def test_microbatch_gradients_add_up_in_float32():
    # Four microbatches bring gradients 256, 1, 1 and 1. In bfloat16 (steps of 2 above 256)
    # 256 + 1 rounds back to 256 each time; in float32 they sum to 259, and over the
    # denominator 4 the gradient norm is 64.75 (a bfloat16 sum gives 64). The master copy
    # moves by Adam's first step, -lr, and the bfloat16 weight is its rounding.
    # Catches: microbatch gradients summed in the parameters' dtype, the norm taken after the
    # cast to bfloat16, and the state's dtypes changing across the step (a recompile).
    model = Weight()
    tx = optim.make_optimizer(1e-2, max_grad_norm=None, master_dtype="float32")
    graphdef, state = steps.create_state(model, tx, 0)
    step = steps.make_train_step(graphdef, tx, linear_loss_fn, num_microbatches=4)
    batch = {"x": jnp.asarray([256.0, 1.0, 1.0, 1.0])}
    state, metrics = step(state, batch)
    assert float(metrics["grad_norm"]) == 64.75
    assert state.params["w"].get_value().dtype == jnp.bfloat16
    master = state.opt_state.master["w"].get_value()
    assert master.dtype == jnp.float32
    # rtol: Adam's bias correction 1 - 0.999 is 1.3e-5 off in float32, its root 6.5e-6.
    np.testing.assert_allclose(float(master), -1e-2, rtol=1e-5)
    assert float(state.params["w"].get_value()) == float(jnp.bfloat16(-1e-2))
    state, _ = step(state, batch)  # Same dtypes and shapes: no second trace.
    assert step._cache_size() == 1


@pytest.mark.slow
def test_smollm2_in_bfloat16_stays_near_float32():
    """The SFT loss and its gradient on two medical sentences, SmolLM2 in bfloat16 against
    float32 (the same weights: the GGUF file's).

    Tolerances: bfloat16 keeps 8 significant bits, a relative rounding of up to 2^-9
    (0.2%) at every matmul output and residual add of 30 layers. The loss is a mean over
    ~50 tokens whose errors are independent in sign, so it may move by one rounding (0.2%;
    measured 0.025%). A gradient coordinate may move far more relative to itself, but
    Adam's step is per coordinate and mostly its sign: what must hold is the direction
    (cosine >= 0.995, i.e. within 6 degrees; measured 0.9992) and the size (norm within
    10%; measured difference 4%). The log-probs, which the papers' ratios divide, come out
    float32 from a bfloat16 model. Catches: log-probs or loss left in bfloat16 (a ratio
    exp(new - old) of log-probs near -3 would be off by up to 1%), and a cast that loses
    the model (a wrong dtype anywhere moves the loss by far more than one rounding).
    """
    path = smollm2.gguf_path()
    tokenizer = tokenizer_lib.load_tokenizer(path)
    texts = [
        "Fever, cough and shortness of breath for three days suggest a lower respiratory"
        " tract infection; the next step is a chest X-ray.",
        "Hyperkalaemia with peaked T waves is treated first with intravenous calcium"
        " gluconate to stabilise the heart.",
    ]
    rows = [tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int32)
    attention = np.zeros((2, width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], attention[i, : len(row)] = row, 1
    loss_mask = attention.copy()
    loss_mask[:, :4] = 0
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(attention),
        "loss_mask": jnp.asarray(loss_mask),
    }

    def loss_and_grads(dtype):
        model = models.from_pretrained(path, dtype=dtype, scan_layers=True)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            value, metrics = steps.sft_loss_fn(nnx.merge(graphdef, p), batch)
            return value, metrics

        (value, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        flat = np.concatenate([np.asarray(g, np.float32).ravel() for g in jax.tree.leaves(grads)])
        return value, flat, model

    loss32, grads32, _ = loss_and_grads(jnp.float32)
    loss16, grads16, model16 = loss_and_grads(jnp.bfloat16)
    assert loss16.dtype == jnp.float32
    logps = scoring.score_sequences(
        model16, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    )
    assert logps.dtype == jnp.float32
    assert abs(float(loss16) - float(loss32)) <= 2e-3 * float(loss32)
    cosine = grads16 @ grads32 / (np.linalg.norm(grads16) * np.linalg.norm(grads32))
    assert cosine >= 0.995
    assert abs(np.linalg.norm(grads16) / np.linalg.norm(grads32) - 1) <= 0.1


def test_a_checkpoint_restores_the_master_copy_and_moments_in_their_dtypes(tmp_path):
    # What a resumed run restores into: a fresh state of the same optimizer. Catches the
    # master copy restored in the parameters' bfloat16 (a resume would drop every update
    # below a bfloat16 step), moments widened, or the state's structure lost.
    from medjax.training import checkpoints

    tx = optim.make_optimizer(1e-2, max_grad_norm=None, master_dtype="float32",
                              moments_dtype="bfloat16")  # fmt: skip
    graphdef, state = steps.create_state(Weight(), tx, 0)
    step = steps.make_train_step(graphdef, tx, linear_loss_fn)
    for _ in range(3):
        state, _ = step(state, {"x": jnp.asarray([0.3, 0.2])})
    saver = checkpoints.Checkpointer(str(tmp_path / "ckpt"), save_every=1, async_save=False)
    saver.save(3, state, {"step": 3})
    saver.close()
    _, fresh = steps.create_state(Weight(), tx, 0)
    restored, meta = checkpoints.Checkpointer(str(tmp_path / "ckpt"), save_every=1).restore(
        3, fresh
    )
    assert meta == {"step": 3}
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert restored.opt_state.master["w"].get_value().dtype == jnp.float32
    assert float(restored.opt_state.master["w"].get_value()) != float(
        restored.params["w"].get_value()
    )  # Three steps of -0.01 from 0: the master copy is -0.03, the weight its rounding.
