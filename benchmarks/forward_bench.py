"""Forward tokens/s of a ~50M-parameter Qwen2-shaped model: medjax (jax.jit) vs transformers
(PyTorch eager) on the same weights and inputs, in one run.

    python benchmarks/forward_bench.py            # writes benchmarks/results/forward.json
    python benchmarks/forward_bench.py --model smollm2   # -> results/forward_smollm2.json

The two run alternately, rep by rep, so that load on a shared machine hits both alike; the
ratio of medians is the number to quote. Also reports each as a fraction of the f32 matmul
rate measured in the same run (a forward cannot beat it).
"""

import argparse
import json
import os
import pathlib
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from common import MODELS, machine, smollm2_models, timed, versions
from flax import nnx

from medjax import models

RESULTS = pathlib.Path(__file__).parent / "results" / "forward.json"
HF_CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=True,
    rope_theta=1e6,
)


def forward_flops(config: models.ModelConfig, batch: int, length: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): projections, attention, LM head."""
    d, k = config.hidden_size, config.head_dim
    q, kv = config.num_heads * k, config.num_kv_heads * k
    per_token = config.num_layers * (2 * d * q + 4 * d * kv + 6 * d * config.intermediate_size)
    per_token += 2 * d * config.vocab_size
    attention = config.num_layers * 4 * batch * length * length * q
    return per_token * batch * length + attention


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    """Measured f32 GFLOP/s of an n^3 jitted matmul on this machine."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--model", choices=MODELS, default="random")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    if args.model == "smollm2":
        hf_model, model, description = smollm2_models()
    else:
        torch.manual_seed(0)
        hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_CONFIG)).eval()
        with tempfile.TemporaryDirectory() as folder:
            hf_model.save_pretrained(folder)
            model = models.from_pretrained(folder, dtype=jnp.float32)
        description = {"params": model.config.num_params, **HF_CONFIG}
    out = args.out or RESULTS.with_name(
        "forward.json" if args.model == "random" else f"forward_{args.model}.json"
    )
    config = model.config
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length))
    ids_jax, ids_torch = jnp.asarray(ids), torch.tensor(ids)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))

    def run_medjax():
        return forward(state, ids_jax).block_until_ready()

    def run_torch():
        with torch.no_grad():
            return hf_model(ids_torch).logits

    max_diff = float(np.abs(np.asarray(run_medjax()) - run_torch().numpy()).max())
    run_medjax(), run_torch()  # Warm-up (compilation, allocator).
    medjax_s, torch_s = [], []
    for _ in range(args.reps):
        medjax_s.append(timed(run_medjax))
        torch_s.append(timed(run_torch))

    tokens = args.batch * args.length
    flops = forward_flops(config, args.batch, args.length)
    peak = matmul_rate()
    med_m, med_t = statistics.median(medjax_s), statistics.median(torch_s)
    result = {
        "benchmark": "forward, float32, no cache",
        "model": description,
        "batch": args.batch,
        "length": args.length,
        "reps": args.reps,
        "machine": machine(),
        "versions": versions("jax", "jaxlib", "flax", "torch", "transformers", "numpy"),
        "max_abs_logit_diff": max_diff,
        "forward_gflop": flops / 1e9,
        "matmul_peak_gflops": peak,
        "medjax": {
            "seconds": medjax_s,
            "tokens_per_s": tokens / med_m,
            "gflops": flops / med_m / 1e9,
            "fraction_of_matmul_peak": flops / med_m / 1e9 / peak,
        },
        "transformers": {
            "seconds": torch_s,
            "tokens_per_s": tokens / med_t,
            "gflops": flops / med_t / 1e9,
            "fraction_of_matmul_peak": flops / med_t / 1e9 / peak,
        },
        "speedup_vs_transformers": med_t / med_m,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup_vs_transformers", "max_abs_logit_diff")}))
    for name in ("medjax", "transformers"):
        r = result[name]
        print(
            f"{name:13s} {r['tokens_per_s']:9.0f} tokens/s  {r['gflops']:6.1f} GFLOP/s"
            f"  ({100 * r['fraction_of_matmul_peak']:.0f}% of the {peak:.0f} GFLOP/s matmul rate)"
        )


if __name__ == "__main__":
    main()
