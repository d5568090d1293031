"""Training LoRA adapters: only the adapters get gradients and optimizer state, the base
weights are neither changed nor donated, the reference is the same weights with the
adapters off, and checkpoints hold the adapters alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medjax import models, scoring
from medjax.training import checkpoints, runtime, steps

LORA = models.LoraConfig(rank=2, alpha=6.0, target_modules=("q_proj", "down_proj"))
CONFIG = models.ModelConfig(
    family="qwen2", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
    num_heads=2, num_kv_heads=1, qkv_bias=True, lora=LORA,
)  # fmt: skip


def batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 64, (2, 7)), jnp.int32)
    mask = jnp.ones((2, 7), jnp.int32)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.at[:, :2].set(0)}


def flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_the_first_step_moves_b_by_scale_times_a_transposed_times_the_base_gradient():
    # With B = 0, d loss / d B = scale * A^T (d loss / d W) at W (the adapted layer is
    # x (W + scale A B)), and d loss / d A = scale * (d loss / d W) B^T = 0. Plain SGD at
    # lr 1 makes B that negative gradient. The base gradient comes from the same model
    # without adapters, differentiated by jax.grad directly. Catches: a scale other than
    # alpha / rank (3 here), A or B transposed, gradients reaching the base weights, or
    # optimizer state kept for them.
    model = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = steps.create_state(model, optax.sgd(1.0), 0)
    assert set(flat(state.params)) == {
        f"layers/{i}/{m}/lora_{x}" for i in (0, 1)
        for m in ("self_attn/q_proj", "mlp/down_proj") for x in "ab"
    }  # fmt: skip
    base_before = flat(state.frozen)
    adapters = flat(state.params)

    plain_graphdef, plain_params = nnx.split(
        models.DecoderLM(CONFIG.replace(lora=None), rngs=nnx.Rngs(0)), nnx.Param
    )
    for path, variable in nnx.to_flat_state(plain_params):  # The same base weights.
        variable.set_value(jnp.asarray(base_before["/".join(map(str, path))]))

    def plain_loss(p):
        m = nnx.merge(plain_graphdef, p)
        b = batch()
        logps = scoring.score_sequences(m, b["input_ids"], b["attention_mask"], b["loss_mask"])
        return -(logps * b["loss_mask"]).sum() / b["loss_mask"].sum()

    grads_w = flat(jax.grad(plain_loss)(plain_params))
    step = steps.make_train_step(graphdef, optax.sgd(1.0), steps.sft_loss_fn)
    new, _ = step(state, batch())
    after = flat(new.params)
    for i in (0, 1):
        for module in ("self_attn/q_proj", "mlp/down_proj"):
            prefix = f"layers/{i}/{module}"
            a = adapters[f"{prefix}/lora_a"]
            want_b = -LORA.scale * a.T @ grads_w[f"{prefix}/kernel"]
            np.testing.assert_allclose(after[f"{prefix}/lora_b"], want_b, rtol=1e-4, atol=1e-7)
            np.testing.assert_array_equal(after[f"{prefix}/lora_a"], a)  # Its gradient is 0.
    for name, value in flat(new.frozen).items():
        np.testing.assert_array_equal(value, base_before[name], err_msg=name)


def test_the_base_survives_the_step_and_the_reference_is_the_adapters_off():
    # The step donates the trained state but not the base, which the reference (and the
    # next sampler) still reads; the reference's log-probs are the model without adapters,
    # exactly. Catches the base donated (a deleted buffer on the next use), a reference
    # with the trained adapters, or a second copy of the base.
    model = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    base = models.DecoderLM(CONFIG.replace(lora=None), rngs=nnx.Rngs(0))
    nnx.update(base, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    run = type("Run", (), {"seed": 0, "mesh": None})()
    policy = runtime.Policy(run, model, optax.adam(1e-2), steps.sft_loss_fn, 1, 1.0)
    reference = policy.adapters_off()
    for _ in range(3):
        policy.state, _ = policy.step_fn(policy.state, batch())
    assert reference[1] is policy.state.frozen
    assert not any(x.is_deleted() for x in jax.tree.leaves(policy.state.frozen))
    b = batch()
    args = (b["input_ids"], b["attention_mask"], b["loss_mask"])
    want = scoring.score_sequences(base, *args)
    np.testing.assert_array_equal(np.asarray(policy.score(reference, *args)), np.asarray(want))
    trained = np.asarray(policy.score(policy.state.weights(), *args))
    assert np.abs(trained - np.asarray(want)).max() > 1e-3  # The adapters did train.
    # Adam's state: mu and nu of the 8 adapter matrices, nothing of the base.
    adam = policy.state.opt_state[0]
    assert len(jax.tree.leaves(adam.mu)) == 8 and len(jax.tree.leaves(adam.nu)) == 8


def test_a_checkpoint_holds_the_adapters_alone(tmp_path):
    # Catches the base weights written at every save (for an 8B model, 16 GB each time),
    # and a restore that loses them. A vocabulary of 8,192 makes the base 0.5 MB, well above
    # orbax's own files (about 25 kB).
    config = CONFIG.replace(vocab_size=8192)
    model = models.DecoderLM(config, rngs=nnx.Rngs(0))
    graphdef, state = steps.create_state(model, optax.adam(1e-2), 0)
    step = steps.make_train_step(graphdef, optax.adam(1e-2), steps.sft_loss_fn)
    state, _ = step(state, batch())
    saver = checkpoints.Checkpointer(str(tmp_path), save_every=1, async_save=False)
    saver.save(1, state, {"step": 1})
    saver.close()
    written = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(state.frozen))
    assert written < base_bytes / 2, (written, base_bytes)
    _, fresh = steps.create_state(models.DecoderLM(config, rngs=nnx.Rngs(0)), optax.adam(1e-2), 0)
    restored, _ = checkpoints.Checkpointer(str(tmp_path), save_every=1).restore(1, fresh)
    assert restored.frozen is fresh.frozen
    pairs = zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params), strict=True)
    for want, got in pairs:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
