"""The decoder on meshes of 8 CPU devices: parameters sharded by the logical-axis rules, and
a forward plus one optax step equal to the single-device run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from medjax import losses, models, partitioning

CONFIG = models.ModelConfig(
    family="qwen2",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    qkv_bias=True,
    tie_word_embeddings=False,
)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, (8, 17))
    mask = (np.arange(16)[None] < rng.integers(4, 17, 8)[:, None]).astype(np.float32)
    return jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]), jnp.asarray(mask)


def _make_step(graphdef, tx, trace_count):
    def loss_fn(params, inputs, targets, mask):
        logits = nnx.merge(graphdef, params)(inputs)
        logps = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return losses.sft_loss(logps, mask)[0]

    def step(params, opt_state, inputs, targets, mask):
        trace_count.append(1)  # Runs once per trace, i.e. per compilation.
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    return step


@pytest.fixture(scope="module")
def reference():
    """Forward, loss and gradients of one step on a single device. (Parameters after an
    AdamW step are not compared: for gradients at rounding level, g / sqrt(v) amplifies the
    reduction-order noise of a sharded sum to a whole learning-rate step.)"""
    model = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-3)
    step = jax.jit(_make_step(graphdef, tx, []))
    inputs, targets, mask = _batch()
    logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, inputs)
    _, _, loss, grads = step(params, tx.init(params), inputs, targets, mask)
    return params, logits, loss, grads


@pytest.mark.parametrize("shape", MESHES, ids=[f"{a}x{b}x{c}" for a, b, c in MESHES])
def test_sharded_step_matches_single_device(reference, shape):
    params0, want_logits, want_loss, want_grads = reference
    mesh = partitioning.make_mesh(*shape)
    graphdef = nnx.graphdef(models.DecoderLM(CONFIG, rngs=nnx.Rngs(0)))
    shardings = partitioning.state_shardings(params0, mesh)
    params = jax.device_put(params0, shardings)

    # Parameters carry the specs the rules give them (a size-1 axis shards nothing).
    attn = params["layers"][0]["self_attn"]
    fsdp, tensor = "fsdp", "tensor"
    assert params["embed_tokens"].get_value().sharding.spec == P(tensor, fsdp)
    assert attn["q_proj"]["kernel"].get_value().sharding.spec == P(fsdp, tensor)
    assert attn["q_proj"]["bias"].get_value().sharding.spec == P(tensor)
    assert params["layers"][1]["mlp"]["down_proj"]["kernel"].get_value().sharding.spec == P(
        tensor, fsdp
    )
    assert params["lm_head"].get_value().sharding.spec == P(fsdp, tensor)

    tx = optax.adamw(1e-3)
    opt_state = partitioning.init_optimizer_state(tx, params, mesh)
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    data = partitioning.batch_sharding(mesh)
    inputs, targets, mask = (jax.device_put(x, data) for x in _batch())

    logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, inputs)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)

    traces = []
    step = jax.jit(
        _make_step(graphdef, tx, traces),
        in_shardings=(shardings, opt_shardings, data, data, data),
        out_shardings=(shardings, opt_shardings, None, shardings),
    )
    params1, opt_state, loss, grads = step(params, opt_state, inputs, targets, mask)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Updated parameters keep their shardings (the step's out_shardings) and moved.
    assert params1["lm_head"].get_value().sharding.spec == P(fsdp, tensor)
    assert not np.allclose(params1["lm_head"].get_value(), params0["lm_head"].get_value())
    step(params1, opt_state, inputs, targets, mask)  # A second step must not recompile.
    assert len(traces) == 1


def test_make_mesh_shapes_and_errors():
    assert dict(partitioning.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(partitioning.make_mesh(data=-1, fsdp=2, tensor=2).shape) == {
        "data": 2,
        "fsdp": 2,
        "tensor": 2,
    }
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        partitioning.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="= 6, but 8 devices"):
        partitioning.make_mesh(data=3, fsdp=2)


def test_from_pretrained_onto_a_mesh(tmp_path):
    model = models.DecoderLM(CONFIG, rngs=nnx.Rngs(1))
    models.save_pretrained(model, tmp_path)
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    loaded = models.from_pretrained(tmp_path, mesh=mesh)
    kernel = loaded.layers[0].mlp.gate_proj.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor")
    # Each device holds only its quarter of the [64, 128] kernel.
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 64)}
    ids = jnp.arange(16).reshape(2, 8)
    np.testing.assert_allclose(loaded(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_scanned_model_on_a_mesh_matches_single_device(reference):
    # The stacked layers' depth axis stays whole; the rest of each parameter is sharded as
    # the unrolled layer's. Catches: the "layers" axis missing from the logical axes (the
    # rules would shard depth on fsdp), and a scan whose carry loses the batch sharding.
    _params0, want_logits, want_loss, want_grads = reference
    config = CONFIG.replace(scan_layers=True, remat="full")
    mesh = partitioning.make_mesh(2, 2, 2)
    model = models.DecoderLM(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.device_put(params, partitioning.state_shardings(params, mesh))
    q = params["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    data = partitioning.batch_sharding(mesh)
    inputs, targets, mask = (jax.device_put(x, data) for x in _batch())
    logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, inputs)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    _, _, loss, grads = jax.jit(_make_step(graphdef, optax.sgd(0.1), []))(
        params, optax.sgd(0.1).init(params), inputs, targets, mask
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    got = grads["layers"]["mlp"]["down_proj"]["kernel"].get_value()
    want = [want_grads["layers"][i]["mlp"]["down_proj"]["kernel"].get_value() for i in range(2)]
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-6)


def test_each_device_computes_only_its_rows():
    # FSDP on 8 devices, 32 rows in 4 microbatches: each device should hold the activations
    # of one row a microbatch, as one device running a step on one row does. Left to itself
    # the compiler follows the weights' sharding (embed over fsdp) and has every device
    # compute all 8 rows of a microbatch (measured: 131 MB of temporaries instead of 21).
    # Catches: the model's batch constraint or the step's mesh context going missing, and
    # microbatches left on the devices that loaded their rows.
    from medjax.training import steps

    config = CONFIG.replace(hidden_size=64, intermediate_size=1024)
    tx = optax.sgd(0.1)

    def temp_bytes(mesh, rows, num_microbatches):
        model = partitioning.shard_module(models.DecoderLM(config, rngs=nnx.Rngs(0)), mesh)
        graphdef, state = steps.create_state(model, tx, 0, mesh)
        sharding = partitioning.batch_sharding(mesh)
        batch = {
            k: jax.ShapeDtypeStruct((rows, 256), jnp.int32, sharding=sharding)
            for k in ("input_ids", "attention_mask", "loss_mask")
        }
        step = steps.make_train_step(
            graphdef, tx, steps.sft_loss_fn, num_microbatches=num_microbatches,
            state_shardings=steps.shardings_of(state),
        )  # fmt: skip
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    one_row = temp_bytes(partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1]), 1, 1)
    spread = temp_bytes(partitioning.make_mesh(1, 8, 1), 32, 4)
    assert spread < 1.5 * one_row, (spread, one_row)


@pytest.mark.parametrize("scan,mixed", [(False, False), (True, False), (True, True)])
def test_optimizer_moments_are_sharded_like_their_parameters(scan, mixed):
    # AdamW's mu and nu, as the run creates them on an fsdp=8 mesh: each device should hold
    # an eighth of every moment, as of its parameter. Catches: moments left replicated
    # (the compiler gives zeros_like(param) no sharding of its own: every device then holds
    # the whole optimizer state, 8 bytes a parameter in float32). Mixed precision (bfloat16
    # parameters, a float32 master copy, bfloat16 moments) adds the master copy, which
    # must be sharded the same way, and the dtypes it promises.
    from medjax.training import optim

    mesh = partitioning.make_mesh(1, 8, 1)
    config = CONFIG.replace(scan_layers=scan)
    if mixed:
        config = config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = models.DecoderLM(config, rngs=nnx.Rngs(0))
    _, params = nnx.split(partitioning.shard_module(model, mesh), nnx.Param)
    options = {"master_dtype": "float32", "moments_dtype": "bfloat16"} if mixed else {}
    tx = optim.make_optimizer(1e-3, **options)
    opt_state = partitioning.init_optimizer_state(tx, params, mesh)
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    copies = {"mu": 0, "nu": 0, "master": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        kind = next((k for k in copies if k in keys), None)
        if kind is None:
            assert leaf.sharding.spec == P(), keys  # Step counts: replicated.
            continue
        copies[kind] += 1
        assert leaf.dtype == (jnp.float32 if kind == "master" or not mixed else jnp.bfloat16)
        param = flat[path[keys.index(kind) + 1 :]]
        assert leaf.sharding == param.sharding, keys
        shard = leaf.addressable_shards[0].data
        if param.sharding.spec != P() and any(s == "fsdp" for s in param.sharding.spec):
            assert shard.size * 8 == leaf.size, keys
    assert copies == {"mu": len(flat), "nu": len(flat), "master": len(flat) if mixed else 0}


def test_the_sampler_on_a_mesh_samples_each_row_on_its_own_device():
    # 16 prompts on fsdp=8: each device should compute its 2 rows, as one device sampling 2
    # prompts does (the compiler's FLOP count of the per-device program: measured 13.5M
    # either way); left to itself the compiler had the devices share out less than that
    # (21.6M a device: the rows reach the jitted sampler unsharded). The tokens and
    # log-probs must be the single device's. Catches: the sampler's mesh context or its
    # cache constraint going missing, or rows mixed up across devices. (Its temporaries
    # hold the all-gathered weights too, so FLOPs, not bytes, tell the rows apart here.)
    from medjax import sampling

    config = CONFIG.replace(hidden_size=64, intermediate_size=256)
    params = sampling.SamplingParams(max_new_tokens=8, temperature=0.7, pad_id=0)
    ids = jnp.asarray(np.random.default_rng(3).integers(1, 97, (16, 24)), jnp.int32)
    mask = jnp.ones_like(ids).at[::3, :5].set(0)  # Some rows left-padded.
    key = jax.random.key(7)

    def sampler(mesh, rows):
        model = models.DecoderLM(config, rngs=nnx.Rngs(0))
        if mesh is not None:
            model = partitioning.shard_module(model, mesh)
        graphdef, state = nnx.split(model)
        budget = jnp.full((rows,), 8, jnp.int32)
        args = (graphdef, state, ids[:rows], mask[:rows], key, budget, params, 1, None, mesh)
        flops = sampling._generate.lower(*args).compile().cost_analysis()["flops"]
        return sampling._generate(*args), flops

    got, spread = sampler(partitioning.make_mesh(1, 8, 1), 16)
    _, two_rows = sampler(None, 2)
    assert spread < 1.1 * two_rows, (spread, two_rows)
    want, _ = sampler(None, 16)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
