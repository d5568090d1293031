"""Generation tokens/s of the ~50M-parameter model of forward_bench: medjax `sampling.sample`
(one jitted prefill + `lax.while_loop` decode) vs transformers `generate` (PyTorch eager,
dynamic KV cache) on the same weights and prompts, in one run.

    python benchmarks/sampling_bench.py           # writes benchmarks/results/sampling.json
    python benchmarks/sampling_bench.py --model smollm2   # -> results/sampling_smollm2.json

Case `batch`: P = 16 prompts of Tp = 128 random (all real) tokens, exactly N = 128 new tokens
each (no EOS, so no row stops early), greedy and sampled (temperature 1, no top-k / top-p).
The two run alternately, rep by rep, after one warm-up each (compilation for medjax), so that
load on a shared machine hits both alike; the ratio of medians is the number to quote. A
short run with N = 1 on both sides splits the time into prefill and per-step decode. Greedy
tokens of the two are compared: float32 on both sides, but a near-tie of two logits may
still break differently and send a row down another path from that step on.

Case `shared_prefill` (medjax only): G = 8 samples of one prompt via `num_samples=8` (one
prefill, cache broadcast) vs the same prompt 8 times with `num_samples=1`.
"""

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from common import MODELS, machine, smollm2_models, timed, versions
from forward_bench import HF_CONFIG

from medjax import models, sampling

RESULTS = pathlib.Path(__file__).parent / "results" / "sampling.json"


def build_models(seed: int = 0):
    """The forward_bench model: random Qwen2 weights in torch, loaded into medjax."""
    torch.manual_seed(seed)
    hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_CONFIG)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        model = models.from_pretrained(folder, dtype=jnp.float32)
    return hf_model, model


def medjax_fn(model, ids, mask, params: sampling.SamplingParams, num_samples: int = 1):
    key = jax.random.key(0)

    def run():
        out = sampling.sample(model, ids, mask, key, params, num_samples=num_samples)
        return np.asarray(out.tokens.block_until_ready())

    return run


def torch_fn(hf_model, ids, mask, new_tokens: int, greedy: bool):
    kwargs = (
        dict(do_sample=False)
        if greedy
        else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    )

    def run():
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                eos_token_id=None,
                pad_token_id=0,
                **kwargs,
            )
        return out[:, ids.shape[1] :].numpy()

    return run


def alternate(fns: dict, reps: int) -> dict:
    """One warm-up call each, then `reps` rounds calling each once per round.

    Returns:
      {name: {"warmup_s": float, "seconds": [reps] floats, "output": last output}}.
    """
    out = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        result = fn()
        out[name] = {"warmup_s": time.perf_counter() - start, "seconds": [], "output": result}
    for _ in range(reps):
        for name, fn in fns.items():
            out[name]["seconds"].append(timed(fn))
    return out


def greedy_agreement(a: np.ndarray, b: np.ndarray, exact_steps: int = 16) -> dict:
    """How far two [B, N] greedy token arrays agree (rows diverge for good once they differ)."""
    equal = a == b
    first_diff = np.where(equal.all(axis=1), a.shape[1], np.argmin(equal, axis=1))
    return {
        "fraction_equal_tokens": float(equal.mean()),
        "fraction_rows_identical": float(equal.all(axis=1).mean()),
        f"fraction_rows_equal_first_{exact_steps}": float(
            equal[:, :exact_steps].all(axis=1).mean()
        ),
        "first_mismatch_step_per_row": first_diff.tolist(),
    }


def summary(times: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    return {"seconds": times, "median_s": med, "tokens_per_s": tokens / med}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", choices=MODELS, default="random")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    start_all = time.perf_counter()

    if args.model == "smollm2":
        hf_model, model, description = smollm2_models()
    else:
        hf_model, model = build_models()
        description = {"params": model.config.num_params, **HF_CONFIG}
    out = args.out or RESULTS.with_name(
        "sampling.json" if args.model == "random" else f"sampling_{args.model}.json"
    )
    config = model.config
    p, tp, n, g = args.prompts, args.prompt_length, args.new_tokens, args.group
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (p, tp), dtype=np.int32)
    mask = np.ones_like(ids)
    ids_jax, mask_jax = jnp.asarray(ids), jnp.asarray(mask)
    ids_torch, mask_torch = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    new = p * n

    cases = {}
    settings = {"greedy": True, "sampled": False}
    for setting, greedy in settings.items():
        params = sampling.SamplingParams(
            max_new_tokens=n, temperature=1.0, top_k=0, top_p=1.0, greedy=greedy, eos_ids=()
        )
        runs = alternate(
            {
                "medjax": medjax_fn(model, ids_jax, mask_jax, params),
                "transformers": torch_fn(hf_model, ids_torch, mask_torch, n, greedy),
            },
            args.reps,
        )
        case = {name: {**summary(r["seconds"], new), "warmup_s": r["warmup_s"]}
                for name, r in runs.items()}  # fmt: skip
        case["speedup_vs_transformers"] = (
            case["transformers"]["median_s"] / case["medjax"]["median_s"]
        )
        if greedy:
            a, b = runs["medjax"]["output"], runs["transformers"]["output"]
            case["greedy_token_agreement"] = greedy_agreement(a, b)
        cases[f"batch_{setting}"] = case

    # Prefill vs decode: the same greedy run with one new token (prefill + one step).
    one = sampling.SamplingParams(max_new_tokens=1, greedy=True, eos_ids=())
    runs = alternate(
        {
            "medjax": medjax_fn(model, ids_jax, mask_jax, one),
            "transformers": torch_fn(hf_model, ids_torch, mask_torch, 1, True),
        },
        args.reps,
    )
    breakdown = {}
    for name, r in runs.items():
        prefill = statistics.median(r["seconds"])
        full = cases["batch_greedy"][name]["median_s"]
        breakdown[name] = {
            "one_new_token_seconds": r["seconds"],
            "prefill_s": prefill,
            "decode_s": full - prefill,
            "decode_ms_per_step": 1e3 * (full - prefill) / (n - 1),
            "decode_tokens_per_s": p * (n - 1) / (full - prefill),
        }
    breakdown["decode_speedup_vs_transformers"] = (
        breakdown["transformers"]["decode_s"] / breakdown["medjax"]["decode_s"]
    )
    breakdown["prefill_speedup_vs_transformers"] = (
        breakdown["transformers"]["prefill_s"] / breakdown["medjax"]["prefill_s"]
    )
    cases["batch_greedy_breakdown"] = breakdown

    # G samples of one prompt: shared prefill vs G independent copies of the prompt.
    params = sampling.SamplingParams(max_new_tokens=n, temperature=1.0, eos_ids=())
    one_prompt = ids_jax[:1]
    runs = alternate(
        {
            "shared_prefill": medjax_fn(model, one_prompt, mask_jax[:1], params, num_samples=g),
            "independent": medjax_fn(
                model, jnp.repeat(one_prompt, g, axis=0), jnp.ones((g, tp), jnp.int32), params
            ),
        },
        args.reps,
    )
    case = {name: {**summary(r["seconds"], g * n), "warmup_s": r["warmup_s"]}
            for name, r in runs.items()}  # fmt: skip
    case["speedup_shared_prefill_vs_independent"] = (
        case["independent"]["median_s"] / case["shared_prefill"]["median_s"]
    )
    cases["shared_prefill"] = case

    result = {
        "benchmark": "generation, float32, KV cache: sampling.sample vs transformers generate",
        "model": description,
        "machine": machine(),
        "versions": versions("jax", "jaxlib", "flax", "torch", "transformers", "numpy"),
        "settings": {
            "prompts": p,
            "prompt_length": tp,
            "new_tokens": n,
            "group_size": g,
            "reps": args.reps,
            "dtype": "float32",
            "prompts_all_real_tokens": True,
            "eos": "none: every row generates exactly new_tokens (medjax eos_ids=(); "
            "transformers eos_token_id=None, min_new_tokens=max_new_tokens)",
            "sampled": "temperature 1, top_k 0, top_p 1",
            "torch_threads": torch.get_num_threads(),
            "fairness": "torch.set_num_threads(os.cpu_count()); XLA CPU uses every core by "
            "default. One warm-up call each (medjax compiles in it), then alternating reps; "
            "speedups are ratios of medians. medjax times include the device-to-host copy "
            "of the tokens, transformers `generate` is eager PyTorch with its default "
            "dynamic cache.",
            "tokens_per_s": "new tokens / wall time of the whole call (prefill included)",
        },
        "cases": cases,
        "total_runtime_s": time.perf_counter() - start_all,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'case':26s} {'medjax tok/s':>13s} {'hf tok/s':>10s} {'speedup':>8s}")
    for name in ("batch_greedy", "batch_sampled"):
        c = cases[name]
        print(
            f"{name:26s} {c['medjax']['tokens_per_s']:13.0f}"
            f" {c['transformers']['tokens_per_s']:10.0f} {c['speedup_vs_transformers']:7.2f}x"
        )
    for name in ("medjax", "transformers"):
        r = breakdown[name]
        print(
            f"{name:13s} prefill {r['prefill_s']:.2f} s, decode {r['decode_ms_per_step']:.1f}"
            f" ms/step ({r['decode_tokens_per_s']:.0f} tokens/s)"
        )
    agree = cases["batch_greedy"]["greedy_token_agreement"]
    print(
        f"greedy agreement: {agree['fraction_equal_tokens']:.3f} of tokens,"
        f" {agree['fraction_rows_equal_first_16']:.3f} of rows equal on the first 16 steps"
    )
    c = cases["shared_prefill"]
    print(
        f"G={g} shared prefill {c['shared_prefill']['tokens_per_s']:.0f} tokens/s vs"
        f" independent {c['independent']['tokens_per_s']:.0f}:"
        f" {c['speedup_shared_prefill_vs_independent']:.2f}x"
    )
    print(f"total {result['total_runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
