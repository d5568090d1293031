"""A multi-turn agent rollout on SmolLM2-135M-Instruct (float32): medjax's
`JaxPolicyBackend` keeping each episode's KV cache across turns, the same backend prefilling
every whole history again (`keep_cache=False`, medjax before the kept cache), and
transformers `generate` carrying its own `past_key_values` across turns, in one run.

    python benchmarks/agent_rollout_bench.py   # -> benchmarks/results/agent_rollout_smollm2.json

The shape is the CPU quickstart's RL batch: 4 questions x G = 4 episodes under the research
agent's system prompt and tool list, 3 turns (budgets 64, 64 and the forced final turn's 32
new tokens), and between turns a tool response of about 110 tokens with the chat template's
framing appended to every episode. Every turn generates exactly its budget (no EOS or stop
string ends a row), greedy, so all three do the same work: 16 x 160 new tokens. The three
run alternately, rep by rep, after one warm-up each (compilation for medjax); speedups are
ratios of medians. The greedy tokens of the three are compared.

The same run measures this machine's memory bandwidth (numpy copies of a 1 GiB array) and
the sampler's decode step (16 rows, `sampling.sample` with 1 and with 65 new tokens), and
reports the bytes a decode step must read (the weights and the KV cache) against it.
"""

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import machine, smollm2_models, timed, versions
from flax import nnx

from medjax import agents, llm, sampling
from medjax.envs import research
from medjax.models import smollm2
from medjax.models import tokenizer as tokenizer_lib

RESULTS = pathlib.Path(__file__).parent / "results" / "agent_rollout_smollm2.json"
QUESTIONS = (
    "Which gene is linked to the disease that presents with arachnodactyly and lens dislocation?",
    "A patient has hypotrichosis and nail dystrophy: which disorder fits, and what else is"
    " typical of it?",
    "What phenotype do Marfan syndrome and Loeys-Dietz syndrome share?",
    "Which feature of Fabry disease concerns the kidney?",
)
TOOL_RESPONSE = (
    "[1] Marfan syndrome (OMIM:154700): a disorder of connective tissue. Clinical features"
    " include arachnodactyly, ectopia lentis, aortic root dilatation, pectus excavatum, tall"
    " stature and joint hypermobility. Caused by variants in FBN1. [2] Loeys-Dietz syndrome:"
    " arterial tortuosity, hypertelorism, bifid uvula; genes TGFBR1, TGFBR2, SMAD3."
)


def system_prompt() -> str:
    def tool(name, description):
        schema = {"type": "object", "properties": {"query": {"type": "string"}}}
        return agents.Tool(name, description, schema, lambda **_: "")

    spec = agents.AgentSpec(
        "researcher", None, system_prompt=research.SYSTEM_PROMPT,
        tools=[
            tool("search", "Searches the medical knowledge base; returns the top documents."),
            tool("read", "Returns a document of the knowledge base in full."),
            tool("kg_lookup", "Looks an entity up in the knowledge graph."),
        ],
    )  # fmt: skip
    return agents.loop.system_prompt(spec)


def episode_inputs(tokenizer, group: int):
    """The 4 first prompts' ids and the ids appended to every episode after a turn."""
    prompts = [
        tokenizer_lib.apply_chat_template(
            tokenizer,
            [{"role": "system", "content": system_prompt()}, {"role": "user", "content": q}],
            tokenize=True,
        )
        for q in QUESTIONS
    ]
    # What the agent loop appends after a reply: the end of the assistant turn, the tool
    # response as a user turn, and the next generation prompt.
    framing = (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n"
        + TOOL_RESPONSE
        + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    appended = tokenizer.encode(framing, add_special_tokens=False)
    return prompts, appended


def medjax_fn(model, tokenizer, prompts, appended, budgets, group, keep_cache):
    def run():
        backend = llm.JaxPolicyBackend(model, tokenizer, seed=0, keep_cache=keep_cache)
        histories, replies = None, []
        for turn, budget in enumerate(budgets):
            params = sampling.SamplingParams(max_new_tokens=budget, greedy=True, eos_ids=())
            if turn == 0:
                gens = backend.generate_ids(prompts, params, num_samples=group)
                histories = [list(prompts[i // group]) for i in range(len(gens))]
            else:
                gens = backend.generate_ids(histories, params)
            for i, gen in enumerate(gens):
                histories[i] = histories[i] + gen.token_ids + appended
            replies.append([g.token_ids for g in gens])
        tokens = np.concatenate([np.asarray(r) for r in replies], axis=1)
        return tokens, backend.stats

    return run


def torch_fn(hf_model, prompts, appended, budgets, group):
    """transformers `generate` with one DynamicCache carried across the turns: each call
    gets the whole history (left-padded, with its attention mask) and the cache of the
    previous call, so it runs the model only on the tokens the cache lacks."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    extra = torch.tensor(appended, dtype=torch.long)[None].repeat(ids.shape[0], 1)

    def run():
        from transformers import DynamicCache

        cache, seq, att, replies = DynamicCache(), ids, mask, []
        with torch.no_grad():
            for turn, budget in enumerate(budgets):
                if turn:
                    seq = torch.cat([seq, extra], 1)
                    att = torch.cat([att, torch.ones_like(extra)], 1)
                out = hf_model.generate(
                    seq, attention_mask=att, past_key_values=cache, max_new_tokens=budget,
                    min_new_tokens=budget, do_sample=False, eos_token_id=None, pad_token_id=0,
                    return_dict_in_generate=True,
                )  # fmt: skip
                new = out.sequences[:, seq.shape[1] :]
                replies.append(new)
                seq, cache = out.sequences, out.past_key_values
                att = torch.cat([att, torch.ones_like(new)], 1)
        return torch.cat(replies, 1).numpy(), None

    return run


def memory_bandwidth_gb_s(reps: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second) of a 1 GiB float32 array."""
    a = np.ones(1 << 28, np.float32)
    b = np.empty_like(a)
    best = min(timed(lambda: np.copyto(b, a)) for _ in range(reps))
    return 2 * a.nbytes / best / 1e9


def decode_step(model, rows: int, prompt_length: int, reps: int) -> dict:
    """ms per decode step of `rows` rows after a `prompt_length` prompt: the time of 65 new
    tokens minus that of 1, over 64."""
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (rows, prompt_length)))
    mask = jnp.ones_like(ids)
    key = jax.random.key(0)

    def run(n):
        params = sampling.SamplingParams(max_new_tokens=n, greedy=True, eos_ids=())
        return lambda: np.asarray(sampling.sample(model, ids, mask, key, params).tokens)

    short, long = run(1), run(65)
    short(), long()
    t1 = statistics.median(timed(short) for _ in range(reps))
    t65 = statistics.median(timed(long) for _ in range(reps))
    return {"rows": rows, "prompt_length": prompt_length, "ms_per_step": 1e3 * (t65 - t1) / 64}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    start_all = time.perf_counter()
    hf_model, model, description = smollm2_models()
    tokenizer = tokenizer_lib.load_tokenizer(smollm2.gguf_path())
    prompts, appended = episode_inputs(tokenizer, args.group)
    budgets = (64, 64, 32)
    fns = {
        "medjax_kept_cache": medjax_fn(
            model, tokenizer, prompts, appended, budgets, args.group, True
        ),
        "medjax_reprefill": medjax_fn(
            model, tokenizer, prompts, appended, budgets, args.group, False
        ),
        "transformers": torch_fn(hf_model, prompts, appended, budgets, args.group),
    }
    runs = {name: {"seconds": []} for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        runs[name]["output"], runs[name]["stats"] = fn()
        runs[name]["warmup_s"] = time.perf_counter() - start
    for _ in range(args.reps):
        for name, fn in fns.items():
            runs[name]["seconds"].append(timed(fn))
    episodes = len(prompts) * args.group
    new_tokens = episodes * sum(budgets)
    cases = {}
    for name, r in runs.items():
        med = statistics.median(r["seconds"])
        cases[name] = {
            "seconds": r["seconds"], "median_s": med, "warmup_s": r["warmup_s"],
            "new_tokens_per_s": new_tokens / med,
        }  # fmt: skip
        if r["stats"] is not None:
            cases[name]["prefilled_tokens"] = r["stats"]["prefilled_tokens"]
            cases[name]["reused_tokens"] = r["stats"]["reused_tokens"]
    kept = cases["medjax_kept_cache"]["median_s"]
    cases["speedup_vs_reprefill"] = cases["medjax_reprefill"]["median_s"] / kept
    cases["speedup_vs_transformers"] = cases["transformers"]["median_s"] / kept
    ref = runs["medjax_kept_cache"]["output"]
    cases["greedy_tokens_equal"] = {
        name: float((runs[name]["output"] == ref).mean())
        for name in ("medjax_reprefill", "transformers")
    }
    bandwidth = memory_bandwidth_gb_s()
    step = decode_step(model, episodes, 1024, args.reps)
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    c = model.config
    kv = 2 * c.num_layers * episodes * c.num_kv_heads * (1024 + 65) * c.head_dim * 4
    moved = weights + kv
    step["bytes_read_per_step"] = moved
    step["gb_s"] = moved / (step["ms_per_step"] / 1e3) / 1e9
    step["fraction_of_copy_bandwidth"] = step["gb_s"] / bandwidth

    result = {
        "benchmark": "multi-turn agent rollout, SmolLM2-135M-Instruct f32: medjax kept KV cache"
        " vs medjax re-prefill vs transformers generate with past_key_values",
        "model": description,
        "machine": machine(),
        "versions": versions("jax", "jaxlib", "flax", "torch", "transformers", "numpy"),
        "settings": {
            "questions": len(prompts),
            "group": args.group,
            "episodes": episodes,
            "turn_budgets": list(budgets),
            "first_prompt_tokens": [len(p) for p in prompts],
            "appended_tokens_per_turn": len(appended),
            "greedy": True,
            "eos": "none",
            "reps": args.reps,
            "torch_threads": torch.get_num_threads(),
            "fairness": "alternating reps after one warm-up each (medjax compiles in it);"
            " ratios of medians; every turn generates exactly its budget on all three.",
        },
        "cases": cases,
        "memory": {"copy_bandwidth_gb_s": bandwidth, "decode_step": step},
        "total_runtime_s": time.perf_counter() - start_all,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in fns:
        r = cases[name]
        print(f"{name:20s} {r['median_s']:7.2f} s  {r['new_tokens_per_s']:6.1f} new tokens/s")
    print(
        f"kept cache: {cases['speedup_vs_reprefill']:.2f}x re-prefill,"
        f" {cases['speedup_vs_transformers']:.2f}x transformers; tokens equal:"
        f" {cases['greedy_tokens_equal']}"
    )
    print(
        f"memory copy bandwidth {bandwidth:.1f} GB/s; decode step {step['ms_per_step']:.1f} ms"
        f" reads {moved / 1e9:.2f} GB = {step['gb_s']:.1f} GB/s"
        f" ({step['fraction_of_copy_bandwidth']:.0%})"
    )
    print(f"total {result['total_runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
