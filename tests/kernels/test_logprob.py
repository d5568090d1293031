"""`fused_logprob` ("xla" scan and Pallas kernels in interpret mode) vs its reference twin.

The reference materialises the logits and differentiates by plain autodiff; expectations
that need no oracle (uniform rows: log p = -log V and entropy = log V) are worked by hand.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from medjax.kernels import logprob

BLOCK_V = 256
# Pallas interpret mode runs the grid as a loop: few, large tiles keep the tests fast.
TILES = {"xla": dict(block_v=BLOCK_V), "pallas": dict(block_n=128, block_v=BLOCK_V)}


def _inputs(n, d, v, *, seed=0, dtype=jnp.float32):
    """hidden ~ N(0, 1) and lm_head ~ N(0, 1/d): logits of unit scale, like a trained head.
    The first targets sit on tile edges: V - 1, 0, BLOCK_V, BLOCK_V - 1."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, d))
    lm_head = rng.normal(size=(d, v)) / np.sqrt(d)
    targets = rng.integers(0, v, n)
    edges = [v - 1, 0, BLOCK_V, BLOCK_V - 1][:n]
    targets[: len(edges)] = edges
    return jnp.asarray(hidden, dtype), jnp.asarray(lm_head, dtype), jnp.asarray(targets, jnp.int32)


def _cotangents(n, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=n), jnp.float32), jnp.asarray(
        rng.normal(size=n), jnp.float32
    )


def _fused(impl, **kwargs):
    return functools.partial(logprob.fused_logprob, impl=impl, **TILES[impl], **kwargs)


def _weighted_loss(fn, g_logp, g_ent):
    """sum(g_logp * logp + g_ent * entropy): per-token cotangents for both outputs."""

    def loss(hidden, lm_head, targets):
        logp, entropy = fn(hidden, lm_head, targets, return_entropy=True)
        return jnp.sum(g_logp * logp) + jnp.sum(g_ent * entropy)

    return loss


XLA_CASES = [(n, d, v) for n in (1, 7, 256) for d in (64, 96) for v in (1000, 1031, 4096)]
# Interpret mode is slower to compile and run; a subset in which every N, D and V appears.
PALLAS_CASES = [(1, 64, 1000), (7, 96, 1031), (256, 64, 4096), (256, 96, 1031), (7, 64, 4096)]
FORWARD_CASES = [("xla", *c) for c in XLA_CASES] + [("pallas", *c) for c in PALLAS_CASES]


@pytest.mark.parametrize(
    ("impl", "n", "d", "v", "temperature"),
    [(*case, (0.3, 1.0, 2.0)[i % 3]) for i, case in enumerate(FORWARD_CASES)],
)
def test_forward_matches_reference(impl, n, d, v, temperature):
    hidden, lm_head, targets = _inputs(n, d, v)
    fused = jax.jit(_fused(impl, temperature=temperature, return_entropy=True))
    logp, entropy = fused(hidden, lm_head, targets)
    # The reference in float64: in float32 its entropy, a plain sum of V terms, is itself up
    # to 1.1e-5 from the exact value (V=4096, seen on one machine), the fused kernel's 5e-6.
    with jax.enable_x64(True):
        ref_logp, ref_entropy = logprob.reference_fused_logprob(
            *_inputs(n, d, v, dtype=jnp.float64), temperature=temperature, return_entropy=True
        )
    assert logp.shape == entropy.shape == (n,)
    assert logp.dtype == entropy.dtype == jnp.float32
    np.testing.assert_allclose(logp, ref_logp, rtol=0, atol=1e-5)
    np.testing.assert_allclose(entropy, ref_entropy, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_logp_only_equals_logp_of_pair(impl):
    hidden, lm_head, targets = _inputs(7, 64, 1031)
    logp = jax.jit(_fused(impl, temperature=0.7))(hidden, lm_head, targets)
    pair = jax.jit(_fused(impl, temperature=0.7, return_entropy=True))(hidden, lm_head, targets)
    assert logp.shape == (7,)
    np.testing.assert_array_equal(logp, pair[0])


def test_auto_is_xla_on_cpu_and_jit_matches_eager():
    hidden, lm_head, targets = _inputs(7, 64, 1000)
    auto = logprob.fused_logprob(hidden, lm_head, targets, block_v=BLOCK_V)
    xla = jax.jit(_fused("xla"))(hidden, lm_head, targets)
    np.testing.assert_allclose(auto, xla, rtol=0, atol=1e-6)


def test_interpret_follows_the_platform_unless_given():
    # interpret=None picks interpret mode from the platform the program is lowered for (CPU
    # here); an explicit False is kept, and Pallas rejects it on CPU. The TPU side is
    # tests/kernels/test_tpu_lowering.py.
    hidden, lm_head, targets = _inputs(7, 64, 1000)
    chosen = jax.jit(_fused("pallas"))(hidden, lm_head, targets)
    given = jax.jit(_fused("pallas", interpret=True))(hidden, lm_head, targets)
    np.testing.assert_array_equal(chosen, given)
    with pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):
        jax.jit(_fused("pallas", interpret=False))(hidden, lm_head, targets)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_no_rows(impl):
    hidden, lm_head, targets = _inputs(0, 64, 1000)
    logp, entropy = _fused(impl, return_entropy=True)(hidden, lm_head, targets)
    assert logp.shape == entropy.shape == (0,)
    loss = _weighted_loss(_fused(impl), jnp.zeros(0), jnp.zeros(0))
    d_hidden, d_lm_head = jax.grad(loss, argnums=(0, 1))(hidden, lm_head, targets)
    assert d_hidden.shape == (0, 64)
    np.testing.assert_array_equal(d_lm_head, np.zeros((64, 1000)))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bf16_inputs_accumulate_in_float32(impl):
    hidden, lm_head, targets = _inputs(256, 64, 1031)
    fused = jax.jit(_fused(impl, return_entropy=True))
    out = fused(hidden.astype(jnp.bfloat16), lm_head.astype(jnp.bfloat16), targets)
    assert all(x.dtype == jnp.float32 for x in out)
    # Against the float32 values: only the bf16 rounding of the inputs separates them.
    ref_f32 = logprob.reference_fused_logprob(hidden, lm_head, targets, return_entropy=True)
    # Against the same bf16 values upcast: float32 accumulation leaves ~1e-6; a bf16
    # accumulator would miss by ~1e-2.
    ref_bf16 = logprob.reference_fused_logprob(
        hidden.astype(jnp.bfloat16).astype(jnp.float32),
        lm_head.astype(jnp.bfloat16).astype(jnp.float32),
        targets,
        return_entropy=True,
    )
    for got, want_f32, want_bf16 in zip(out, ref_f32, ref_bf16, strict=True):
        np.testing.assert_allclose(got, want_f32, rtol=0, atol=2e-2)
        np.testing.assert_allclose(got, want_bf16, rtol=0, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_extreme_logits_stay_finite_and_bounded(impl):
    n, d, v = 16, 64, 1031
    hidden, lm_head, targets = _inputs(n, d, v)
    # Logits of size ~1e4 of both signs: log-softmax is all but one-hot.
    sign = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    hidden = hidden * 1e4 * sign
    fused = jax.jit(_fused(impl, temperature=0.3, return_entropy=True))
    logp, entropy = fused(hidden, lm_head, targets)
    assert np.isfinite(logp).all() and np.isfinite(entropy).all()
    assert (logp <= 0).all()
    # log V in float32 may round down by an ulp relative to the kernel's sum of V ones.
    assert (entropy >= 0).all() and (entropy <= np.log(v) + 1e-6).all()
    ref_logp, ref_entropy = logprob.reference_fused_logprob(
        hidden, lm_head, targets, temperature=0.3, return_entropy=True
    )
    # float32 logits of size ~1e5 (after / 0.3) carry absolute rounding of ~1e-2.
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-6, atol=3e-2)
    np.testing.assert_allclose(entropy, ref_entropy, rtol=0, atol=3e-2)
    loss = _weighted_loss(_fused(impl, temperature=0.3), *_cotangents(n))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(hidden, lm_head, targets)
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_uniform_rows_give_log_vocab(impl):
    """All logits of a row equal (lm_head's columns identical): p = 1/V for every token, so
    log p = -log V and entropy = log V, at any logit scale, whatever the target."""
    n, d, v = 9, 64, 1031
    hidden, _, targets = _inputs(n, d, v)
    column = jnp.asarray(np.random.default_rng(3).normal(size=(d, 1)), jnp.float32)
    lm_head = jnp.tile(column, (1, v))
    scale = jnp.asarray([1e4, -1e4, 1.0, 0.0, 1e-3, 3e3, -7.0, 1e2, 5.0])[:, None]
    fused = jax.jit(_fused(impl, temperature=2.0, return_entropy=True))
    logp, entropy = fused(hidden * scale, lm_head, targets)
    np.testing.assert_allclose(logp, np.full(n, -np.log(v)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(entropy, np.full(n, np.log(v)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_masked_rows_contribute_exactly_zero(impl):
    """Rows whose loss cotangents are zero (padding, masked tokens) leave d lm_head bitwise
    unchanged whatever their hidden states and targets, and get d hidden = 0 exactly."""
    n, d, v = 130, 64, 1031  # N not a multiple of block_n: Pallas also pads rows.
    hidden, lm_head, targets = _inputs(n, d, v)
    g_logp, g_ent = _cotangents(n)
    masked = np.arange(n) % 3 == 0
    g_logp, g_ent = jnp.where(masked, 0.0, g_logp), jnp.where(masked, 0.0, g_ent)
    grad = jax.jit(jax.grad(_weighted_loss(_fused(impl), g_logp, g_ent), argnums=(0, 1)))
    d_hidden, d_lm_head = grad(hidden, lm_head, targets)

    other_hidden, _, other_targets = _inputs(n, d, v, seed=7)
    hidden2 = jnp.where(masked[:, None], 30.0 * other_hidden, hidden)
    targets2 = jnp.where(masked, other_targets, targets)
    d_hidden2, d_lm_head2 = grad(hidden2, lm_head, targets2)

    assert (d_hidden[masked] == 0).all() and (d_hidden2[masked] == 0).all()
    np.testing.assert_array_equal(d_hidden2, d_hidden)
    np.testing.assert_array_equal(d_lm_head2, d_lm_head)
    assert np.abs(d_lm_head).max() > 0 and np.abs(d_hidden[~masked]).min() > 0


GRAD_CASES = [
    ("xla", 7, 64, 1031, 0.3),
    ("xla", 256, 96, 4096, 1.0),
    ("xla", 1, 64, 1000, 2.0),
    ("pallas", 7, 96, 1031, 0.3),
    ("pallas", 256, 64, 1000, 2.0),
]


@pytest.mark.parametrize(("impl", "n", "d", "v", "temperature"), GRAD_CASES)
def test_gradients_match_reference(impl, n, d, v, temperature):
    hidden, lm_head, targets = _inputs(n, d, v)
    cotangents = _cotangents(n)
    fused = _fused(impl, temperature=temperature)
    reference = functools.partial(logprob.reference_fused_logprob, temperature=temperature)
    for with_entropy in (True, False):
        if with_entropy:
            loss, ref_loss = (_weighted_loss(f, *cotangents) for f in (fused, reference))
        else:

            def loss(h, w, y):
                return jnp.sum(cotangents[0] * fused(h, w, y))

            def ref_loss(h, w, y):
                return jnp.sum(cotangents[0] * reference(h, w, y))

        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(hidden, lm_head, targets)
        ref_grads = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(hidden, lm_head, targets)
        for got, want in zip(grads, ref_grads, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            # Each entry sums up to max(N, V) float32 products whose rounding is relative
            # to the logits' scale (larger at T = 0.3); 1e-5 of the largest entry bounds it.
            atol = 1e-5 * max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_check_grads_float64(impl):
    with jax.enable_x64(True):
        hidden, lm_head, targets = _inputs(5, 8, 37, dtype=jnp.float64)
        targets = jnp.asarray([36, 0, 16, 15, 20])  # Edges of 16-wide tiles, and the last id.
        fn = functools.partial(
            logprob.fused_logprob,
            targets=targets,
            temperature=0.7,
            return_entropy=True,
            impl=impl,
            block_n=8,
            block_v=16,
        )
        logp, _ = fn(hidden, lm_head)
        assert logp.dtype == jnp.float64
        test_util.check_grads(fn, (hidden, lm_head), order=1, modes=("rev",))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_tied_embedding_gradient(impl):
    """With tied weights the caller passes embedding.T; the gradient reaches the [V, D]
    embedding through the transpose."""
    hidden, lm_head, targets = _inputs(7, 64, 1031)
    embedding = lm_head.T
    cotangents = _cotangents(7)
    loss = _weighted_loss(_fused(impl), *cotangents)
    ref_loss = _weighted_loss(logprob.reference_fused_logprob, *cotangents)
    got = jax.jit(jax.grad(lambda e: loss(hidden, e.T, targets)))(embedding)
    want = jax.jit(jax.grad(lambda e: ref_loss(hidden, e.T, targets)))(embedding)
    assert got.shape == embedding.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


def _avals(jaxpr):
    """Every abstract value in a closed jaxpr, sub-jaxprs (scan bodies, custom VJPs) too."""
    for eqn in jaxpr.eqns:
        for var in (*eqn.invars, *eqn.outvars):
            if hasattr(var, "aval"):
                yield var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_grad_traces_and_jits_without_nxv_values(impl):
    """The custom VJP traces under make_jaxpr(grad) (Levanter PR #3045's failure) and no
    value of the forward or backward is [N, V]."""
    n, d, v = 48, 64, 1031
    hidden, lm_head, targets = _inputs(n, d, v)
    loss = _weighted_loss(_fused(impl), *_cotangents(n))
    grad = jax.grad(loss, argnums=(0, 1))
    jaxpr = jax.make_jaxpr(grad)(hidden, lm_head, targets)
    shapes = {tuple(a.shape) for a in _avals(jaxpr.jaxpr) if hasattr(a, "shape")}
    assert (n, BLOCK_V) in shapes or impl == "pallas"
    assert (n, v) not in shapes
    if impl == "pallas":
        assert "pallas_call" in str(jaxpr)
    d_hidden, d_lm_head = jax.jit(grad)(hidden, lm_head, targets)
    assert d_hidden.shape == (n, d) and d_lm_head.shape == (d, v)


def _memory(fn, *args):
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return stats


def test_xla_memory_does_not_grow_with_n_times_v():
    n, d = 2048, 64
    fields = [f for f in dir(_memory(jnp.sin, jnp.ones(4))) if f.endswith("_in_bytes")]
    print("memory_analysis fields:", fields)

    def temp_bytes(fn, v, grad):
        args = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )
        if grad:
            fn = jax.grad(_weighted_loss(fn, *_cotangents(n)), argnums=(0, 1))
        else:
            fn = functools.partial(fn, return_entropy=True)
        return _memory(fn, *args).temp_size_in_bytes

    fused = functools.partial(logprob.fused_logprob, impl="xla", block_v=512)
    for grad in (False, True):
        v = 32768
        logits_bytes = n * v * 4
        fused_temp = temp_bytes(fused, v, grad)
        ref_temp = temp_bytes(logprob.reference_fused_logprob, v, grad)
        fused_temp_2v = temp_bytes(fused, 2 * v, grad)
        print(f"grad={grad}: fused {fused_temp} (2V: {fused_temp_2v}), reference {ref_temp} B")
        assert ref_temp >= logits_bytes
        assert fused_temp < logits_bytes / 10
        assert fused_temp_2v < 1.1 * fused_temp


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        (((4,), (8, 16), (4,)), {}, r"\(4,\), \(8, 16\) and \(4,\)"),
        (((4, 8), (9, 16), (4,)), {}, r"hidden \[N, D\] has shape \(4, 8\).*\(9, 16\)"),
        (((4, 8), (8, 16), (5,)), {}, r"targets \[N\] has shape \(5,\).*\(4, 8\)"),
        (((4, 8), (8, 16), (4, 1)), {}, r"\(4, 8\), \(8, 16\) and \(4, 1\)"),
        (((4, 8), (8, 16), (4,)), {"temperature": 0.0}, "temperature"),
        (((4, 8), (8, 16), (4,)), {"impl": "triton"}, "impl"),
        (((4, 8), (8, 16), (4,)), {"block_v": 0}, "block_v"),
    ],
)
def test_bad_inputs_raise(shapes, kwargs, match):
    hidden, lm_head, targets = (jnp.zeros(s) for s in shapes)
    targets = targets.astype(jnp.int32)
    with pytest.raises(ValueError, match=match):
        logprob.fused_logprob(hidden, lm_head, targets, **kwargs)


def test_float_targets_raise():
    with pytest.raises(ValueError, match="targets"):
        logprob.fused_logprob(jnp.zeros((4, 8)), jnp.zeros((8, 16)), jnp.zeros(4))
