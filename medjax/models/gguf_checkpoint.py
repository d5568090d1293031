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

Every metadata field read is checked before a tensor is: sizes are integers >= 1 that divide
as attention needs and agree with the tensors, epsilons and the RoPE base are finite and > 0,
token ids index the vocabulary, merges are pairs of tokens. A bad one is refused with one line
`<file>: <field>: <what is wrong>` (a CheckpointError, which is a ValueError).
"""

import functools
import math
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
_UNDEFINED, _NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 0, 1, 2, 3, 4, 5, 6

# The split regexes of Llama 3 (tiktoken's cl100k rule with \p{N}{1,3}) and Qwen2 (the same
# with single digits), as llama.cpp's llama-vocab and the models' own tokenizer.json apply them.
# `(?i:...)` makes the contractions case-insensitive ("DON'T" splits at "'T").
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Splits with `pattern`, then maps each piece's UTF-8 bytes to the byte-level alphabet."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> the pre-tokenizer in front of the byte-level BPE. "smollm" splits every
# digit apart before GPT-2's rule, as SmolLM's own tokenizer.json does. The llama.cpp names of
# one rule are aliases (its converter wrote "llama-bpe" for Llama 3 files, later ones
# "llama3"; DeepSeek-R1's Qwen distills say "deepseek-r1-qwen").
_PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama-v3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _split_then_bytes(_QWEN2_SPLIT),
}
# Pre-tokenizers whose pieces are looked up whole before any merge (tiktoken's rule: Llama 3's
# tokenizer.json says "ignore_merges": true, llama.cpp sets it for these names). A piece in the
# vocabulary that the merges would not rebuild then stays one token.
_IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3"})

_REQUIRED = object()


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
        if field is None:
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise self.error(key, f"unreadable value ({type(e).__name__})") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise self.error(key, "missing; the field is required")
        return value

    def error(self, key: str, problem: str) -> CheckpointError:
        """The one-line error `<file>: <field>: <problem>` for metadata field `key`."""
        return CheckpointError(f"{self.path}: {key}: {problem}.")

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


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(file: GGUFFile, key: str, default: Any = _REQUIRED) -> int:
    """Metadata field `key` as an integer >= 1 (a size or a count), or `default` when the file
    has no such field.

    Raises:
      CheckpointError: the field is missing without a default, not an integer (a float, a bool,
        a per-layer array) or below 1; names the file and the field.
    """
    value = file.get(key)
    if value is None:
        if default is _REQUIRED:
            raise file.error(key, "missing; the field is required")
        return default
    if not _is_int(value) or value < 1:
        raise file.error(key, f"must be an integer >= 1, got {_shown(value)}")
    return value


def _positive(file: GGUFFile, key: str, default: Any = _REQUIRED) -> float:
    """Metadata field `key` as a finite number > 0 (an epsilon, a RoPE base), or `default`.

    Raises:
      CheckpointError: missing without a default, not a number, NaN, infinite or <= 0 (a NaN
        epsilon would load and train to a NaN loss); names the file and the field.
    """
    value = file.get(key)
    if value is None:
        if default is _REQUIRED:
            raise file.error(key, "missing; the field is required")
        return default
    number = _is_int(value) or isinstance(value, float)
    if not (number and math.isfinite(value) and value > 0):
        raise file.error(key, f"must be a finite number > 0, got {_shown(value)}")
    return float(value)


def _token_id(file: GGUFFile, key: str, size: int, what: str) -> int | None:
    """Token id field `key` (bos, eos, ...), checked to index a vocabulary of `size` (`what`
    says whose), or None when the file has no such field."""
    value = file.get(key)
    if value is not None and not (_is_int(value) and 0 <= value < size):
        raise file.error(key, f"must be a token id in [0, {size}) ({what}), got {_shown(value)}")
    return value


def _check_tensor_sizes(file: GGUFFile, arch: str, sizes: dict[str, int]):
    """The sizes the metadata states against the tensors that show them, so that a wrong size
    is named as the field it is rather than as a RoPE or tensor-shape mismatch further on.

    Args:
      file: the GGUF file.
      arch: its `general.architecture`.
      sizes: hidden, vocab, heads, kv_heads, head_dim as read (or derived) from the metadata.
    """
    p = f"{arch}."
    # ggml lists the fastest-varying dimension first: token_embd is [D, V], attn_q [D, H*K].
    embed_d, embed_v = (int(n) for n in file.tensors["token_embd.weight"].shape)
    if embed_d != sizes["hidden"]:
        raise file.error(
            p + "embedding_length",
            f"{sizes['hidden']}, but tensor 'token_embd.weight' holds vectors of {embed_d}",
        )
    if embed_v != sizes["vocab"]:
        key = (
            p + "vocab_size" if file.get(p + "vocab_size") is not None else "tokenizer.ggml.tokens"
        )
        raise file.error(
            key,
            f"a vocabulary of {sizes['vocab']}, but tensor 'token_embd.weight' has {embed_v} rows",
        )
    k = sizes["head_dim"]
    if file.get(f"{p}attention.key_length") is not None:
        source = f"{p}attention.key_length"
    else:
        source = f"{p}embedding_length / {p}attention.head_count"
    for tensor, field, heads in [
        ("blk.0.attn_q.weight", "attention.head_count", sizes["heads"]),
        ("blk.0.attn_k.weight", "attention.head_count_kv", sizes["kv_heads"]),
    ]:
        if tensor not in file.tensors:
            continue  # from_gguf names the missing tensor.
        rows = int(file.tensors[tensor].shape[-1])
        if rows != heads * k:
            raise file.error(
                p + field,
                f"{heads} heads of size {k} ({source}) make {heads * k} rows, but tensor"
                f" {tensor!r} has {rows}",
            )


def gguf_config(file: GGUFFile, **overrides) -> ModelConfig:
    """ModelConfig from a GGUF file's `general.architecture` and `<arch>.*` fields.

    Every field read is checked: sizes and counts are integers >= 1, the head counts divide
    as grouped-query attention needs, the sizes agree with the embedding and first attention
    tensors, epsilons and the RoPE base are finite and > 0, and bos/eos/pad ids index the
    vocabulary.

    Raises:
      CheckpointError (a ValueError): one line `<file>: <field>: <what is wrong>` for an
        architecture other than llama, qwen2 or qwen3, a setting medjax does not implement
        (mixture of experts, partial or scaled RoPE) or a field that fails its check.
    """
    arch = file.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise file.error("general.architecture", f"{_shown(arch)} is not one of {ARCHITECTURES}")
    p = f"{arch}."
    if file.get(p + "expert_count"):
        raise file.error(p + "expert_count", "is set; mixture of experts is not supported")
    scaling = file.get(p + "rope.scaling.type", "none")
    if scaling != "none":
        raise file.error(
            p + "rope.scaling.type", f"{_shown(scaling)}; RoPE scaling is not supported"
        )
    if "rope_freqs.weight" in file.tensors:
        raise CheckpointError(
            f"{file.path}: tensor 'rope_freqs.weight': RoPE frequency factors (Llama 3.1"
            " scaling) are not supported."
        )
    embed = file.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{file.path}: tensor 'token_embd.weight' is missing.")
    if len(embed.shape) != 2:
        shape = tuple(int(n) for n in embed.shape[::-1])
        raise CheckpointError(f"{file.path}: tensor 'token_embd.weight' has shape {shape}.")
    hidden = _count(file, p + "embedding_length")
    heads = _count(file, p + "attention.head_count")
    kv_heads = _count(file, p + "attention.head_count_kv", heads)
    if heads % kv_heads:
        raise file.error(
            p + "attention.head_count_kv",
            f"{kv_heads} does not divide {p}attention.head_count ({heads})",
        )
    head_dim = _count(file, p + "attention.key_length", None)
    if head_dim is None:
        if hidden % heads:
            raise file.error(
                p + "attention.head_count",
                f"{heads} does not divide {p}embedding_length ({hidden}), and"
                f" {p}attention.key_length (the head size) is not given",
            )
        head_dim = hidden // heads
    value_dim = _count(file, p + "attention.value_length", head_dim)
    if value_dim != head_dim:
        raise file.error(
            p + "attention.value_length",
            f"{value_dim} differs from the query/key head size {head_dim}; medjax needs one",
        )
    tokens = file.get("tokenizer.ggml.tokens")
    default_vocab = len(tokens) if isinstance(tokens, list) and tokens else int(embed.shape[1])
    vocab = _count(file, p + "vocab_size", default_vocab)
    sizes = dict(hidden=hidden, vocab=vocab, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    _check_tensor_sizes(file, arch, sizes)
    rotary = _count(file, p + "rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise file.error(
            p + "rope.dimension_count",
            f"{rotary}, but the head size is {head_dim}; partial RoPE is not supported",
        )

    def token_id(field: str) -> int | None:
        return _token_id(file, f"tokenizer.ggml.{field}", vocab, "the model's vocabulary")

    fields = dict(
        family=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_count(file, p + "feed_forward_length"),
        num_layers=_count(file, p + "block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_positive(file, p + "rope.freq_base", 10000.0),
        rms_norm_eps=_positive(file, p + "attention.layer_norm_rms_epsilon"),
        qkv_bias="blk.0.attn_q.bias" in file.tensors,
        qk_norm=arch == "qwen3",
        tie_word_embeddings="output.weight" not in file.tensors,
        max_position_embeddings=_count(file, p + "context_length", 32768),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"),
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


def _tokens(file: GGUFFile) -> list[str]:
    """`tokenizer.ggml.tokens`, with `token_type` and `scores` (when present) checked to have
    one entry per token: a shorter list would silently shift every id after it."""
    key = "tokenizer.ggml.tokens"
    tokens = file.require(key)
    if not isinstance(tokens, list) or not tokens:
        raise file.error(key, f"must be a non-empty list of strings, got {_shown(tokens)}")
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise file.error(key, f"entry {i} is {_shown(token)}, not a string")
    for field, ok, want in [
        ("token_type", lambda v: _is_int(v) and _UNDEFINED <= v <= _BYTE, "a token type 0-6"),
        ("scores", lambda v: _is_int(v) or isinstance(v, float), "a number"),
    ]:
        values = file.get(f"tokenizer.ggml.{field}")
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != len(tokens):
            got = f"{len(values)} entries" if isinstance(values, list) else _shown(values)
            raise file.error(
                f"tokenizer.ggml.{field}",
                f"must list one value per token ({len(tokens)}, tokenizer.ggml.tokens), got {got}",
            )
        bad = next((i for i, v in enumerate(values) if not ok(v)), None)
        if bad is not None:
            raise file.error(
                f"tokenizer.ggml.{field}", f"entry {bad} is {_shown(values[bad])}, not {want}"
            )
    return tokens


def _merges(file: GGUFFile, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` as (left, right) pairs, each "left right" with both sides and
    their concatenation in the vocabulary (what the BPE model will look up)."""
    key = "tokenizer.ggml.merges"
    merges = file.require(key)
    if not isinstance(merges, list):
        raise file.error(key, f"must be a list of strings, got {_shown(merges)}")
    pairs = []
    for i, merge in enumerate(merges):
        # Byte-level tokens spell a space as "Ġ", so exactly one literal space separates them.
        if (
            not isinstance(merge, str)
            or merge.count(" ") != 1
            or merge[0] == " "
            or merge[-1] == " "
        ):
            raise file.error(key, f'entry {i} is {_shown(merge)}, not "left right"')
        left, right = merge.split(" ")
        missing = next((t for t in (left, right, left + right) if t not in vocab), None)
        if missing is not None:
            raise file.error(
                key, f"entry {i} {merge!r}: {missing!r} is not in tokenizer.ggml.tokens"
            )
        pairs.append((left, right))
    return pairs


def gguf_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer described by a GGUF file's `tokenizer.*` metadata.

    Control tokens (token type 3) become special added tokens, user-defined ones (type 4)
    added tokens that `skip_special_tokens` keeps; bos, eos, pad and unk come from their id
    fields and the chat template from `tokenizer.chat_template`. `tokenizer.ggml.pre` picks
    the split rule in front of the byte-level BPE: GPT-2's, SmolLM's, Llama 3's ("llama-bpe",
    whose pieces found whole in the vocabulary skip the merges, as llama.cpp does) or
    Qwen2's ("qwen2").

    Raises:
      CheckpointError (a ValueError): one line `<file>: <field>: <what is wrong>` for a
        tokenizer model other than "gpt2" (byte-level BPE), a pre-tokenizer not in
        `_PRE_TOKENIZERS`, token, type or score lists of different lengths, a malformed merge,
        or a bos/eos/pad/unk id outside the token list.
    """
    file = open_gguf(path)
    kind = file.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise file.error(
            "tokenizer.ggml.model",
            f"{_shown(kind)} is not supported (only 'gpt2', the byte-level BPE of Llama 3, Qwen"
            " and SmolLM)",
        )
    pre = file.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in _PRE_TOKENIZERS:
        raise file.error(
            "tokenizer.ggml.pre",
            f"{_shown(pre)} is not supported ({', '.join(sorted(_PRE_TOKENIZERS))})",
        )
    tokens = _tokens(file)
    types = file.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(file, vocab)
    ids = {
        field: _token_id(file, f"tokenizer.ggml.{field}", len(tokens), "tokenizer.ggml.tokens")
        for field in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")
    }
    add_bos = file.get("tokenizer.ggml.add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise file.error("tokenizer.ggml.add_bos_token", f"must be a bool, got {_shown(add_bos)}")
    template = file.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise file.error("tokenizer.chat_template", f"must be a string, got {_shown(template)}")

    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES)
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
        return None if ids[field] is None else tokens[ids[field]]

    bos = token("bos_token_id")
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, ids["bos_token_id"])],
        )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        clean_up_tokenization_spaces=False,
    )
    if template is not None:
        tok.chat_template = template
    return tok
