"""Layers under `lax.scan` and rematerialised layers compute what the unrolled model computes.

The reference is the unrolled model without remat, built from the same seed: the scanned
model's stacked parameters are the unrolled layers' own, so logits and gradients must agree
to float32 rounding (1e-5; scan and the loop sum the same numbers in the same order, but XLA
may fuse them differently)."""

import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import models
from medjax.models import checkpoint as checkpoint_lib
from medjax.models import smollm2

CONFIG = models.ModelConfig(
    family="qwen3",
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    qk_norm=True,
    tie_word_embeddings=False,
)
POLICIES = ("none", "full", "save_dots", "offload_dots")


def by_hf_name(grads, config) -> dict[str, np.ndarray]:
    """Gradient (or parameter) arrays keyed by Hugging Face name, a stacked one split per
    layer: the two layouts compared name by name."""
    model = nnx.merge(nnx.graphdef(models.DecoderLM(config, rngs=nnx.Rngs(0))), grads)
    return {name: np.asarray(a) for name, a in checkpoint_lib._hf_tensors(model, None)}


def loss(model, ids):
    # Every logit weighs in with its own weight, so a wrong layer anywhere moves the loss.
    logits = model(ids)
    return jnp.sum(jnp.sin(logits) * jnp.arange(logits.shape[-1]) / logits.shape[-1])


@nnx.jit
def logits_and_grads(model, ids):
    return model(ids), nnx.grad(loss)(model, ids)


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 9)))


@pytest.fixture(scope="module")
def reference(ids):
    logits, grads = logits_and_grads(models.DecoderLM(CONFIG, rngs=nnx.Rngs(0)), ids)
    return np.asarray(logits), by_hf_name(grads, CONFIG)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("remat", POLICIES)
def test_logits_and_gradients_equal_the_unrolled_model(ids, reference, scan, remat):
    # Catches: the scan visiting layers out of order or reusing one layer's parameters, a
    # layer's cache or index mixed up, a remat policy that changes the numbers.
    config = CONFIG.replace(scan_layers=scan, remat=remat)
    model = models.DecoderLM(config, rngs=nnx.Rngs(0))
    logits, grads = logits_and_grads(model, ids)
    np.testing.assert_allclose(logits, reference[0], atol=1e-5, rtol=0)
    grads = by_hf_name(grads, config)
    assert grads.keys() == reference[1].keys()
    for name, g in grads.items():
        np.testing.assert_allclose(g, reference[1][name], atol=1e-5, rtol=0, err_msg=name)


def test_the_scanned_model_stacks_the_layers_on_a_leading_layers_axis():
    # Catches: stacked parameters without the "layers" logical axis (sharding rules would
    # then shard the depth axis as if it were the first model axis).
    model = models.DecoderLM(CONFIG.replace(scan_layers=True), rngs=nnx.Rngs(0))
    q = model.layers.self_attn.q_proj.kernel
    assert q.shape == (3, 32, 64)
    assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
    unrolled = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(q[...][2], unrolled.layers[2].self_attn.q_proj.kernel[...])


def test_each_policy_keeps_what_it_says(ids):
    # Catches: remat not applied (every policy keeping the same residuals), or the policy
    # table mixed up. Counted on one layer's residuals for the backward pass, in bytes.
    def saved(remat):
        model = models.DecoderLM(CONFIG.replace(remat=remat), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # One line per residual: "f32[2,9,32] ...".
            jax.ad_checkpoint.print_saved_residuals(
                lambda p: loss(nnx.merge(graphdef, p), ids), params
            )
        shapes = re.findall(r"^\w+\[([\d,]*)\]", printed.getvalue(), re.MULTILINE)
        return sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)

    none, full, dots = saved("none"), saved("full"), saved("save_dots")
    assert full < dots < none, (full, dots, none)


def test_cached_decoding_through_the_scan_equals_the_full_forward(ids, reference):
    # Catches: a scanned layer writing its keys into another layer's rows of the cache.
    model = models.DecoderLM(CONFIG.replace(scan_layers=True), rngs=nnx.Rngs(0))
    cache = model.init_cache(2, 12)
    first, cache = nnx.jit(lambda m, x, c: m(x, cache=c))(model, ids[:, :6], cache)
    steps = [first]
    for t in range(6, 9):
        out, cache = nnx.jit(lambda m, x, c: m(x, cache=c))(model, ids[:, t : t + 1], cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), reference[0], atol=1e-5, rtol=0)


def test_export_and_import_keep_the_hugging_face_names(tmp_path, ids, reference):
    # Catches: a stacked tensor written under one name, layers written in the wrong order,
    # a transposed layer; both layouts load either export.
    scanned = models.DecoderLM(CONFIG.replace(scan_layers=True), rngs=nnx.Rngs(0))
    unrolled = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    models.save_pretrained(scanned, tmp_path / "scanned")
    models.save_pretrained(unrolled, tmp_path / "unrolled")
    a = models.read_safetensors(tmp_path / "scanned" / "model.safetensors")
    b = models.read_safetensors(tmp_path / "unrolled" / "model.safetensors")
    assert a.keys() == b.keys() and "model.layers.2.self_attn.q_proj.weight" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    loaded = models.from_pretrained(tmp_path / "unrolled", scan_layers=True)
    assert loaded.config.scan_layers and loaded.layers.mlp.up_proj.kernel.shape == (3, 32, 48)
    np.testing.assert_allclose(nnx.jit(lambda m: m(ids))(loaded), reference[0], atol=1e-5)


@pytest.mark.slow
def test_smollm2_scanned_and_rematerialised_equals_the_unrolled_model():
    # The real model (30 layers, GQA 9/3, tied embedding) from its GGUF file, loaded both
    # ways. Catches: the GGUF loader stacking a layer's tensors in the wrong order (the
    # q/k un-permutation is per layer), and anything the tiny model is too small to show.
    path = smollm2.gguf_path()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 49152, (1, 12)))
    unrolled = models.from_pretrained(path)
    scanned = models.from_pretrained(path, scan_layers=True, remat="full")
    want_logits, want_grads = logits_and_grads(unrolled, ids)
    got_logits, got_grads = logits_and_grads(scanned, ids)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
    want = {n: np.asarray(a) for n, a in checkpoint_lib._hf_tensors(
        nnx.merge(nnx.graphdef(unrolled), want_grads), None)}  # fmt: skip
    got = {n: np.asarray(a) for n, a in checkpoint_lib._hf_tensors(
        nnx.merge(nnx.graphdef(scanned), got_grads), None)}  # fmt: skip
    assert got.keys() == want.keys() and len(got) == 30 * 9 + 2
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)
