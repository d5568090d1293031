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


def identity_adapter(dropout: float, index: int = 0):
    """A Linear whose kernel is 0 and adapter is the identity at scale 1: y = dropout(x)."""
    from medjax.models import transformer

    lora = transformer.LoraAdapter(models.LoraConfig(rank=256, alpha=256.0, dropout=dropout), index)
    layer = transformer.Linear(
        256, 256, ("embed", "mlp"), bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
        rngs=nnx.Rngs(0), lora=lora,
    )  # fmt: skip
    layer.kernel.set_value(jnp.zeros((256, 256)))
    layer.lora_a.set_value(jnp.eye(256))
    layer.lora_b.set_value(jnp.eye(256))
    return layer


def test_lora_dropout_drops_a_quarter_of_the_inputs_and_scales_the_rest_by_four_thirds():
    # y = dropout(x) of 4 x 256 ones at p = 0.25: each entry 0 or 1 / 0.75, zeros about a
    # quarter (1,024 draws: standard deviation 0.0135, allowed 0.05). Outside the dropout
    # context (sampling, scoring) y is x exactly. The same key gives the same mask; another
    # module (index) or another key another. Catches: dropout while sampling or scoring,
    # the kept inputs not rescaled, p taken as the keep probability, one mask shared by
    # every adapter.
    from medjax.models import transformer

    x = jnp.ones((4, 256))
    layer = identity_adapter(0.25)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.ones((4, 256)))
    with transformer.lora_dropout(jax.random.key(0)):
        y = np.asarray(layer(x))
        again = np.asarray(layer(x))
        other_module = np.asarray(identity_adapter(0.25, index=3)(x))
    with transformer.lora_dropout(jax.random.key(1)):
        other_key = np.asarray(layer(x))
    np.testing.assert_allclose(np.unique(y), [0.0, 4 / 3], rtol=1e-6)
    assert abs((y == 0).mean() - 0.25) < 0.05
    np.testing.assert_array_equal(y, again)
    assert (y != other_module).any() and (y != other_key).any()


def test_a_train_step_with_lora_dropout_differs_from_scoring_and_repeats_itself():
    # The step's loss is taken with dropout (its own key from the state's rng and step), the
    # same state and batch give the same loss, and scoring the same weights drops nothing.
    # Catches: dropout not reaching the train step, or a key that changes between two
    # identical steps (a run would not resume to the same metrics).
    config = CONFIG.replace(lora=models.LoraConfig(rank=2, alpha=6.0, dropout=0.5))
    model = models.DecoderLM(config, rngs=nnx.Rngs(0))
    graphdef, state = steps.create_state(model, optax.sgd(0.0), 0)
    with_b = jax.tree.map(lambda x: x, state.params)
    for path, variable in nnx.to_flat_state(with_b):
        if path[-1] == "lora_b":  # Non-zero B, or dropout would change nothing.
            variable.set_value(jnp.full(variable.get_value().shape, 0.5))
    state = state._replace(params=with_b)
    b = batch()
    logps = scoring.score_sequences(
        nnx.merge(graphdef, *state.weights()), b["input_ids"], b["attention_mask"], b["loss_mask"]
    )
    deterministic = float(-(logps * b["loss_mask"]).sum() / b["loss_mask"].sum())
    step = steps.make_train_step(graphdef, optax.sgd(0.0), steps.sft_loss_fn)
    copy = jax.tree.map(jnp.copy, state)
    _, first = step(state, b)
    _, second = step(copy, b)
    assert float(first["loss"]) == float(second["loss"])
    assert abs(float(first["loss"]) - deterministic) > 1e-4


def test_the_sampler_samples_the_adapted_model(tmp_path):
    # Greedy tokens of a LoRA model with trained (non-zero) adapters equal those of its
    # merged export loaded back (W + scale A B in one weight), and differ from the base's.
    # Catches a sampler that splits the model's Params and drops the adapters, or merges
    # the base alone.
    from medjax import sampling

    model = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.default_rng(2)
    for path, variable in nnx.to_flat_state(state):
        if path[-1] == "lora_b":
            variable.set_value(jnp.asarray(rng.normal(0, 1.0, variable.get_value().shape)))
    nnx.update(model, state)
    models.save_pretrained(model, tmp_path / "merged")
    models.save_pretrained(model, tmp_path / "base", merge_lora=False)
    ids = jnp.asarray(np.random.default_rng(4).integers(1, 64, (3, 6)), jnp.int32)
    mask = jnp.ones_like(ids)
    params = sampling.SamplingParams(max_new_tokens=12, greedy=True, pad_id=0)

    def tokens(m):
        return np.asarray(sampling.sample(m, ids, mask, jax.random.key(0), params).tokens)

    adapted = tokens(model)
    np.testing.assert_array_equal(adapted, tokens(models.from_pretrained(tmp_path / "merged")))
    assert (adapted != tokens(models.from_pretrained(tmp_path / "base"))).any()
