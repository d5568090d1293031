"""Per-token log-probs from an LM head of Qwen2.5-0.5B's size (D = 896, V = 151,936), float32:
medjax `fused_logprob` (impl="xla", vocab-chunked, never materialises the logits) against the
naive jnp path (logits -> log_softmax -> gather, jitted) and a TRL-style PyTorch selective
log-softmax on materialised logits, forward and forward + backward, in one run.

    python benchmarks/logprob_bench.py            # N = 2048 and 8192; writes results/logprob.json

Forward + backward is the gradient w.r.t. hidden and lm_head of sum(logp * c), c a fixed
random per-token weight (an advantage-weighted policy-gradient loss). Implementations
alternate rep by rep, so load on a shared machine hits all alike; the ratios of medians are
the numbers to quote.

Memory, two ways:
* jax: the compiled executable's `memory_analysis()`: temp bytes (what the computation
  allocates beyond its arguments and outputs) and temp + argument + output - alias.
* everyone, torch included: the peak of the process RSS during a call minus the RSS just
  before it, sampled every 2 ms (torch keeps no allocator statistics on CPU).

A peer whose predicted peak exceeds --memory-budget-gb is not run, and the JSON says so:
jax from its compiled memory analysis, torch from its measured RSS at the smaller N, scaled.
"""

import argparse
import ctypes
import json
import os
import pathlib
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import machine, timed, versions

from medjax.kernels import logprob

RESULTS = pathlib.Path(__file__).parent / "results" / "logprob.json"
GOALS = {"memory_ratio_vs_naive_at_most": 0.1, "time_ratio_vs_naive_at_most": 1.2}
PAGE = os.sysconf("SC_PAGE_SIZE")


def return_freed_memory_to_the_os() -> None:
    """Makes glibc serve every allocation of 1 MiB or more with its own mmap, released on free.
    By default the mmap threshold grows up to 32 MiB as large blocks are freed, and then
    freed tiles stay resident: later calls would reuse them and their RSS peaks would read
    low. Without glibc this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold, m_trim_threshold = -3, -1
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def run_with_rss_peak(fn) -> tuple[float, int]:
    """(seconds, peak RSS - RSS before) of one call of fn, RSS sampled every 2 ms."""
    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        seconds = timed(fn)
    finally:
        done.set()
        sampler.join()
    return seconds, max(peak[0], rss_bytes()) - before


def torch_selective_logps(logits_BxTxV, targets_BxT):
    """TRL's float32 selective log-softmax, re-implemented: gather the target logit, then a
    logsumexp per sequence (a loop, to bound the temporary to one [T, V] row)."""
    selected = torch.gather(logits_BxTxV, -1, targets_BxT.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row_TxV, dim=-1) for row_TxV in logits_BxTxV])
    return selected - lse


def make_peers(n, d, v, seq_len, block_v, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    # Scaled so the logits have a spread like a trained head's (std ~1).
    lm_head = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    targets = rng.integers(0, v, n).astype(np.int32)
    weights = rng.normal(size=n).astype(np.float32)
    h, w, y, c = (jnp.asarray(x) for x in (hidden, lm_head, targets, weights))

    def fused(h, w, y):
        return logprob.fused_logprob(h, w, y, impl="xla", block_v=block_v)

    def naive(h, w, y):
        return logprob.reference_fused_logprob(h, w, y)

    def value_and_grad(fn):
        return jax.grad(lambda h, w, y: jnp.sum(fn(h, w, y) * c), argnums=(0, 1))

    jax_fns = {
        ("medjax_fused_xla", "forward"): fused,
        ("medjax_fused_xla", "forward_backward"): value_and_grad(fused),
        ("naive_jnp", "forward"): naive,
        ("naive_jnp", "forward_backward"): value_and_grad(naive),
    }
    args = (h, w, y)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    peers = {}
    for key, fn in jax_fns.items():
        # Compiled ahead of time: no rep pays for compilation, and the memory analysis is
        # known before anything large runs.
        compiled = jax.jit(fn).lower(*shapes).compile()
        stats = compiled.memory_analysis()
        memory = {
            f: getattr(stats, f)
            for f in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
        }
        memory["alias_size_in_bytes"] = stats.alias_size_in_bytes
        memory["peak_bytes"] = (
            memory["temp_size_in_bytes"]
            + memory["argument_size_in_bytes"]
            + memory["output_size_in_bytes"]
            - memory["alias_size_in_bytes"]
        )
        peers[key] = dict(
            run=lambda compiled=compiled: jax.block_until_ready(compiled(*args)),
            compiled_memory=memory,
            predicted_bytes=memory["peak_bytes"],
        )

    th, tw, ty, tc = (torch.from_numpy(x) for x in (hidden, lm_head, targets, weights))
    ty = ty.long().view(-1, seq_len)

    def torch_forward():
        with torch.no_grad():
            return torch_selective_logps((th @ tw).view(-1, seq_len, v), ty).reshape(-1)

    th_g, tw_g = th.clone().requires_grad_(), tw.clone().requires_grad_()

    def torch_forward_backward():
        th_g.grad = tw_g.grad = None
        logps = torch_selective_logps((th_g @ tw_g).view(-1, seq_len, v), ty).reshape(-1)
        (logps * tc).sum().backward()
        return th_g.grad, tw_g.grad

    peers[("torch_selective_log_softmax", "forward")] = dict(run=torch_forward)
    peers[("torch_selective_log_softmax", "forward_backward")] = dict(run=torch_forward_backward)
    return peers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192], help="N values")
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq-len", type=int, default=1024, help="T of the torch peer's [B, T]")
    parser.add_argument("--block-v", type=int, default=None, help="default: the library's")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--memory-budget-gb", type=float, default=16.0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    return_freed_memory_to_the_os()
    d, v, budget = args.dim, args.vocab, args.memory_budget_gb * 2**30
    torch_bytes_per_row = {}  # Measured RSS peak per token at the smaller N, by mode.

    settings = []
    for n in sorted(args.sizes):
        peers = make_peers(n, d, v, min(args.seq_len, n), args.block_v)
        for (name, mode), peer in peers.items():
            if name.startswith("torch"):
                per_row = torch_bytes_per_row.get(mode)
                peer["predicted_bytes"] = None if per_row is None else per_row * n
            predicted = peer.get("predicted_bytes")
            if predicted is not None and predicted > budget:
                peer["skipped"] = (
                    f"predicted peak {predicted / 2**30:.1f} GiB exceeds the"
                    f" {args.memory_budget_gb:g} GiB budget on this {_ram_gib():.0f} GiB machine"
                )
        active = {k: p for k, p in peers.items() if "skipped" not in p}
        outputs = time_alternating(active, args.reps, n)
        for (name, mode), peer in active.items():
            if name.startswith("torch"):
                torch_bytes_per_row[mode] = peer["rss_peak_delta_bytes"] / n
        settings.append(summarise(n, d, v, peers, outputs))
        peers = active = outputs = None  # Free this size's arrays before the next.

    result = {
        "benchmark": "per-token log-probs of an LM head, float32, D=896 V=151936 (Qwen2.5-0.5B)",
        "machine": machine(),
        "versions": versions("jax", "jaxlib", "torch", "numpy"),
        "ram_gib": _ram_gib(),
        "reps": args.reps,
        "block_v": args.block_v or logprob.DEFAULT_BLOCK_V["xla"],
        "torch_threads": torch.get_num_threads(),
        "goals": GOALS,
        "memory_note": (
            "compiled_memory: jax memory_analysis() of the jitted function; peak_bytes ="
            " temp + argument + output - alias. rss_peak_delta_bytes: peak process RSS during"
            " a call minus RSS before it (the only measure for torch on CPU). The ratios use"
            " temp bytes: arguments (lm_head, 545 MB) and outputs (d lm_head) are the same"
            " for every implementation; *_total ratios include them."
        ),
        "flops_note": (
            "useful flops: 2NDV forward, 6NDV forward+backward for everyone; the fused"
            " backward recomputes the logits and executes 8NDV."
        ),
        "settings": settings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for s in settings:
        for mode, r in s["ratios"].items():
            print(f"N={s['n']} {mode}: {json.dumps(r)}")


def time_alternating(peers, reps, n):
    """Runs every peer once per rep, in turn; records seconds and the largest RSS peak.
    Returns each peer's first output, for the agreement check."""
    outputs = {}
    for peer in peers.values():
        peer["seconds"], peer["rss_peak_delta_bytes"] = [], 0
    for rep in range(reps):
        for key, peer in peers.items():
            box = []
            seconds, rss = run_with_rss_peak(lambda run=peer["run"], box=box: box.append(run()))
            outputs.setdefault(key, box[0])
            peer["seconds"].append(seconds)
            peer["rss_peak_delta_bytes"] = max(peer["rss_peak_delta_bytes"], rss)
            print(f"N={n} rep {rep} {key[0]:28s} {key[1]:16s} {seconds:7.2f} s", flush=True)
    return outputs


def _ram_gib() -> float:
    return os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30


def summarise(n, d, v, peers, outputs):
    useful_flops = {"forward": 2 * n * d * v, "forward_backward": 6 * n * d * v}
    impls = {}
    for (name, mode), peer in peers.items():
        entry = impls.setdefault(name, {}).setdefault(mode, {})
        if "skipped" in peer:
            entry["skipped"] = peer["skipped"]
        else:
            median = statistics.median(peer["seconds"])
            entry.update(
                seconds=peer["seconds"],
                median_seconds=median,
                useful_gflops=useful_flops[mode] / median / 1e9,
                rss_peak_delta_bytes=peer["rss_peak_delta_bytes"],
            )
        if "compiled_memory" in peer:
            entry["compiled_memory"] = peer["compiled_memory"]

    fused, naive, torch_peer = (
        impls[k] for k in ("medjax_fused_xla", "naive_jnp", "torch_selective_log_softmax")
    )
    ratios = {}
    for mode in ("forward", "forward_backward"):
        f, nv, tp = fused[mode], naive[mode], torch_peer[mode]
        r = {}
        fm, nm = f["compiled_memory"], nv["compiled_memory"]
        r["memory_ratio_vs_naive"] = fm["temp_size_in_bytes"] / nm["temp_size_in_bytes"]
        r["memory_ratio_vs_naive_total"] = fm["peak_bytes"] / nm["peak_bytes"]
        r["memory_goal_met"] = r["memory_ratio_vs_naive"] <= GOALS["memory_ratio_vs_naive_at_most"]
        if "median_seconds" in nv:
            r["speedup_vs_naive"] = nv["median_seconds"] / f["median_seconds"]
            r["time_goal_met"] = 1 / r["speedup_vs_naive"] <= GOALS["time_ratio_vs_naive_at_most"]
            r["rss_ratio_vs_naive"] = f["rss_peak_delta_bytes"] / max(nv["rss_peak_delta_bytes"], 1)
        else:
            r["speedup_vs_naive"] = None
            r["note"] = f"naive not run: {nv['skipped']}"
        if "median_seconds" in tp:
            r["speedup_vs_torch"] = tp["median_seconds"] / f["median_seconds"]
            r["rss_ratio_vs_torch"] = f["rss_peak_delta_bytes"] / max(tp["rss_peak_delta_bytes"], 1)
        else:
            r["speedup_vs_torch"] = None
            r["torch_note"] = f"torch not run: {tp['skipped']}"
        ratios[mode] = r

    agreement = {}
    fused_logp = np.asarray(outputs[("medjax_fused_xla", "forward")])
    for key, label in [
        (("naive_jnp", "forward"), "max_abs_logp_diff_vs_naive"),
        (("torch_selective_log_softmax", "forward"), "max_abs_logp_diff_vs_torch"),
    ]:
        if key in outputs:
            other = outputs[key]
            other = other.numpy() if isinstance(other, torch.Tensor) else np.asarray(other)
            agreement[label] = float(np.abs(fused_logp - other).max())
    fb = ("medjax_fused_xla", "forward_backward")
    for key, label in [
        (("naive_jnp", "forward_backward"), "max_rel_grad_diff_vs_naive"),
        (("torch_selective_log_softmax", "forward_backward"), "max_rel_grad_diff_vs_torch"),
    ]:
        if key in outputs:
            diffs = []
            for got, want in zip(outputs[fb], outputs[key], strict=True):
                want = want.numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
                diffs.append(float(np.abs(np.asarray(got) - want).max() / np.abs(want).max()))
            agreement[label] = max(diffs)
    return {"n": n, "d": d, "v": v, "impls": impls, "ratios": ratios, "agreement": agreement}


if __name__ == "__main__":
    main()
