"""Grouped vs independent scoring of G completions per prompt, forward + backward.

    python benchmarks/grouped_scoring_bench.py   # writes benchmarks/results/grouped_scoring.json

Independent: G rows of prompt + completion (TRL's layout), G * (P + C) tokens. Grouped: one
row [prompt | c_1 | ... | c_G] with the shared-prefix mask, P + G * C tokens. Both take the
gradient of sum(per-token log-probs * weights) w.r.t. every parameter, through the fused
log-prob head; the two run alternately rep by rep.

The token ratio G (P + C) / (P + G C) is not the whole story: the LM head runs on the G * C
scored tokens in both layouts, and the attention differs: on CPU the grouped row uses the
XLA path of prefix_attention, query chunks against the keys up to each chunk's end, while
the independent rows use the model's dense [T, T] attention. So the run covers two shapes:
the peers' 11.1M model, whose 32k-vocab head is a large share of the work, and a
trunk-heavy model with a small vocabulary, and records each one's matmul-FLOP ratio of the
two paths beside the measured one.
"""

import argparse
import json
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from common import machine, timed, versions
from flax import nnx

from medjax import models, scoring

RESULTS = pathlib.Path(__file__).parent / "results" / "grouped_scoring.json"
MODELS = {
    # The 11.1M-parameter Qwen2-shaped model of the peers' GRPO step (shared/peers/README.md).
    "peer_11m": models.ModelConfig(
        family="qwen2",
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=704,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        qkv_bias=True,
    ),
    # Same family, most of the work in the trunk: a 4k vocabulary, 8 wider layers.
    "trunk_heavy": models.ModelConfig(
        family="qwen2",
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        qkv_bias=True,
    ),
}


def matmul_flops(c: models.ModelConfig, tokens: int, scored: int, attention_pairs: int) -> float:
    """Forward matmul FLOPs: the trunk on every token, the LM head on the scored tokens,
    QK^T and PV on every (query, key) pair the implementation computes."""
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    trunk = c.num_layers * (2 * d * q + 4 * d * kv + 6 * d * c.intermediate_size)
    return trunk * tokens + 2 * d * c.vocab_size * scored + c.num_layers * 4 * q * attention_pairs


# Query chunk of the grouped XLA attention (prefix_attention's default block_q).
CHUNK = 128


def chunked_pairs(length: int, chunk: int) -> int:
    """(query, key) pairs the causal-chunked XLA path computes: chunk i against keys
    [0, end of chunk i). The independent rows use the model's dense attention, T^2 each."""
    return sum(min(chunk, length - s) * min(s + chunk, length) for s in range(0, length, chunk))


def measure(config: models.ModelConfig, p_len: int, c_len: int, g: int, reps: int) -> dict:
    graphdef, params = nnx.split(models.DecoderLM(config, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (1, p_len)))
    prompt_mask = jnp.ones((1, p_len), jnp.int32)
    completions = jnp.asarray(rng.integers(0, config.vocab_size, (1, g, c_len)))
    completion_mask = jnp.ones((1, g, c_len), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(g, c_len)), jnp.float32)

    def grouped_loss(params):
        m = nnx.merge(graphdef, params)
        logps = scoring.score_groups(m, prompt, prompt_mask, completions, completion_mask)
        return (logps[0] * weights).sum()

    def independent_loss(params):
        m = nnx.merge(graphdef, params)
        logps = scoring.score_completions(
            m,
            jnp.repeat(prompt, g, 0),
            jnp.repeat(prompt_mask, g, 0),
            completions[0],
            completion_mask[0],
        )
        return (logps * weights).sum()

    grouped = jax.jit(jax.value_and_grad(grouped_loss))
    independent = jax.jit(jax.value_and_grad(independent_loss))
    (loss_g, grads_g), (loss_i, grads_i) = grouped(params), independent(params)
    grad_diff = max(
        float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))
        for a, b in zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads_i), strict=True)
    )
    grouped_s, independent_s = [], []
    for _ in range(reps):
        grouped_s.append(timed(lambda: jax.block_until_ready(grouped(params))))
        independent_s.append(timed(lambda: jax.block_until_ready(independent(params))))
    med_g, med_i = statistics.median(grouped_s), statistics.median(independent_s)
    row = p_len + g * c_len
    return {
        "model": {
            "params": config.num_params,
            "vocab": config.vocab_size,
            "hidden": config.hidden_size,
            "layers": config.num_layers,
        },
        "token_ratio": g * (p_len + c_len) / row,
        "matmul_flop_ratio": matmul_flops(
            config, g * (p_len + c_len), g * c_len, g * (p_len + c_len) ** 2
        )
        / matmul_flops(config, row, g * c_len, row**2),
        "loss_abs_diff": float(abs(loss_g - loss_i)),
        "max_grad_diff_relative_to_leaf_max": grad_diff,
        "grouped": {"seconds": grouped_s, "median_s": med_g},
        "independent": {"seconds": independent_s, "median_s": med_i},
        "speedup_vs_independent": med_i / med_g,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    result = {
        "benchmark": "score G completions of one prompt, forward + backward, float32",
        "prompt_len": args.prompt,
        "completion_len": args.completion,
        "group": args.group,
        "tokens": {
            "grouped": args.prompt + args.group * args.completion,
            "independent": args.group * (args.prompt + args.completion),
        },
        "goal": "speedup_vs_independent >= 3.5",
        "reps": args.reps,
        "machine": machine(),
        "versions": versions("jax", "jaxlib", "flax", "numpy"),
        "models": {},
    }
    for name, config in MODELS.items():
        r = measure(config, args.prompt, args.completion, args.group, args.reps)
        result["models"][name] = r
        print(
            f"{name}: grouped {r['grouped']['median_s']:.3f} s, independent"
            f" {r['independent']['median_s']:.3f} s: {r['speedup_vs_independent']:.2f}x (tokens"
            f" {r['token_ratio']:.2f}x, matmul FLOPs {r['matmul_flop_ratio']:.2f}x)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
