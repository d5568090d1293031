"""GGUF files (llama.cpp's single-file checkpoints) as DecoderLMs and tokenizers.

model = medjax.models.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")  # Or from_gguf.
tok = medjax.models.tokenizer.load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

Quantised tensors are dequantised to float32 by the `gguf` library (llama.cpp's own Python
package) and then cast to the requested dtype: training starts from exactly the weights the
file describes. The architecture comes from the `<arch>.*` metadata, the tokenizer's
vocabulary, merges, special tokens and chat template from `tokenizer.*`.

What llama.cpp's converter changes and this module undoes: tensor names (`blk.N.attn_q`, ...
instead of `model.layers.N.self_attn.q_proj`), the order of dimensions (ggml lists the
fastest-varying first), and, for the llama architecture only, the rows of the query and key
projections, which it interleaves per head for its own RoPE kernel.
"""

import functools
import os
import pathlib
import re
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
import tokenizers
import transformers
from jax.sharding import Mesh
from tokenizers import decoders, models, pre_tokenizers, processors

from medjax import partitioning
from medjax.models.checkpoint import CheckpointError, build_model
from medjax.models.config import ModelConfig
from medjax.models.transformer import DecoderLM

ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor name (with the layer index as N) -> Hugging Face name.
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.N.attn_norm.weight": "model.layers.N.input_layernorm.weight",
    "blk.N.ffn_norm.weight": "model.layers.N.post_attention_layernorm.weight",
    "blk.N.attn_q.weight": "model.layers.N.self_attn.q_proj.weight",
    "blk.N.attn_q.bias": "model.layers.N.self_attn.q_proj.bias",
    "blk.N.attn_k.weight": "model.layers.N.self_attn.k_proj.weight",
    "blk.N.attn_k.bias": "model.layers.N.self_attn.k_proj.bias",
    "blk.N.attn_v.weight": "model.layers.N.self_attn.v_proj.weight",
    "blk.N.attn_v.bias": "model.layers.N.self_attn.v_proj.bias",
    "blk.N.attn_output.weight": "model.layers.N.self_attn.o_proj.weight",
    "blk.N.attn_q_norm.weight": "model.layers.N.self_attn.q_norm.weight",
    "blk.N.attn_k_norm.weight": "model.layers.N.self_attn.k_norm.weight",
    "blk.N.ffn_gate.weight": "model.layers.N.mlp.gate_proj.weight",
    "blk.N.ffn_up.weight": "model.layers.N.mlp.up_proj.weight",
    "blk.N.ffn_down.weight": "model.layers.N.mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> the pre-tokenizer in front of the byte-level BPE. "smollm" splits every
# digit apart before GPT-2's rule, as SmolLM's own tokenizer.json does.
_PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
}


def open_gguf(path: str | os.PathLike) -> "GGUFFile":
    """The parsed file, shared by the model and tokenizer loaders of one process (parsing
    SmolLM2's vocabulary and merges takes seconds) until the file changes."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file.")
    stat = path.stat()
    return _open(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open(path: pathlib.Path, mtime_ns: int, size: int) -> "GGUFFile":
    del mtime_ns, size  # Only part of the cache key.
    return GGUFFile(path)


class GGUFFile:
    """The metadata and tensors of one GGUF file (memory-mapped, read lazily)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e}).") from None
        self.tensors = {t.name: t for t in self._reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata field `key` (str, number, bool or list), or `default`."""
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata field {key!r} is missing.")
        return value

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in numpy order (the reverse of ggml's), dequantised."""
        t = self.tensors[name]
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has quantisation type {t.tensor_type.name},"
                " which the gguf library cannot dequantise."
            ) from None
        return np.asarray(values, np.float32).reshape(tuple(int(n) for n in t.shape[::-1]))


def gguf_config(file: GGUFFile, **overrides) -> ModelConfig:
    """ModelConfig from a GGUF file's `general.architecture` and `<arch>.*` fields.

    Raises:
      CheckpointError: an architecture other than llama, qwen2 or qwen3, or a setting medjax
        does not implement (mixture of experts, partial or scaled RoPE); names the field.
    """
    arch = file.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{file.path}: general.architecture {arch!r} is not one of {ARCHITECTURES}."
        )
    if file.get(f"{arch}.expert_count"):
        raise CheckpointError(f"{file.path}: {arch}.expert_count is set; MoE is not supported.")
    scaling = file.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in file.tensors:
        what = "tensor 'rope_freqs.weight'" if scaling == "none" else f"{scaling!r}"
        raise CheckpointError(
            f"{file.path}: RoPE scaling ({arch}.rope.scaling.type or {what}) is not supported."
        )
    hidden = int(file.require(f"{arch}.embedding_length"))
    heads = int(file.require(f"{arch}.attention.head_count"))
    head_dim = int(file.get(f"{arch}.attention.key_length", hidden // heads))
    rotary = int(file.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(
            f"{file.path}: {arch}.rope.dimension_count is {rotary}, not the head size"
            f" {head_dim}; partial RoPE is not supported."
        )
    tokens = file.get("tokenizer.ggml.tokens")
    embed = file.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{file.path}: tensor 'token_embd.weight' is missing.")
    eos = file.get("tokenizer.ggml.eos_token_id")
    fields = dict(
        family=arch,
        vocab_size=int(file.get(f"{arch}.vocab_size", len(tokens) if tokens else embed.shape[1])),
        hidden_size=hidden,
        intermediate_size=int(file.require(f"{arch}.feed_forward_length")),
        num_layers=int(file.require(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(file.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(file.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(file.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        qkv_bias="blk.0.attn_q.bias" in file.tensors,
        qk_norm=arch == "qwen3",
        tie_word_embeddings="output.weight" not in file.tensors,
        max_position_embeddings=int(file.get(f"{arch}.context_length", 32768)),
        bos_token_id=file.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=None if eos is None else int(eos),
        pad_token_id=file.get("tokenizer.ggml.padding_token_id"),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _hf_names(file: GGUFFile) -> dict[str, str]:
    """Hugging Face name -> GGUF name for every tensor of the file."""
    names = {}
    for name in file.tensors:
        match = _LAYER.match(name)
        pattern = _LAYER.sub("blk.N.", name) if match else name
        if pattern not in _TENSOR_NAMES:
            raise CheckpointError(
                f"{file.path}: tensor {name!r} has no counterpart in a medjax model."
            )
        hf = _TENSOR_NAMES[pattern]
        names[hf.replace(".N.", f".{match.group(1)}.") if match else hf] = name
    return names


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head interleaving of q/k rows (its converter's `permute`)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_gguf(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: partitioning.Rules = partitioning.DEFAULT_RULES,
    **options,
) -> DecoderLM:
    """Loads a Llama / Qwen2 / Qwen3 GGUF file as a DecoderLM.

    Args:
      path: a `.gguf` file (any quantisation the gguf library dequantises: F32, F16, BF16,
        Q4_0 ... Q8_0, the K-quants, ...).
      dtype: activations' dtype; also the parameters' unless `param_dtype` is given.
      param_dtype: parameters' dtype (the dequantised float32 values are cast to it).
      mesh, rules, options: as for `checkpoint.from_pretrained`.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: an unreadable file, an unsupported architecture, setting or
        quantisation type, a missing or unexpected tensor or a shape that does not match the
        metadata; the message names the file and the field or tensor.
    """
    file = open_gguf(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    config = gguf_config(file, dtype=dtype, param_dtype=param_dtype, **options)
    by_hf = _hf_names(file)

    def tensor(name: str, hf_shape: tuple[int, ...]) -> np.ndarray:
        if name not in by_hf:
            raise CheckpointError(
                f"{file.path}: missing tensor for {name!r} (expected shape {hf_shape})."
            )
        source = by_hf[name]
        shape = tuple(int(n) for n in file.tensors[source].shape[::-1])
        if shape != hf_shape:
            raise CheckpointError(
                f"{file.path}: tensor {source!r} has shape {shape}; expected {hf_shape}."
            )
        array = file.array(source)
        if config.family == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            array = _unpermute(array, heads)
        return array

    model, expected = build_model(config, tensor, mesh=mesh, rules=rules)
    unexpected = sorted(by_hf[n] for n in by_hf.keys() - expected)
    if unexpected:
        raise CheckpointError(
            f"{file.path}: unexpected tensors for a {config.family} model: {unexpected[:5]}."
        )
    return model


def gguf_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer described by a GGUF file's `tokenizer.*` metadata.

    Control tokens (token type 3) become special added tokens, user-defined ones (type 4)
    added tokens that `skip_special_tokens` keeps; bos, eos, pad and unk come from their id
    fields and the chat template from `tokenizer.chat_template`.

    Raises:
      CheckpointError: a tokenizer model other than "gpt2" (byte-level BPE) or a
        pre-tokenizer (`tokenizer.ggml.pre`) not in `_PRE_TOKENIZERS`; names the field.
    """
    file = open_gguf(path)
    kind = file.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{file.path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', the"
            " byte-level BPE of Llama 3, Qwen and SmolLM)."
        )
    pre = file.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"{file.path}: tokenizer.ggml.pre {pre!r} is not supported"
            f" ({', '.join(sorted(_PRE_TOKENIZERS))})."
        )
    tokens = list(file.require("tokenizer.ggml.tokens"))
    types = list(file.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in file.require("tokenizer.ggml.merges")]
    backend = tokenizers.Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    added = [
        tokenizers.AddedToken(t, normalized=False, special=kind_ == _CONTROL)
        for t, kind_ in zip(tokens, types, strict=True)
        if kind_ in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_tokens(added)

    def token(field: str) -> str | None:
        i = file.get(f"tokenizer.ggml.{field}")
        return None if i is None else tokens[int(i)]

    bos = token("bos_token_id")
    if file.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = int(file.get("tokenizer.ggml.bos_token_id"))
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        clean_up_tokenization_spaces=False,
    )
    template = file.get("tokenizer.chat_template")
    if template is not None:
        tok.chat_template = template
    return tok
