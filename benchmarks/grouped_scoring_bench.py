"""Grouped vs independent scoring of G completions per prompt, forward + backward.

    python benchmarks/grouped_scoring_bench.py   # writes benchmarks/results/grouped_scoring.json

Independent: G rows of prompt + completion (TRL's layout), G * (P + C) tokens. Grouped: one
row [prompt | c_1 | ... | c_G] with the shared-prefix mask, P + G * C tokens. Both take the
gradient of sum(per-token log-probs * weights) w.r.t. every parameter, through the fused
log-prob head. Theoretical ratio G (P + C) / (P + G C); the two run alternately rep by rep.
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
# The 11.1M-parameter Qwen2-shaped model of the peers' GRPO step (shared/peers/README.md).
CONFIG = models.ModelConfig(
    family="qwen2",
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=704,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    qkv_bias=True,
    tie_word_embeddings=True,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    p_len, c_len, g = args.prompt, args.completion, args.group

    model = models.DecoderLM(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, p_len)))
    prompt_mask = jnp.ones((1, p_len), jnp.int32)
    completions = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, g, c_len)))
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
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads_i), strict=True)
    )
    grouped_s, independent_s = [], []
    for _ in range(args.reps):
        grouped_s.append(timed(lambda: jax.block_until_ready(grouped(params))))
        independent_s.append(timed(lambda: jax.block_until_ready(independent(params))))

    med_g, med_i = statistics.median(grouped_s), statistics.median(independent_s)
    result = {
        "benchmark": "score G completions of one prompt, forward + backward, float32",
        "model": {
            "params": CONFIG.num_params,
            "vocab": CONFIG.vocab_size,
            "hidden": CONFIG.hidden_size,
            "layers": CONFIG.num_layers,
        },
        "prompt_len": p_len,
        "completion_len": c_len,
        "group": g,
        "tokens": {"grouped": p_len + g * c_len, "independent": g * (p_len + c_len)},
        "theoretical_ratio": g * (p_len + c_len) / (p_len + g * c_len),
        "reps": args.reps,
        "machine": machine(),
        "versions": versions("jax", "jaxlib", "flax", "numpy"),
        "loss_abs_diff": float(abs(loss_g - loss_i)),
        "max_abs_grad_diff": grad_diff,
        "grouped": {"seconds": grouped_s, "median_s": med_g},
        "independent": {"seconds": independent_s, "median_s": med_i},
        "speedup_vs_independent": med_i / med_g,
        "goal": ">= 3.5x",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"grouped {med_g:.3f} s, independent {med_i:.3f} s: {med_i / med_g:.2f}x"
        f" (theoretical {result['theoretical_ratio']:.2f}x); |dgrad| max {grad_diff:.2e}"
    )


if __name__ == "__main__":
    main()
