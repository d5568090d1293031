"""One configuration for the Llama 3, Qwen2/2.5 and Qwen3 decoder families.

The three differ only in switches: QKV bias (Qwen2), RMSNorm on queries and keys (Qwen3),
Llama-3 RoPE frequency scaling, and whether the LM head is tied to the embedding.
"""

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp

FAMILIES = ("llama", "qwen2", "qwen3")
# What each decoder layer keeps for the backward pass (`transformer.REMAT_POLICIES`).
REMAT_POLICY_NAMES = ("none", "full", "save_dots", "offload_dots")
# Plain causal attention's implementation (`medjax.kernels.attention.IMPLS`).
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")
# The linear layers LoRA adapts, by their Hugging Face (and PEFT target_modules) names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# ModelConfig's sizes and counts, each an integer >= 1 (head_dim may also be None: derived).
# vocab_size is left out: a config may hold 0 until a tokenizer gives the size
# (`replace(vocab_size=len(tok))`); checkpoint loaders check it against the file.
_COUNT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_position_embeddings",
)
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (rope_type "llama3" in Hugging Face configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) on a model's linear layers: y = x W + b +
    (alpha / rank) (x A) B with A [in, rank] and B [rank, out], A drawn like PEFT's
    (uniform in +-1/sqrt(in)) and B zero, so that a new adapter changes nothing.

    Attributes:
      rank: r, the adapters' inner width.
      alpha: the scale's numerator (PEFT's lora_alpha): the update is scaled by alpha / r.
      dropout: the probability of dropping each input of the adapters while training
        (PEFT's lora_dropout; `transformer.lora_dropout`); never while sampling or scoring.
      target_modules: which linear layers get adapters (`LORA_TARGETS`).
      seed: seeds the A matrices.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    seed: int = 0

    def __post_init__(self):
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        object.__setattr__(self, "target_modules", tuple(targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be an integer >= 1, got {self.rank!r}.")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not (math.isfinite(self.alpha) and self.alpha > 0)
        ):
            raise ValueError(f"LoraConfig.alpha must be a number > 0, got {self.alpha!r}.")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not (0 <= self.dropout < 1)
        ):
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        bad = [t for t in self.target_modules if t not in LORA_TARGETS]
        if bad or not self.target_modules:
            raise ValueError(
                f"LoraConfig.target_modules {self.target_modules!r}: each must be one of"
                f" {LORA_TARGETS}, and at least one."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM.

    Attributes:
      family: "llama", "qwen2" or "qwen3" (names the Hugging Face architecture on export).
      vocab_size, hidden_size, intermediate_size, num_layers: V, D, F and the depth.
      num_heads, num_kv_heads, head_dim: H query heads, KV heads (GQA when fewer), K.
      rope_theta: RoPE base.
      rope_scaling: Llama-3 frequency scaling, or None.
      rms_norm_eps: RMSNorm epsilon.
      qkv_bias: biases on the q, k and v projections (Qwen2).
      qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
      tie_word_embeddings: the LM head is the transposed embedding.
      max_position_embeddings: longest context the checkpoint was made for.
      dtype: activations' dtype; param_dtype: parameters' dtype. Logits are always float32.
      bos_token_id, eos_token_id, pad_token_id: carried through to the exported config.
      scan_layers: hold the layers' parameters stacked on a leading [L] axis and run them
        under `lax.scan` (one layer compiled instead of L); Hugging Face names are unchanged
        on import and export.
      remat: what each layer keeps for the backward pass: "none" (everything), "full"
        (its input only), "save_dots" (matmul outputs without batch dims: the projections
        and MLP, not attention's scores), "offload_dots" (those, in host memory).
      attention: plain causal attention's implementation (not the packed groups' or the
        KV cache's): "auto" (splash on TPU, cuDNN on GPU in bf16/f16, XLA otherwise),
        "xla", "splash" or "cudnn" (`medjax.kernels.attention`).
      lora: low-rank adapters on the linear layers (`LoraConfig`), or None.

    `scan_layers`, `remat`, `attention` and `lora` say how the model runs, not what it is:
    config.json neither holds nor sets them (an adapter is exported merged, or as a PEFT
    folder).
    """

    family: str = "qwen2"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "auto"
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}.")
        if self.remat not in REMAT_POLICY_NAMES:
            raise ValueError(
                f"ModelConfig.remat must be one of {REMAT_POLICY_NAMES}, got {self.remat!r}."
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}."
            )
        # Before the divisions below: a zero size would otherwise surface as ZeroDivisionError,
        # and a NaN epsilon or RoPE base would load and train to a NaN loss.
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if value is None and name == "head_dim":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be an integer >= 1, got {value!r}.")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (real and math.isfinite(value) and value > 0):
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {value!r}.")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig: hidden_size={self.hidden_size} is not a multiple of"
                    f" num_heads={self.num_heads}; set head_dim."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads={self.num_heads} is not a multiple of"
                f" num_kv_heads={self.num_kv_heads}."
            )
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Number of parameters, counting a tied embedding once."""
        d, f, k = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * k, self.num_kv_heads * k
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv) * self.qkv_bias + 2 * k * self.qk_norm
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head


_MISSING = object()


def _field(hf: dict[str, Any], key: str, kind: str, default: Any = _MISSING, *, where: str = ""):
    """hf[key] checked to be of `kind` ("count": int >= 1, "id": int >= 0, "positive": finite
    number > 0, "bool"); a missing or null key gives `default`, or raises if there is none.

    Null counts as missing because transformers writes null for "use the default".
    """
    name = where + key
    value = hf.get(key)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"config.json: {name!r} is missing.")
        return default
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif kind == "positive":
        number = is_int or isinstance(value, float)
        ok, want = number and math.isfinite(value) and value > 0, "a positive number"
    else:
        minimum = 1 if kind == "count" else 0
        ok, want = is_int and value >= minimum, f"an integer >= {minimum}"
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ValueError(
            f"config.json: {name!r} must be {want}, got {shown} ({type(value).__name__})."
        )
    return float(value) if kind == "positive" else value


def _section(hf: dict[str, Any], key: str) -> dict[str, Any]:
    value = hf.get(key)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"config.json: {key!r} must be an object, got {type(value).__name__}.")
    return value or {}


def from_hf_config(hf: dict[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (transformers 4 or 5 layout).

    Raises:
      ValueError: for a model_type other than llama, qwen2 or qwen3, for a config that
        enables what medjax does not implement (sliding-window attention, other RoPE types),
        or for a missing, null or wrongly typed field; the message names the field.
    """
    if not isinstance(hf, dict):
        raise ValueError(f"config.json: must be a JSON object, got {type(hf).__name__}.")
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json: model_type {family!r} is not one of {FAMILIES}.")
    if _field(hf, "use_sliding_window", "bool", False):
        raise ValueError("config.json: use_sliding_window=true is not supported.")
    # transformers 5 nests RoPE settings in rope_parameters; 4 had rope_theta + rope_scaling.
    rope = _section(hf, "rope_parameters")
    where = "rope_scaling." if hf.get("rope_scaling") else "rope_parameters."
    scaling = _section(hf, "rope_scaling") or rope
    if "rope_theta" in rope:
        theta = _field(rope, "rope_theta", "positive", where="rope_parameters.")
    else:
        theta = _field(hf, "rope_theta", "positive", 10000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        rope_scaling = RopeScaling(
            factor=_field(scaling, "factor", "positive", where=where),
            low_freq_factor=_field(scaling, "low_freq_factor", "positive", where=where),
            high_freq_factor=_field(scaling, "high_freq_factor", "positive", where=where),
            original_max_position_embeddings=_field(
                scaling, "original_max_position_embeddings", "count", where=where
            ),
        )
    elif rope_type == "default":
        rope_scaling = None
    else:
        raise ValueError(
            f"config.json: rope_type {rope_type!r} is not supported (default, llama3)."
        )
    qkv_bias = family == "qwen2" or _field(hf, "attention_bias", "bool", False)
    if _field(hf, "mlp_bias", "bool", False):
        raise ValueError("config.json: mlp_bias=true is not supported.")
    num_heads = _field(hf, "num_attention_heads", "count")
    num_kv_heads = _field(hf, "num_key_value_heads", "count", num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"config.json: 'num_attention_heads' ({num_heads}) is not a multiple of"
            f" 'num_key_value_heads' ({num_kv_heads})."
        )
    hidden_size = _field(hf, "hidden_size", "count")
    head_dim = _field(hf, "head_dim", "count", None)
    if head_dim is None and hidden_size % num_heads:
        raise ValueError(
            f"config.json: 'hidden_size' ({hidden_size}) is not a multiple of"
            f" 'num_attention_heads' ({num_heads}) and 'head_dim' is not given."
        )
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):  # Some checkpoints end generation on any of several tokens.
        for token in eos:
            _field({"eos_token_id": token}, "eos_token_id", "id")
    else:
        _field(hf, "eos_token_id", "id", None)
    fields = dict(
        family=family,
        vocab_size=_field(hf, "vocab_size", "count"),
        hidden_size=hidden_size,
        intermediate_size=_field(hf, "intermediate_size", "count"),
        num_layers=_field(hf, "num_hidden_layers", "count"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=_field(hf, "rms_norm_eps", "positive", 1e-6),
        qkv_bias=qkv_bias,
        qk_norm=family == "qwen3",
        tie_word_embeddings=_field(hf, "tie_word_embeddings", "bool", family != "llama"),
        max_position_embeddings=_field(hf, "max_position_embeddings", "count", 32768),
        bos_token_id=_field(hf, "bos_token_id", "id", None),
        eos_token_id=eos,
        pad_token_id=_field(hf, "pad_token_id", "id", None),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers loads as the matching *ForCausalLM."""
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling is not None:
        rope = {"rope_theta": config.rope_theta, "rope_type": "llama3"}
        rope.update(dataclasses.asdict(config.rope_scaling))
    hf = {
        "architectures": [_HF_ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        # transformers 4 readers look for these two at the top level.
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else dict(rope),
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_bias": config.qkv_bias if config.family != "qwen2" else True,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "dtype": jnp.dtype(config.param_dtype).name,
    }
    if config.family == "qwen2":
        hf.pop("attention_bias")
    return hf


def rope_inverse_frequencies(config: ModelConfig) -> jnp.ndarray:
    """[K/2] float32 inverse frequencies theta^(-2i/K), Llama-3 scaled when configured."""
    k = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    s = config.rope_scaling
    if s is None:
        return inv
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
