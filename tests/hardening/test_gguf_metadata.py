"""Careless GGUF metadata: each field medjax reads is checked, and a bad one is refused with one
line `<file>: <field>: <what is wrong>` (a ValueError) instead of a ZeroDivisionError, an
IndexError, a TypeError, a blamed "partial RoPE" or a NaN loss.

The files are written by the `gguf` library's GGUFWriter: a one-layer llama model (random
numpy tensors in llama.cpp's names) and a hand-made byte-level vocabulary. The unaltered file
loads, with hand-known sizes and token ids, so the checks cannot be refusing everything.
"""

import math

import gguf
import numpy as np
import pytest
import tokenizers

from medjax import models
from medjax.models import ModelConfig
from medjax.models import tokenizer as tokenizer_lib

# The byte-level alphabet (every byte's symbol), two merged tokens and two control tokens.
ALPHABET = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
TOKENS = [*ALPHABET, "ab", "abc", "<|end|>", "<|pad|>"]
V = len(TOKENS)  # 260
D, H, KV, K, F = 16, 4, 2, 4, 24
TENSORS = {  # Numpy order (the reverse of ggml's): [out, in].
    "token_embd.weight": (V, D),
    "output_norm.weight": (D,),
    "blk.0.attn_norm.weight": (D,),
    "blk.0.ffn_norm.weight": (D,),
    "blk.0.attn_q.weight": (H * K, D),
    "blk.0.attn_k.weight": (KV * K, D),
    "blk.0.attn_v.weight": (KV * K, D),
    "blk.0.attn_output.weight": (D, H * K),
    "blk.0.ffn_gate.weight": (F, D),
    "blk.0.ffn_up.weight": (F, D),
    "blk.0.ffn_down.weight": (D, F),
}
# SmolLM2's layout: no key_length (the head size is embedding_length / head_count).
FIELDS = {
    "llama.context_length": ("uint32", 64),
    "llama.embedding_length": ("uint32", D),
    "llama.block_count": ("uint32", 1),
    "llama.feed_forward_length": ("uint32", F),
    "llama.attention.head_count": ("uint32", H),
    "llama.attention.head_count_kv": ("uint32", KV),
    "llama.rope.dimension_count": ("uint32", K),
    "llama.rope.freq_base": ("float32", 10000.0),
    "llama.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
    "tokenizer.ggml.model": ("string", "gpt2"),
    "tokenizer.ggml.pre": ("string", "default"),
    "tokenizer.ggml.tokens": ("array", TOKENS),
    "tokenizer.ggml.token_type": ("array", [1] * (V - 2) + [3, 3]),
    "tokenizer.ggml.merges": ("array", ["a b", "ab c"]),
    "tokenizer.ggml.bos_token_id": ("uint32", V - 2),
    "tokenizer.ggml.eos_token_id": ("uint32", V - 2),
    "tokenizer.ggml.padding_token_id": ("uint32", V - 1),
    "tokenizer.ggml.add_bos_token": ("bool", False),
}


def write(path, shapes=None, **changes):
    """The tiny llama file with `changes` (field -> (writer kind, value), or None to drop) and
    tensor `shapes` replaced."""
    fields = {**FIELDS, **changes}
    w = gguf.GGUFWriter(path, "llama")
    for key, spec in fields.items():
        if spec is not None:
            kind, value = spec
            getattr(w, f"add_{kind}")(key, value)
    rng = np.random.default_rng(0)
    for name, shape in {**TENSORS, **(shapes or {})}.items():
        w.add_tensor(name, rng.normal(size=shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_unaltered_file_loads(tmp_path):
    path = write(tmp_path / "ok.gguf")
    config = models.from_pretrained(path).config
    assert (config.vocab_size, config.hidden_size, config.num_heads) == (260, 16, 4)
    assert (config.num_kv_heads, config.head_dim, config.intermediate_size) == (2, 4, 24)
    assert (config.rms_norm_eps, config.rope_theta) == (pytest.approx(1e-5), 10000.0)
    assert (config.eos_token_id, config.pad_token_id, config.max_position_embeddings) == (
        258,
        259,
        64,
    )
    tok = tokenizer_lib.load_tokenizer(path)
    # "abc" merges a+b then ab+c; " ab" is "Ġ" + "ab" (no merge joins Ġ and ab).
    want = [TOKENS.index("abc"), TOKENS.index("Ġ"), TOKENS.index("ab")]
    assert tok.encode("abc ab") == want
    assert (tok.eos_token, tok.pad_token) == ("<|end|>", "<|pad|>")


def u32(v):
    return ("uint32", v)


def f32(v):
    return ("float32", v)


MODEL_CASES = {
    # Sizes and counts: integers >= 1.
    "head_count=0": (
        {"llama.attention.head_count": u32(0)},
        "llama.attention.head_count: must be an integer >= 1, got 0.",
    ),
    "embedding_length=0": (
        {"llama.embedding_length": u32(0)},
        "llama.embedding_length: must be an integer >= 1, got 0.",
    ),
    "head_count_kv=0": (
        {"llama.attention.head_count_kv": u32(0)},
        "llama.attention.head_count_kv: must be an integer >= 1, got 0.",
    ),
    "block_count=0": (
        {"llama.block_count": u32(0)},
        "llama.block_count: must be an integer >= 1, got 0.",
    ),
    "feed_forward_length=0": (
        {"llama.feed_forward_length": u32(0)},
        "llama.feed_forward_length: must be an integer >= 1, got 0.",
    ),
    "context_length=0": (
        {"llama.context_length": u32(0)},
        "llama.context_length: must be an integer >= 1, got 0.",
    ),
    "key_length=0": (
        {"llama.attention.key_length": u32(0)},
        "llama.attention.key_length: must be an integer >= 1, got 0.",
    ),
    "vocab_size=0": (
        {"llama.vocab_size": u32(0)},
        "llama.vocab_size: must be an integer >= 1, got 0.",
    ),
    "head_count float": (
        {"llama.attention.head_count": f32(4.0)},
        "llama.attention.head_count: must be an integer >= 1, got 4.0.",
    ),
    "head_count missing": (
        {"llama.attention.head_count": None},
        "llama.attention.head_count: missing; the field is required.",
    ),
    # Divisibility, and sizes against the tensors that show them.
    "kv does not divide": (
        {"llama.attention.head_count_kv": u32(3)},
        "llama.attention.head_count_kv: 3 does not divide llama.attention.head_count (4).",
    ),
    "head_count=7": (
        {"llama.attention.head_count": u32(7), "llama.attention.head_count_kv": u32(1)},
        "llama.attention.head_count: 7 does not divide llama.embedding_length (16), and"
        " llama.attention.key_length (the head size) is not given.",
    ),
    "head_count=7 with key_length": (
        {
            "llama.attention.head_count": u32(7),
            "llama.attention.head_count_kv": u32(1),
            "llama.attention.key_length": u32(4),
        },
        "llama.attention.head_count: 7 heads of size 4 (llama.attention.key_length) make 28"
        " rows, but tensor 'blk.0.attn_q.weight' has 16.",
    ),
    "head_count=2": (  # Divides 16, but the head size 8 it implies is not the tensors' 4.
        {"llama.attention.head_count": u32(2)},
        "llama.attention.head_count_kv: 2 heads of size 8 (llama.embedding_length /"
        " llama.attention.head_count) make 16 rows, but tensor 'blk.0.attn_k.weight' has 8.",
    ),
    "embedding_length=1024": (
        {"llama.embedding_length": u32(1024)},
        "llama.embedding_length: 1024, but tensor 'token_embd.weight' holds vectors of 16.",
    ),
    "vocab_size=300": (
        {"llama.vocab_size": u32(300)},
        "llama.vocab_size: a vocabulary of 300, but tensor 'token_embd.weight' has 260 rows.",
    ),
    "value_length": (
        {"llama.attention.key_length": u32(4), "llama.attention.value_length": u32(8)},
        "llama.attention.value_length: 8 differs from the query/key head size 4; medjax needs one.",
    ),
    "partial RoPE": (
        {"llama.rope.dimension_count": u32(2)},
        "llama.rope.dimension_count: 2, but the head size is 4; partial RoPE is not supported.",
    ),
    # Epsilons and the RoPE base: finite and > 0.
    "rms eps nan": (
        {"llama.attention.layer_norm_rms_epsilon": f32(math.nan)},
        "llama.attention.layer_norm_rms_epsilon: must be a finite number > 0, got nan.",
    ),
    "rms eps inf": (
        {"llama.attention.layer_norm_rms_epsilon": f32(math.inf)},
        "llama.attention.layer_norm_rms_epsilon: must be a finite number > 0, got inf.",
    ),
    "rms eps 0": (
        {"llama.attention.layer_norm_rms_epsilon": f32(0.0)},
        "llama.attention.layer_norm_rms_epsilon: must be a finite number > 0, got 0.0.",
    ),
    "rms eps negative": (
        {"llama.attention.layer_norm_rms_epsilon": f32(-1.0)},
        "llama.attention.layer_norm_rms_epsilon: must be a finite number > 0, got -1.0.",
    ),
    "rms eps missing": (
        {"llama.attention.layer_norm_rms_epsilon": None},
        "llama.attention.layer_norm_rms_epsilon: missing; the field is required.",
    ),
    "rope base nan": (
        {"llama.rope.freq_base": f32(math.nan)},
        "llama.rope.freq_base: must be a finite number > 0, got nan.",
    ),
    "rope base 0": (
        {"llama.rope.freq_base": f32(0.0)},
        "llama.rope.freq_base: must be a finite number > 0, got 0.0.",
    ),
    # Token ids: inside the model's vocabulary.
    "eos = vocab": (
        {"tokenizer.ggml.eos_token_id": u32(260)},
        "tokenizer.ggml.eos_token_id: must be a token id in [0, 260) (the model's vocabulary),"
        " got 260.",
    ),
    "bos far out": (
        {"tokenizer.ggml.bos_token_id": u32(10**6)},
        "tokenizer.ggml.bos_token_id: must be a token id in [0, 260) (the model's vocabulary),"
        " got 1000000.",
    ),
    "pad negative": (
        {"tokenizer.ggml.padding_token_id": ("int32", -1)},
        "tokenizer.ggml.padding_token_id: must be a token id in [0, 260) (the model's"
        " vocabulary), got -1.",
    ),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_metadata_is_refused_naming_the_field(case, tmp_path):
    changes, message = MODEL_CASES[case]
    path = write(tmp_path / "bad.gguf", **changes)
    with pytest.raises(ValueError) as e:
        models.from_pretrained(path)
    assert str(e.value) == f"{path}: {message}"


def test_a_flat_embedding_is_refused_naming_the_tensor(tmp_path):
    path = write(tmp_path / "flat.gguf", shapes={"token_embd.weight": (V * D,)})
    with pytest.raises(ValueError) as e:
        models.from_pretrained(path)
    assert str(e.value) == f"{path}: tensor 'token_embd.weight' has shape (4160,)."


TOKENIZER_CASES = {
    "bos out of the token list": (
        {"tokenizer.ggml.bos_token_id": u32(260)},
        "tokenizer.ggml.bos_token_id: must be a token id in [0, 260) (tokenizer.ggml.tokens),"
        " got 260.",
    ),
    "unk out of the token list": (
        {"tokenizer.ggml.unknown_token_id": u32(999)},
        "tokenizer.ggml.unknown_token_id: must be a token id in [0, 260)"
        " (tokenizer.ggml.tokens), got 999.",
    ),
    "merge without a space": (
        {"tokenizer.ggml.merges": ("array", ["a b", "abc"])},
        "tokenizer.ggml.merges: entry 1 is 'abc', not \"left right\".",
    ),
    "merge of three": (
        {"tokenizer.ggml.merges": ("array", ["a b c"])},
        "tokenizer.ggml.merges: entry 0 is 'a b c', not \"left right\".",
    ),
    "merge with a side empty": (
        {"tokenizer.ggml.merges": ("array", [" ab"])},
        "tokenizer.ggml.merges: entry 0 is ' ab', not \"left right\".",
    ),
    "merges of numbers": (
        {"tokenizer.ggml.merges": ("array", [1, 2])},
        'tokenizer.ggml.merges: entry 0 is 1, not "left right".',
    ),
    "merge of an unknown token": (
        {"tokenizer.ggml.merges": ("array", ["a b", "ab ☃"])},
        "tokenizer.ggml.merges: entry 1 'ab ☃': '☃' is not in tokenizer.ggml.tokens.",
    ),
    "merge making an unknown token": (
        {"tokenizer.ggml.merges": ("array", ["b c"])},
        "tokenizer.ggml.merges: entry 0 'b c': 'bc' is not in tokenizer.ggml.tokens.",
    ),
    "merges missing": (
        {"tokenizer.ggml.merges": None},
        "tokenizer.ggml.merges: missing; the field is required.",
    ),
    "token types short": (
        {"tokenizer.ggml.token_type": ("array", [1] * 259)},
        "tokenizer.ggml.token_type: must list one value per token (260,"
        " tokenizer.ggml.tokens), got 259 entries.",
    ),
    "token type 9": (
        {"tokenizer.ggml.token_type": ("array", [9] + [1] * 259)},
        "tokenizer.ggml.token_type: entry 0 is 9, not a token type 0-6.",
    ),
    "scores long": (
        {"tokenizer.ggml.scores": ("array", [0.0] * 261)},
        "tokenizer.ggml.scores: must list one value per token (260, tokenizer.ggml.tokens),"
        " got 261 entries.",
    ),
    "tokens of numbers": (
        {"tokenizer.ggml.tokens": ("array", list(range(260)))},
        "tokenizer.ggml.tokens: entry 0 is 0, not a string.",
    ),
    "add_bos_token as a number": (
        {"tokenizer.ggml.add_bos_token": u32(1)},
        "tokenizer.ggml.add_bos_token: must be a bool, got 1.",
    ),
    "chat template as a number": (
        {"tokenizer.chat_template": u32(1)},
        "tokenizer.chat_template: must be a string, got 1.",
    ),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_tokenizer_metadata_is_refused_naming_the_field(case, tmp_path):
    changes, message = TOKENIZER_CASES[case]
    path = write(tmp_path / "bad.gguf", **changes)
    with pytest.raises(ValueError) as e:
        tokenizer_lib.load_tokenizer(path)
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_heads", 0, "ModelConfig.num_heads must be an integer >= 1, got 0."),
        ("num_kv_heads", 0, "ModelConfig.num_kv_heads must be an integer >= 1, got 0."),
        ("hidden_size", 2.0, "ModelConfig.hidden_size must be an integer >= 1, got 2.0."),
        ("head_dim", 0, "ModelConfig.head_dim must be an integer >= 1, got 0."),
        (
            "rms_norm_eps",
            math.nan,
            "ModelConfig.rms_norm_eps must be a finite number > 0, got nan.",
        ),
        ("rope_theta", 0.0, "ModelConfig.rope_theta must be a finite number > 0, got 0.0."),
    ],
)
def test_model_config_refuses_sizes_and_constants_gguf_would_refuse(field, value, message):
    with pytest.raises(ValueError) as e:
        ModelConfig(**{field: value})
    assert str(e.value) == message
