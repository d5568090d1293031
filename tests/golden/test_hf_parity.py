"""medjax models against transformers' PyTorch implementations on the same random weights,
and medjax's LoRA adapters against PEFT's.

Tiny Qwen2, Qwen3 and Llama (with Llama-3 RoPE scaling) models are built here from configs,
saved with transformers' own save_pretrained, and loaded by medjax: no download anywhere.
"""

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

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


# LoRA adapters against PEFT on transformers: the same adapter, written by medjax as a PEFT
# folder (or merged into a Hugging Face folder), gives transformers the logits medjax
# computes. The adapters get random non-zero B matrices, since a new adapter (B = 0)
# changes nothing.


def with_random_b(model, seed=1):
    """`model` with every lora_b drawn at random (std 0.3): an adapter that has trained."""
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(state):
        if path[-1] == "lora_b":
            value = variable.get_value()
            variable.set_value(jnp.asarray(0.3 * rng.standard_normal(value.shape), value.dtype))
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("scan", [False, True])
def test_a_new_adapter_changes_no_logit(hf_folder, scan):
    # B starts at zero: x W + scale (x A) 0 adds exact zeros. Catches B drawn at random, or
    # the adapter's path changing the base computation (a cast, a reordered sum).
    _, folder, _ = hf_folder
    base = models.from_pretrained(folder, scan_layers=scan)
    adapted = models.from_pretrained(folder, scan_layers=scan, lora=models.LoraConfig(rank=4))
    assert len(nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))) == 2 * 7 * (1 if scan else 2)
    np.testing.assert_array_equal(
        np.asarray(adapted(jnp.asarray(IDS))), np.asarray(base(jnp.asarray(IDS)))
    )


@pytest.mark.parametrize(
    "scan,targets",
    [(False, models.config.LORA_TARGETS), (True, ("q_proj", "v_proj", "down_proj"))],
)
def test_peft_loads_the_adapter_onto_the_base_with_the_same_logits(
    hf_folder, tmp_path, scan, targets
):
    # Catches: A or B not transposed into PEFT's [r, in] / [out, r], the scale other than
    # lora_alpha / r (alpha 32 over rank 4 here: 8), module names PEFT does not find (it
    # would warn and leave them base), a stacked (scanned) adapter split in the wrong layer
    # order, and target_modules not honoured.
    _, folder, base_logits = hf_folder
    lora = models.LoraConfig(rank=4, alpha=32.0, target_modules=targets)
    model = with_random_b(models.from_pretrained(folder, scan_layers=scan, lora=lora))
    want = np.asarray(model(jnp.asarray(IDS)))
    assert np.abs(want - base_logits).max() > 0.1  # The adapter matters.
    models.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(folder))
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        got = adapted(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert sorted(adapted.peft_config["default"].target_modules) == sorted(targets)


def test_the_merged_export_is_the_adapted_model(hf_folder, tmp_path):
    # save_pretrained writes W + scale A B: transformers alone, without PEFT, gives the
    # adapted logits; merge_lora=False writes the base weights untouched. Catches a merge
    # with A B transposed against the kernel, a missing scale, or adapters left in the file.
    _, folder, base_logits = hf_folder
    lora = models.LoraConfig(rank=4, alpha=32.0)
    model = with_random_b(models.from_pretrained(folder, scan_layers=True, lora=lora))
    want = np.asarray(model(jnp.asarray(IDS)))
    models.save_pretrained(model, tmp_path / "merged")
    models.save_pretrained(model, tmp_path / "base", merge_lora=False)
    for name, expected in [("merged", want), ("base", base_logits)]:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)
        with torch.no_grad():
            got = loaded(torch.tensor(IDS)).logits.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=name)
    assert not any(
        "lora" in k for k in models.read_safetensors(tmp_path / "merged/model.safetensors")
    )


def test_adapters_are_a_separate_kind_of_parameter():
    # What a trainer filters on: nnx.LoRAParam selects the adapters alone (A [in, r],
    # B [r, out]), which are also Params (so the model's Param state holds them as well).
    config = models.ModelConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
        num_kv_heads=1, lora=models.LoraConfig(rank=3, target_modules=("q_proj", "up_proj")),
    )  # fmt: skip
    model = models.DecoderLM(config, rngs=nnx.Rngs(0))
    shapes = {
        "/".join(map(str, p)): v.get_value().shape
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    }
    assert shapes == {
        "layers/0/self_attn/q_proj/lora_a": (16, 3),
        "layers/0/self_attn/q_proj/lora_b": (3, 16),
        "layers/0/mlp/up_proj/lora_a": (16, 3),
        "layers/0/mlp/up_proj/lora_b": (3, 24),
    }
    a = np.asarray(model.layers[0].self_attn.q_proj.lora_a.get_value())
    assert 0 < np.abs(a).max() <= 1 / 4  # Uniform in +-1/sqrt(16).
    assert not np.asarray(model.layers[0].self_attn.q_proj.lora_b.get_value()).any()
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        models.LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"LoraConfig.rank must be an integer >= 1, got 0\."):
        models.LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"LoraConfig.alpha must be a number > 0, got -1\.0\."):
        models.LoraConfig(alpha=-1.0)
    with pytest.raises(ValueError, match=r"save_peft_adapter: the model has no LoRA adapters"):
        models.save_peft_adapter(models.DecoderLM(config.replace(lora=None), rngs=nnx.Rngs(0)), "x")
    with pytest.raises(ValueError, match=r"target_modules \('qkv',\): each must be one of"):
        models.LoraConfig(target_modules=("qkv",))
