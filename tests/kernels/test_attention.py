"""Plain causal attention through the library kernels: splash attention (Pallas interpret
mode on CPU) against the XLA path, hand-computed cases, the platform choice and its errors,
and the model with each implementation. The TPU lowering (Mosaic) is in
test_tpu_lowering.py; cuDNN needs a GPU, which no test here has."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medjax import models, partitioning
from medjax.kernels import attention

F32_TOL = 1e-5


def _inputs(seed, batch, length, heads, kv_heads, head_dim):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (batch, length, heads, head_dim)),
        jax.random.normal(kk, (batch, length, kv_heads, head_dim)),
        jax.random.normal(kv, (batch, length, kv_heads, head_dim)),
    )


def _right_padded(lengths, length):
    return jnp.arange(length)[None] < jnp.asarray(lengths)[:, None]


def _left_padded(lengths, length):
    return jnp.arange(length)[None] >= length - jnp.asarray(lengths)[:, None]


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_hand_computed_weights(impl):
    # One head, K = 2 (scale 1/sqrt(2)). Query 0 sees key 0 only: out = v0. Query 1 scores
    # key 0 at 0 and key 1 at ln 3 (q1 . k1 / sqrt 2 = ln 3): weights 1/4, 3/4. Query 2 is
    # padding: 0, and key 2 (padding) is seen by nobody. Catches a flipped causal direction
    # (query 0 would mix in v1), a missing or doubled scale (weights 1/(1 + 3^sqrt2) ...),
    # padding keys attended and padding rows left non-zero.
    q = jnp.array([[0.0, 0.0], [np.log(3.0) * np.sqrt(2.0), 0.0], [5.0, 5.0]])
    k = jnp.array([[0.0, 0.0], [1.0, 0.0], [-3.0, 7.0]])
    v = jnp.array([[1.0, 2.0], [5.0, -2.0], [100.0, 100.0]])
    valid = jnp.array([[True, True, False]])
    out = attention.causal_attention(q[None, :, None], k[None, :, None], v[None, :, None], valid,
                                     impl=impl)[0, :, 0]  # fmt: skip
    expected = np.array([[1.0, 2.0], [0.25 * 1.0 + 0.75 * 5.0, 0.25 * 2.0 - 0.75 * 2.0], [0, 0]])
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6)


@pytest.mark.parametrize(
    "length,heads,kv_heads,head_dim,padding",
    [
        (200, 4, 2, 64, "right"),  # Padded inside to 256 (block 256): the tail sliced off.
        (300, 6, 2, 32, "left"),  # 384 in blocks of 128; left padding as prompts have it.
        (128, 2, 2, 64, "right"),  # MHA (no GQA), one block.
    ],
)
def test_splash_equals_xla_forward_and_grads(length, heads, kv_heads, head_dim, padding):
    # The same attention by two implementations: a wrong GQA head map (query head h reading
    # kv head h % N instead of h // (H / N)), a segment mix-up at the padding or the
    # kernel's unscaled scores would each move the outputs far beyond 1e-5.
    q, k, v = _inputs(0, 2, length, heads, kv_heads, head_dim)
    lengths = [length, length * 2 // 3]
    valid = (_right_padded if padding == "right" else _left_padded)(lengths, length)
    cot = jax.random.normal(jax.random.key(1), q.shape)

    def loss(impl, q, k, v):
        return jnp.sum(attention.causal_attention(q, k, v, valid, impl=impl) * cot)

    for a, b in zip(
        jax.value_and_grad(lambda *x: loss("splash", *x), argnums=(0, 1, 2))(q, k, v),
        jax.value_and_grad(lambda *x: loss("xla", *x), argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=F32_TOL, atol=F32_TOL)
    out = attention.causal_attention(q, k, v, valid, impl="splash")
    assert not np.asarray(out)[~np.asarray(valid)].any()  # Padding rows are exactly 0.


def test_auto_is_xla_on_cpu():
    # On CPU "auto" must lower the XLA branch, bit for bit (splash in interpret mode differs
    # in the last bits and is ~50x slower): catches a platform choice that picks the TPU
    # kernel wherever the program runs.
    q, k, v = _inputs(2, 2, 96, 4, 2, 32)
    valid = _right_padded([96, 50], 96)
    auto = jax.jit(lambda *x: attention.causal_attention(*x, valid, impl="auto"))(q, k, v)
    xla = jax.jit(lambda *x: attention.causal_attention(*x, valid, impl="xla"))(q, k, v)
    splash = attention.causal_attention(q, k, v, valid, impl="splash")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
    assert not np.array_equal(np.asarray(splash), np.asarray(xla))


def test_splash_under_a_mesh_equals_one_device():
    # Rows over (data, fsdp) and heads over tensor, each shard's kernel in a shard_map: a
    # wrong in/out spec (heads and rows swapped, kv heads left whole) gives other numbers or
    # fails to trace.
    q, k, v = _inputs(3, 4, 160, 4, 2, 32)
    valid = _right_padded([160, 100, 7, 160], 160)
    expected = attention.causal_attention(q, k, v, valid, impl="xla")
    mesh = partitioning.make_mesh(2, 2, 2)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    placed = [jax.device_put(x, rows) for x in (q, k, v, valid)]

    @jax.jit
    def run(q, k, v, valid):
        with partitioning.activations_on(mesh):
            return attention.causal_attention(q, k, v, valid, impl="splash")

    np.testing.assert_allclose(np.asarray(run(*placed)), np.asarray(expected), atol=F32_TOL)


def test_splash_refuses_shapes_the_mesh_cannot_split():
    # "auto" falls back to XLA there; an explicit "splash" says why it cannot run.
    q, k, v = _inputs(4, 3, 32, 4, 2, 16)
    valid = _right_padded([32, 20, 10], 32)
    mesh = partitioning.make_mesh(2, 2, 2)
    with partitioning.activations_on(mesh), pytest.raises(ValueError, match="batch 3 over 4"):
        attention.causal_attention(q, k, v, valid, impl="splash")


def test_cudnn_and_platform_errors():
    q, k, v = _inputs(5, 1, 16, 2, 2, 16)
    with pytest.raises(ValueError, match="attention='cudnn' needs bfloat16 or float16"):
        attention.causal_attention(q, k, v, _right_padded([16], 16), impl="cudnn")
    with pytest.raises(ValueError, match="impl` must be one of"):
        attention.causal_attention(q, k, v, _right_padded([16], 16), impl="flash")
    for impl, platform in [("cudnn", "cpu"), ("cudnn", "tpu"), ("splash", "cuda")]:
        with pytest.raises(ValueError, match=f"attention={impl!r} runs on .*, not on this run"):
            attention.check_platform(impl, platform)
    for impl, platform in [("auto", "cpu"), ("auto", "cuda"), ("xla", "tpu"), ("splash", "tpu"),
                           ("splash", "cpu"), ("cudnn", "cuda"), ("cudnn", "gpu")]:  # fmt: skip
        attention.check_platform(impl, platform)


CONFIG = models.ModelConfig(
    family="qwen3",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    qk_norm=True,
    scan_layers=True,
)


def test_model_with_splash_equals_xla():
    # The decoder's plain forward and its gradients through each implementation (scanned
    # layers, right padding): catches the model handing the kernel the wrong validity
    # (e.g. the attention mask of the cache path) or leaving padding rows to leak.
    ids = jax.random.randint(jax.random.key(6), (2, 140), 0, CONFIG.vocab_size)
    mask = _right_padded([140, 90], 140).astype(jnp.int32)
    model = models.DecoderLM(CONFIG.replace(attention="xla"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    splash_graphdef, _ = nnx.split(models.DecoderLM(CONFIG.replace(attention="splash"),
                                                    rngs=nnx.Rngs(0)))  # fmt: skip

    def loss(graphdef, params):
        logits = nnx.merge(graphdef, params)(ids, attention_mask=mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0)[..., 3])

    value, grads = jax.value_and_grad(loss, argnums=1)(graphdef, params)
    splash_value, splash_grads = jax.value_and_grad(loss, argnums=1)(splash_graphdef, params)
    np.testing.assert_allclose(float(splash_value), float(value), rtol=F32_TOL)
    # A gradient element sums the contributions of many positions (an embedding row: every
    # place its token occurs), which cancel: its float32 rounding scales with the terms,
    # i.e. with the tensor's typical element, not with the element itself (on a 2-core AMD
    # EPYC, 2026-12-07, one embedding element of 0.1894 differed by 2.9e-5, 1.5e-4 of
    # itself; the tensor's root mean square is 8.3). Hence a tolerance relative to each
    # tensor's root mean square.
    for x, y in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(grads), strict=True):
        rms = float(np.sqrt(np.mean(np.square(np.asarray(y)))))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=F32_TOL, atol=F32_TOL * rms)


def test_model_attention_setting_is_checked():
    with pytest.raises(ValueError, match=r"ModelConfig\.attention must be one of"):
        CONFIG.replace(attention="flash")


def test_prefill_into_an_empty_cache_takes_the_plain_kernel():
    # The sampler's prefill promises an empty cache (`cache_is_empty`): the chunk then
    # attends to itself through `causal_attention` instead of a dense mask over every slot.
    # Same logits and the same cache as the dense path, left-padded prompts; then a decode
    # step from either cache agrees. Catches keys or values not written to the cache on
    # that path, or the wrong validity for left padding.
    model = models.DecoderLM(CONFIG.replace(attention="splash"), rngs=nnx.Rngs(1))
    ids = jax.random.randint(jax.random.key(7), (2, 40), 0, CONFIG.vocab_size)
    mask = _left_padded([40, 23], 40).astype(jnp.int32)
    outs = []
    for empty in (False, True):
        logits, cache = model(ids, attention_mask=mask, cache=model.init_cache(2, 48),
                              cache_is_empty=empty)  # fmt: skip
        step, _ = model(ids[:, :1], cache=cache)
        outs.append((logits, cache.k, cache.v, cache.positions, step))
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(outs[1][0])[real], np.asarray(outs[0][0])[real],
                               rtol=F32_TOL, atol=F32_TOL)  # fmt: skip
    for dense, plain in zip(outs[0][1:], outs[1][1:], strict=True):
        np.testing.assert_allclose(np.asarray(plain), np.asarray(dense), rtol=F32_TOL, atol=F32_TOL)
