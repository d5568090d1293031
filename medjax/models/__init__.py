"""Decoder LMs of the Llama 3, Qwen2/2.5 and Qwen3 families, with Hugging Face checkpoints.

model = medjax.models.from_pretrained(path, dtype=jnp.float32)
logits = model(input_ids)                      # [B, T, V] float32
"""

from medjax.models.checkpoint import (
    CheckpointError,
    from_pretrained,
    is_checkpoint,
    is_gguf,
    load_config,
    read_safetensors,
    save_peft_adapter,
    save_pretrained,
    write_safetensors,
)
from medjax.models.config import (
    LoraConfig,
    ModelConfig,
    RopeScaling,
    from_hf_config,
    to_hf_config,
)
from medjax.models.transformer import DecoderLM, KVCache

__all__ = [
    "CheckpointError",
    "DecoderLM",
    "KVCache",
    "LoraConfig",
    "ModelConfig",
    "RopeScaling",
    "from_hf_config",
    "from_pretrained",
    "is_checkpoint",
    "is_gguf",
    "load_config",
    "read_safetensors",
    "save_peft_adapter",
    "save_pretrained",
    "to_hf_config",
    "write_safetensors",
]
