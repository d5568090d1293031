"""medjax.models: cached decoding, padding, configs and the errors of bad checkpoint folders."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import models

CONFIG = models.ModelConfig(
    family="qwen3",
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    qk_norm=True,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def model():
    return models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))


@nnx.jit
def run(model, ids, mask=None, cache=None):
    """The model under jit: eager op-by-op dispatch would make these tests slow."""
    return model(ids, attention_mask=mask, cache=cache)


def test_cached_decoding_equals_full_forward(model):
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (3, 10)))
    full = run(model, ids)
    cache = model.init_cache(3, 16)
    logits, cache = run(model, ids[:, :4], cache=cache)  # Prefill.
    np.testing.assert_allclose(logits, full[:, :4], atol=1e-5)
    for t in range(4, 10):  # Then one token at a time.
        step, cache = run(model, ids[:, t : t + 1], cache=cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5, err_msg=f"token {t}")
    assert int(cache.index) == 10
    np.testing.assert_array_equal(cache.lengths, [10, 10, 10])


def test_left_padding_gives_the_unpadded_logits(model):
    ids = np.random.default_rng(2).integers(0, 97, (1, 6))
    alone = run(model, jnp.asarray(ids))
    padded = np.concatenate([np.zeros((1, 3), ids.dtype), ids], axis=1)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    got = run(model, jnp.asarray(padded), jnp.asarray(mask))
    np.testing.assert_allclose(got[:, 3:], alone, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(got)))
    # Decoding after a padded prefill continues at the right position.
    nxt = np.array([[5]])
    cache = model.init_cache(1, 12)
    _, cache = run(model, jnp.asarray(padded), jnp.asarray(mask), cache=cache)
    step, _ = run(model, jnp.asarray(nxt), cache=cache)
    want = run(model, jnp.asarray(np.concatenate([ids, nxt], axis=1)))[:, -1]
    np.testing.assert_allclose(step[:, 0], want, atol=1e-5)


def test_hidden_states_and_lm_head(model):
    ids = jnp.arange(8).reshape(2, 4)
    hidden = nnx.jit(lambda m, x: m(x, return_hidden=True))(model, ids)
    assert hidden.shape == (2, 4, CONFIG.hidden_size)
    np.testing.assert_allclose(hidden @ model.lm_head_weight(), run(model, ids), atol=1e-5)


def test_jit_matches_eager(model):
    ids = jnp.arange(12).reshape(2, 6) % 97
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
    np.testing.assert_allclose(jitted, model(ids), atol=1e-5)


def test_input_rank_error(model):
    with pytest.raises(ValueError, match=r"`input_ids` must be \[B, T\], got shape \(4,\)"):
        model(jnp.arange(4))


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "published"),
    [
        # Parameter counts published with the checkpoints.
        (dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
              num_heads=14, num_kv_heads=2, qkv_bias=True), 494_032_768),  # Qwen2.5-0.5B
        (dict(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
              num_layers=16, num_heads=32, num_kv_heads=8), 1_235_814_400),  # Llama-3.2-1B
        (dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
              num_layers=32, num_heads=32, num_kv_heads=8, tie_word_embeddings=False),
         8_030_261_248),  # Llama-3.1-8B
    ],
)  # fmt: skip
def test_num_params_matches_published_counts(config, published):
    assert models.ModelConfig(**config).num_params == published


def test_num_params_counts_the_model():
    m = nnx.eval_shape(lambda: models.DecoderLM(CONFIG, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
    assert sum(int(np.prod(x.shape)) for x in leaves) == CONFIG.num_params


def test_hf_config_round_trip_both_layouts():
    config = CONFIG.replace(
        family="llama", qk_norm=False, rope_theta=5e5,
        rope_scaling=models.RopeScaling(8.0, 1.0, 4.0, 8192),
    )  # fmt: skip
    hf = models.to_hf_config(config)
    assert models.from_hf_config(hf) == config
    # transformers 4 layout: rope_theta and rope_scaling at the top level.
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    assert models.from_hf_config(legacy) == config


def test_unsupported_configs_are_named():
    hf = models.to_hf_config(CONFIG)
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        models.from_hf_config({**hf, "model_type": "mistral"})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        models.from_hf_config({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    with pytest.raises(ValueError, match="use_sliding_window"):
        models.from_hf_config({**hf, "use_sliding_window": True})


# --- bad checkpoint folders --------------------------------------------------------------


@pytest.fixture
def saved(model, tmp_path):
    models.save_pretrained(model, tmp_path)
    return tmp_path


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        models.from_pretrained(saved)


def test_missing_tensor(saved):
    tensors = dict(models.read_safetensors(saved / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    models.write_safetensors(saved / "model.safetensors", tensors)
    with pytest.raises(
        models.CheckpointError,
        match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
        r"\(expected shape \(48, 32\)\)",
    ):
        models.from_pretrained(saved)


def test_wrong_shape(saved):
    tensors = dict(models.read_safetensors(saved / "model.safetensors"))
    tensors["model.norm.weight"] = np.ones(31, np.float32)
    models.write_safetensors(saved / "model.safetensors", tensors)
    with pytest.raises(
        models.CheckpointError, match=r"'model\.norm\.weight' has shape \(31,\); expected \(32,\)"
    ):
        models.from_pretrained(saved)


def test_unexpected_tensor(saved):
    tensors = dict(models.read_safetensors(saved / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = np.ones((2, 3), np.float32)
    models.write_safetensors(saved / "model.safetensors", tensors)
    with pytest.raises(
        models.CheckpointError,
        match=r"unexpected tensors.*'model\.layers\.0\.mlp\.extra\.weight' \(2, 3\)",
    ):
        models.from_pretrained(saved)


def test_pickle_only_folder_is_refused_unopened(saved):
    (saved / "model.safetensors").unlink()
    # Not a valid pickle at all: any attempt to unpickle it would fail differently.
    (saved / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(
        models.CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*never unpickles"
    ):
        models.from_pretrained(saved)


def test_config_errors_name_the_file(saved):
    hf = json.loads((saved / "config.json").read_text())
    del hf["hidden_size"]
    (saved / "config.json").write_text(json.dumps(hf))
    with pytest.raises(models.CheckpointError, match=r"config\.json: 'hidden_size'"):
        models.from_pretrained(saved)


def test_bfloat16_save_and_load(model, tmp_path):
    models.save_pretrained(model, tmp_path, dtype=jnp.bfloat16)
    raw = models.read_safetensors(tmp_path / "model.safetensors")
    assert raw["model.embed_tokens.weight"].dtype == jnp.bfloat16
    loaded = models.from_pretrained(tmp_path, dtype=jnp.float32)
    want = np.asarray(model.embed_tokens[...]).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(loaded.embed_tokens[...], want)
