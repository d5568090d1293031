"""medjax models against transformers' PyTorch implementations on the same random weights.

Tiny Qwen2, Qwen3 and Llama (with Llama-3 RoPE scaling) models are built here from configs,
saved with transformers' own save_pretrained, and loaded by medjax: no download anywhere.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from medjax import models

COMMON = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FAMILIES = {
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=True)
    ),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **COMMON,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    ),
}
IDS = np.random.default_rng(0).integers(0, 211, (2, 40))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_folder(request, tmp_path_factory):
    torch.manual_seed(0)
    model = FAMILIES[request.param]()
    with torch.no_grad():  # Non-trivial norm weights and biases, not the ones/zeros of init.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits.numpy()
    return request.param, folder, logits


def test_logits_match_transformers(hf_folder):
    family, folder, want = hf_folder
    model = models.from_pretrained(folder, dtype=jnp.float32)
    assert model.config.family == family
    got = model(jnp.asarray(IDS))
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_save_pretrained_round_trips_through_transformers(hf_folder, tmp_path):
    _, folder, want = hf_folder
    models.save_pretrained(models.from_pretrained(folder), tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        got = reloaded(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_sharded_index_round_trip(hf_folder, tmp_path):
    _, folder, want = hf_folder
    # A tiny shard limit forces model-0000i-of-0000n files and an index.
    models.save_pretrained(models.from_pretrained(folder), tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    got = models.from_pretrained(tmp_path)(jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        np.testing.assert_allclose(
            reloaded(torch.tensor(IDS)).logits.numpy(), want, atol=1e-4, rtol=0
        )


def test_bfloat16_load_stays_close(hf_folder):
    _, folder, want = hf_folder
    model = models.from_pretrained(folder, dtype=jnp.bfloat16)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    got = model(jnp.asarray(IDS))
    assert got.dtype == jnp.float32
    # bf16 keeps 8 bits of mantissa: logits of magnitude ~2 agree to a few 1e-2.
    assert np.abs(np.asarray(got) - want).max() < 0.15
