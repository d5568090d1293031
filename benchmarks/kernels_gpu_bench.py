"""The two Pallas kernels on an accelerator: `fused_logprob` (kernels/logprob.py) and
`grouped_attention` (kernels/prefix_attention.py), each as impl="pallas", "xla" and
"reference", checked against a float32 oracle and timed, forward and forward + backward,
float32 and bfloat16, in one run.

    python3 benchmarks/kernels_gpu_bench.py --out /tmp/kernels_gpu.json     # GPU sizes
    python3 benchmarks/kernels_gpu_bench.py --smoke --out /tmp/kg_smoke.json  # CPU, < 1 min

Sizes (GPU defaults; --smoke shrinks every one, and Pallas then runs in interpret mode):
* logprob: per-token log p(target) and entropy of an LM head of Qwen2.5-0.5B's size
  (D = 896, V = 151,936) for N = 2048 and 8192 tokens, with the library's tiles or those of
  --logprob-block-v / --logprob-block-n. Forward + backward is the gradient w.r.t. hidden and
  lm_head of sum(c1 * logp + c2 * entropy), c1 and c2 random per-token weights.
* prefix attention: B = 4 rows, each a 512-token prompt packed with G = 8 completions of 192
  tokens (`medjax.packing.pack_groups`, L = 2048), K = 64, heads H:N = 14:2 (Qwen2.5-0.5B,
  7 query heads per kv head) and 16:2 (8 per kv head, a power of two, which Triton tiles
  want). Forward + backward is the gradient w.r.t. q, k and v of sum(out * ct), ct random.
  `count_visited_blocks` of the layout is recorded beside the times.

Pallas runs with the library's `interpret=None` (interpret mode on CPU only), so on a GPU the
real lowering is exercised. logprob's kernels pass Mosaic GPU CompilerParams on a GPU, which
sends pallas_call to Mosaic GPU rather than Triton; on a GPU the run therefore adds
"pallas_triton": the same kernels traced with `logprob._compiler_params` patched to return
Triton CompilerParams (the patch lives in this script only, for the lowering of that impl).

Each implementation is first checked on random inputs against impl="reference" evaluated in
float32 at "highest" matmul precision on the same inputs (bfloat16 inputs upcast): the
relative error ||got - want|| / ||want|| of every output and of every gradient; a non-finite
value fails the check. Then, per mode, each function is compiled ahead of time (compile
seconds recorded apart), called once (excluded), and timed --reps times with
block_until_ready, implementations alternating rep by rep; the JSON keeps the raw times,
medians, and speedup_vs_<peer> = median(peer) / median(impl).

Every (case, impl) runs inside try/except: a failed lowering, compile or call is recorded
(stage, exception type, the first 2000 characters of its message, the traceback's tail),
printed, and the run goes on. The JSON is rewritten after every step ("in_progress" names
the step under way, so a crash or a timeout leaves partial results), and no new step starts
after --time-budget seconds.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import socket
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from common import machine, versions

from medjax import packing
from medjax.kernels import logprob
from medjax.kernels import prefix_attention as pa

START = time.perf_counter()
RESULTS = pathlib.Path(__file__).parent / "results" / "kernels_gpu.json"
MODES = ("forward", "forward_backward")
IMPLS = ("pallas", "xla", "reference")
PACKAGES = (
    "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
    "jax-cuda13-pjrt", "numpy", "flax", "medjax",
)  # fmt: skip
# Relative-error bounds of the check. The implementations run at the default matmul
# precision (TF32 for float32 matmuls on recent NVIDIA GPUs) against a "highest" oracle.
TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2}
MESSAGE_CHARS = 2000

GPU_DEFAULTS = dict(
    logprob_sizes=[2048, 8192],
    logprob_dim=896,
    logprob_vocab=151936,
    attn_batch=4,
    attn_prompt=512,
    attn_completions=8,
    attn_completion_len=192,
    attn_heads=["14:2", "16:2"],
    attn_head_dim=64,
    attn_block_q=128,
    attn_block_k=128,
    time_budget=200.0,
)
SMOKE_DEFAULTS = dict(
    logprob_sizes=[64],
    logprob_dim=32,
    logprob_vocab=1000,
    attn_batch=1,
    attn_prompt=32,
    attn_completions=4,
    attn_completion_len=24,
    attn_heads=["4:2"],
    attn_head_dim=16,
    attn_block_q=32,
    attn_block_k=32,
    time_budget=600.0,
)


def elapsed() -> float:
    return time.perf_counter() - START


def log(message: str) -> None:
    print(f"[{elapsed():7.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------
# Provenance.


def provenance() -> dict:
    """common.machine() and common.versions(), with the devices' kinds and the run's
    command line."""
    out = {"hostname": socket.gethostname(), "date": datetime.datetime.now().astimezone()}
    out["date"] = out["date"].isoformat(timespec="seconds")
    out["machine"] = machine()
    out["machine"]["device_kinds"] = [d.device_kind for d in jax.devices()]
    out["versions"] = versions(*PACKAGES)
    out["versions"]["jax.__version__"] = jax.__version__
    out["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
    out["jax_pallas_use_mosaic_gpu"] = bool(getattr(jax.config, "jax_pallas_use_mosaic_gpu", False))
    out["command"] = [sys.executable, *sys.argv]
    return out


def _clean(x):
    """JSON-safe: non-finite floats as strings (strict JSON has no NaN), numpy as Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class Recorder:
    """The result object, rewritten to disk (atomically) after every step."""

    def __init__(self, path: pathlib.Path, header: dict):
        self.path = path
        self.result = {**header, "in_progress": None, "cases": []}

    def save(self, in_progress: str | None = None) -> None:
        self.result["in_progress"] = in_progress
        self.result["elapsed_seconds"] = elapsed()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(_clean(self.result), indent=2) + "\n")
        os.replace(tmp, self.path)


def kernel_frames(exc: BaseException) -> list[str]:
    """The frames of kernels/ (medjax.kernels) in the traceback and its causes, outermost
    first: where in the kernel source a lowering failed."""
    frames, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for f in traceback.extract_tb(exc.__traceback__):
            if f"{os.sep}kernels{os.sep}" in f.filename:
                line = f"{os.path.basename(f.filename)}:{f.lineno} {f.name}: {f.line}"
                if line not in frames:
                    frames.append(line)
        exc = exc.__cause__ or exc.__context__
    return frames


def error_record(stage: str, exc: BaseException) -> dict:
    message = str(exc)
    return {
        "stage": stage,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": message[:MESSAGE_CHARS],
        "message_chars": len(message),
        "kernel_frames": kernel_frames(exc),
        "traceback_tail": traceback.format_exc()[-MESSAGE_CHARS:],
    }


def print_error(label: str, error: dict) -> None:
    first = error["message"].strip().splitlines()[:12]
    log(f"{label}: FAILED at {error['stage']}: {error['type']}")
    for line in first:
        print(f"        | {line[:200]}", flush=True)
    for line in error.get("kernel_frames", [])[-3:]:
        print(f"        @ {line[:200]}", flush=True)


# ---------------------------------------------------------------------------------------
# Cases. A case holds args (device arrays), per-impl (forward, forward_backward) functions
# of args, the oracle's functions, and the names of outputs and gradients. Forward returns
# a tuple of outputs; forward_backward returns (outputs, gradients).


@contextlib.contextmanager
def triton_compiler_params():
    """Traces logprob's kernels with Triton CompilerParams instead of the Mosaic GPU ones
    that `_compiler_params` returns on "gpu". Caches are cleared on both sides, so no trace
    made under one setting is reused under the other."""
    try:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams()
    except Exception:
        params = None  # The default lowering of pallas_call on GPU is Triton.
    saved = logprob._compiler_params
    jax.clear_caches()
    logprob._compiler_params = lambda semantics: params
    try:
        yield
    finally:
        logprob._compiler_params = saved
        jax.clear_caches()


def logprob_case(n, d, v, dtype, block_n, block_v, entropy, seed):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    # Logits of unit scale, like a trained head's (as in tests/kernels/test_logprob.py).
    lm_head = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    targets = rng.integers(0, v, n).astype(np.int32)
    edges = [t for t in (v - 1, 0, 127, 128, 511, 512, 1023, 1024) if t < v][:n]
    targets[: len(edges)] = edges  # Tile edges of the usual block sizes.
    weights = rng.normal(size=(2, n)).astype(np.float32)
    args = (
        jnp.asarray(hidden, dtype),
        jnp.asarray(lm_head, dtype),
        jnp.asarray(targets),
        jnp.asarray(weights[0]),
        jnp.asarray(weights[1]),
    )
    blocks = {}
    if block_n is not None:
        blocks["block_n"] = block_n
    if block_v is not None:
        blocks["block_v"] = block_v

    def make(impl):
        def forward(h, w, y, c1, c2):
            out = logprob.fused_logprob(h, w, y, return_entropy=entropy, impl=impl, **blocks)
            return out if entropy else (out,)

        def forward_backward(h, w, y, c1, c2):
            def loss(h, w):
                outs = forward(h, w, y, c1, c2)
                value = jnp.sum(c1 * outs[0])
                if entropy:
                    value = value + jnp.sum(c2 * outs[1])
                return value, outs

            (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)
            return outs, grads

        return forward, forward_backward

    return {
        "args": args,
        "make": make,
        "upcast": lambda a: (a[0].astype(jnp.float32), a[1].astype(jnp.float32), *a[2:]),
        "out_names": ("logp", "entropy") if entropy else ("logp",),
        "grad_names": ("d_hidden", "d_lm_head"),
    }


def segment_ids(batch, prompt, group, completion_len):
    """[B, L] segment ids of `batch` rows of a full prompt and G full completions."""
    return packing.pack_groups(
        np.full((batch,), prompt),
        np.full((batch, group), completion_len),
        prompt_capacity=prompt,
        completion_capacity=completion_len,
    ).segment_ids


def attention_case(seg, heads, kv_heads, head_dim, block_q, block_k, dtype, seed):
    batch, length = seg.shape
    rng = np.random.default_rng(seed)

    def normal(h, dtype):
        return jnp.asarray(rng.normal(size=(batch, length, h, head_dim)), dtype)

    args = (
        normal(heads, dtype),
        normal(kv_heads, dtype),
        normal(kv_heads, dtype),
        jnp.asarray(seg, jnp.int32),
        normal(heads, jnp.float32),
    )

    def make(impl):
        def forward(q, k, v, seg, ct):
            out = pa.grouped_attention(q, k, v, seg, impl=impl, block_q=block_q, block_k=block_k)
            return (out,)

        def forward_backward(q, k, v, seg, ct):
            def loss(q, k, v):
                (out,) = forward(q, k, v, seg, ct)
                return jnp.sum(out.astype(jnp.float32) * ct), (out,)

            (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
            return outs, grads

        return forward, forward_backward

    return {
        "args": args,
        "make": make,
        "upcast": lambda a: (*(x.astype(jnp.float32) for x in a[:3]), *a[3:]),
        "out_names": ("out",),
        "grad_names": ("dq", "dk", "dv"),
    }


def layout_blocks(seg, block_q, block_k):
    """Blocks the Pallas kernels visit for this layout, against causal attention."""
    visited = pa.count_visited_blocks(seg, block_q=block_q, block_k=block_k)
    causal = pa.count_visited_blocks(jnp.zeros_like(seg), block_q=block_q, block_k=block_k)
    return {
        "block_q": block_q,
        "block_k": block_k,
        "visited_blocks_per_row_and_kv_head": np.asarray(visited).tolist(),
        "causal_blocks_per_row_and_kv_head": np.asarray(causal).tolist(),
    }


# ---------------------------------------------------------------------------------------
# Running one case.


def rel_errors(got, want, names) -> dict:
    out = {}
    for name, a, b in zip(names, got, want, strict=True):
        a = jnp.asarray(a, jnp.float32)
        b = jnp.asarray(b, jnp.float32)
        nonfinite = int(jnp.sum(~jnp.isfinite(a)))
        err = float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))
        out[name] = {"rel_err": err, "nonfinite": nonfinite, "shape": list(a.shape)}
    return out


def check(fwd_outs, fb_outs, grads, oracle, names, tol) -> dict:
    """Relative errors of outputs (forward), outputs (of forward_backward) and gradients."""
    want_outs, want_grads = oracle
    result = {
        "outputs": rel_errors(fwd_outs, want_outs, names["out"]),
        "outputs_of_forward_backward": rel_errors(fb_outs, want_outs, names["out"]),
        "gradients": rel_errors(grads, want_grads, names["grad"]),
        "tolerance": tol,
    }
    errors = [e for group in ("outputs", "outputs_of_forward_backward", "gradients")
              for e in result[group].values()]  # fmt: skip
    result["max_out_rel_err"] = max(e["rel_err"] for e in result["outputs"].values())
    result["max_grad_rel_err"] = max(e["rel_err"] for e in result["gradients"].values())
    finite = all(e["nonfinite"] == 0 and math.isfinite(e["rel_err"]) for e in errors)
    result["ok"] = finite and max(e["rel_err"] for e in errors) <= tol
    return result


def compile_fn(fn, args, context):
    with context():
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        return compiled, time.perf_counter() - start


def memory(compiled) -> dict | None:
    try:
        stats = compiled.memory_analysis()
        return {
            f: int(getattr(stats, f))
            for f in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
        }
    except Exception:
        return None


def run_case(rec: Recorder, entry: dict, build, impls, reps: int, budget: float) -> None:
    """Check and time every impl of one case; records into entry (already in rec)."""
    label = entry["name"]
    rec.save(f"{label}: inputs")
    if elapsed() > budget:
        entry["skipped"] = f"time budget of {budget:g} s spent before the case started"
        log(f"{label}: skipped (time budget)")
        return
    log(f"{label}: building inputs")
    try:
        case = build()
        jax.block_until_ready(case["args"])
    except Exception as exc:
        entry["error"] = error_record("inputs", exc)
        print_error(label, entry["error"])
        return
    args = case["args"]
    names = {"out": case["out_names"], "grad": case["grad_names"]}

    # The oracle: impl="reference" on float32 inputs at "highest" matmul precision.
    rec.save(f"{label}: oracle")
    oracle = None
    try:

        def highest():
            return jax.default_matmul_precision("highest")

        oracle_args = case["upcast"](args)
        compiled, seconds = compile_fn(case["make"]("reference")[1], oracle_args, highest)
        oracle = jax.block_until_ready(compiled(*oracle_args))
        entry["oracle_compile_seconds"] = seconds
        del oracle_args, compiled
    except Exception as exc:
        entry["oracle_error"] = error_record("oracle", exc)
        print_error(f"{label} oracle", entry["oracle_error"])

    ready = {}
    for impl in impls:
        record = entry["impls"][impl] = {"status": "pending"}
        rec.save(f"{label}: {impl}")
        if elapsed() > budget:
            record["status"] = "skipped"
            record["note"] = f"time budget of {budget:g} s spent"
            log(f"{label} {impl}: skipped (time budget)")
            continue
        lib_impl, context = impl, contextlib.nullcontext
        if impl == "pallas_triton":
            lib_impl, context = "pallas", triton_compiler_params
        stage = "compile"
        try:
            fns = dict(zip(MODES, case["make"](lib_impl), strict=True))
            compiled = {}
            record["compile_seconds"], record["first_call_seconds"] = {}, {}
            record["compiled_memory"] = {}
            outs = {}
            for mode in MODES:
                stage = f"compile {mode}"
                log(f"{label} {impl}: compiling {mode}")
                rec.save(f"{label}: {impl} {stage}")
                compiled[mode], record["compile_seconds"][mode] = compile_fn(
                    fns[mode], args, context
                )
                record["compiled_memory"][mode] = memory(compiled[mode])
                stage = f"first call {mode}"
                rec.save(f"{label}: {impl} {stage}")
                start = time.perf_counter()
                outs[mode] = jax.block_until_ready(compiled[mode](*args))
                record["first_call_seconds"][mode] = time.perf_counter() - start
            stage = "check"
            if oracle is not None:
                fb_outs, grads = outs["forward_backward"]
                record["check"] = check(
                    outs["forward"], fb_outs, grads, oracle, names, entry["tolerance"]
                )
                c = record["check"]
                log(
                    f"{label} {impl}: compiled in {sum(record['compile_seconds'].values()):.1f} s;"
                    f" rel err out {c['max_out_rel_err']:.2e} grad {c['max_grad_rel_err']:.2e}"
                    f" -> {'ok' if c['ok'] else 'WRONG'}"
                )
            del outs
            record["status"] = "ok"
            ready[impl] = compiled
        except Exception as exc:
            record["status"] = "error"
            record["error"] = error_record(stage, exc)
            print_error(f"{label} {impl}", record["error"])
        rec.save(f"{label}: {impl} done")
    del oracle

    # Timing: implementations alternate within each rep.
    times = {impl: {mode: [] for mode in MODES} for impl in ready}
    for rep in range(reps):
        if rep and elapsed() > budget:
            entry["timing_note"] = f"stopped after {rep} reps: time budget of {budget:g} s spent"
            break
        rec.save(f"{label}: timing rep {rep}")
        for mode in MODES:
            for impl in list(ready):
                try:
                    start = time.perf_counter()
                    jax.block_until_ready(ready[impl][mode](*args))
                    times[impl][mode].append(time.perf_counter() - start)
                except Exception as exc:
                    entry["impls"][impl]["status"] = "error"
                    entry["impls"][impl]["error"] = error_record(f"timing {mode}", exc)
                    print_error(f"{label} {impl}", entry["impls"][impl]["error"])
                    del ready[impl]
    medians = {}
    for impl in ready:
        for mode in MODES:
            seconds = times[impl][mode]
            medians.setdefault(mode, {})[impl] = statistics.median(seconds)
            entry["impls"][impl][mode] = {
                "seconds": seconds,
                "median_seconds": statistics.median(seconds),
                "min_seconds": min(seconds),
            }
    entry["ratios"] = {
        mode: {
            impl: {f"speedup_vs_{peer}": med[peer] / med[impl] for peer in med if peer != impl}
            for impl in med
        }
        for mode, med in medians.items()
    }
    if medians:
        summary = ", ".join(
            f"{impl} {1e3 * medians['forward'][impl]:.2f}/"
            f"{1e3 * medians['forward_backward'][impl]:.2f} ms"
            for impl in ready
        )
        log(f"{label}: median fwd/fwd+bwd: {summary}")
    rec.save(f"{label}: done")


# ---------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpret mode)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--kernels", nargs="+", default=["logprob", "attention"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, help="seconds; no step starts after it")
    parser.add_argument("--logprob-sizes", type=int, nargs="+", help="N values")
    parser.add_argument("--logprob-dim", type=int)
    parser.add_argument("--logprob-vocab", type=int)
    parser.add_argument(
        "--logprob-block-v", nargs="+", default=["default"], help="ints or 'default'"
    )
    parser.add_argument(
        "--logprob-block-n", nargs="+", default=["default"], help="ints or 'default'"
    )
    parser.add_argument(
        "--logprob-entropy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also return (and differentiate) the entropy",
    )
    parser.add_argument(
        "--logprob-triton",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a GPU, also run logprob's kernels with Triton CompilerParams",
    )
    parser.add_argument("--attn-batch", type=int)
    parser.add_argument("--attn-prompt", type=int)
    parser.add_argument("--attn-completions", type=int)
    parser.add_argument("--attn-completion-len", type=int)
    parser.add_argument("--attn-heads", nargs="+", help="H:N pairs, e.g. 14:2")
    parser.add_argument("--attn-head-dim", type=int)
    parser.add_argument("--attn-block-q", type=int)
    parser.add_argument("--attn-block-k", type=int)
    args = parser.parse_args()
    defaults = SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("logprob_block_v", "logprob_block_n"):
        setattr(args, key, [None if b == "default" else int(b) for b in getattr(args, key)])
    return args


def plan(args):
    """(entry, build) pairs, cheap cases first: logprob at the smallest N, the attention
    layouts, then larger N and the extra logprob tiles."""
    backend = jax.default_backend()
    logprob_impls = list(IMPLS)
    if backend == "gpu" and args.logprob_triton:
        logprob_impls.insert(1, "pallas_triton")
    d, v = args.logprob_dim, args.logprob_vocab

    def logprob_cases(n, block_v, block_n):
        for dtype in args.dtype:
            tiles = f"bv={block_v or 'default'} bn={block_n or 'default'}"
            entry = {
                "kernel": "logprob",
                "name": f"logprob N={n} {dtype} {tiles}",
                "dtype": dtype,
                "n": n,
                "d": d,
                "v": v,
                "block_v": block_v,
                "block_n": block_n,
                "library_default_block_v": logprob.DEFAULT_BLOCK_V,
                "library_default_block_n": logprob.DEFAULT_BLOCK_N,
                "return_entropy": args.logprob_entropy,
                "useful_flops": {"forward": 2 * n * d * v, "forward_backward": 6 * n * d * v},
                "tolerance": TOLERANCE.get(dtype, 5e-2),
            }

            def build(n=n, dtype=dtype, block_v=block_v, block_n=block_n):
                return logprob_case(
                    n, d, v, jnp.dtype(dtype), block_n, block_v, args.logprob_entropy, args.seed
                )

            yield entry, build, logprob_impls

    def attention_cases():
        seg = segment_ids(
            args.attn_batch, args.attn_prompt, args.attn_completions, args.attn_completion_len
        )
        layout = {
            "batch": args.attn_batch,
            "prompt": args.attn_prompt,
            "completions": args.attn_completions,
            "completion_len": args.attn_completion_len,
            "length": int(seg.shape[1]),
            "built_by": "medjax.packing.pack_groups",
        }
        try:
            layout["blocks"] = layout_blocks(seg, args.attn_block_q, args.attn_block_k)
        except Exception as exc:
            layout["blocks_error"] = error_record("count_visited_blocks", exc)
        for heads_spec in args.attn_heads:
            heads, kv_heads = (int(x) for x in heads_spec.split(":"))
            for dtype in args.dtype:
                entry = {
                    "kernel": "prefix_attention",
                    "name": f"attention B={args.attn_batch} L={seg.shape[1]} H={heads}"
                    f" N={kv_heads} K={args.attn_head_dim} {dtype}",
                    "dtype": dtype,
                    "layout": layout,
                    "heads": heads,
                    "kv_heads": kv_heads,
                    "head_dim": args.attn_head_dim,
                    "block_q": args.attn_block_q,
                    "block_k": args.attn_block_k,
                    "tolerance": TOLERANCE.get(dtype, 5e-2),
                }

                def build(heads=heads, kv_heads=kv_heads, dtype=dtype):
                    return attention_case(
                        seg,
                        heads,
                        kv_heads,
                        args.attn_head_dim,
                        args.attn_block_q,
                        args.attn_block_k,
                        jnp.dtype(dtype),
                        args.seed,
                    )

                yield entry, build, list(IMPLS)

    sizes = sorted(args.logprob_sizes)
    tiles = [(bv, bn) for bv in args.logprob_block_v for bn in args.logprob_block_n]
    if "logprob" in args.kernels:
        yield from logprob_cases(sizes[0], *tiles[0])
    if "attention" in args.kernels:
        yield from attention_cases()
    if "logprob" in args.kernels:
        for n in sizes[1:]:
            yield from logprob_cases(n, *tiles[0])
        for tile in tiles[1:]:
            for n in sizes:
                yield from logprob_cases(n, *tile)


def table(cases) -> str:
    header = (
        f"{'case':50s} {'impl':14s} {'status':8s} {'fwd ms':>9s} {'f+b ms':>9s}"
        f" {'comp s':>7s} {'out err':>9s} {'grad err':>9s} check"
    )
    lines = [header, "-" * len(header)]
    for entry in cases:
        if "skipped" in entry or "error" in entry:
            why = entry.get("skipped") or entry["error"]["type"]
            lines.append(f"{entry['name'][:50]:50s} {'-':14s} {why}")
            continue
        for impl, r in entry["impls"].items():

            def ms(mode, r=r):
                return f"{1e3 * r[mode]['median_seconds']:9.2f}" if mode in r else f"{'-':>9s}"

            comp = sum(r.get("compile_seconds", {}).values())
            c = r.get("check")
            out_err = f"{c['max_out_rel_err']:9.1e}" if c else f"{'-':>9s}"
            grad_err = f"{c['max_grad_rel_err']:9.1e}" if c else f"{'-':>9s}"
            verdict = ("ok" if c["ok"] else "WRONG") if c else ""
            if r["status"] == "error":
                verdict = f"{r['error']['stage']}: {r['error']['type'].rsplit('.', 1)[-1]}"
            lines.append(
                f"{entry['name'][:50]:50s} {impl:14s} {r['status']:8s} {ms('forward')}"
                f" {ms('forward_backward')} {comp:7.1f} {out_err} {grad_err} {verdict}"
            )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    header = {
        "benchmark": (
            "Pallas kernels (fused_logprob, grouped_attention): pallas vs xla vs reference,"
            " checked against a float32 'highest'-precision reference, forward and"
            " forward+backward"
        ),
        **provenance(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "modes": list(MODES),
        "check_note": (
            "rel_err = ||got - want|| / ||want||, want = impl 'reference' on float32 inputs at"
            " 'highest' matmul precision; ok = every value finite and every rel_err <="
            " tolerance. outputs: of the forward function; gradients: of sum(weights * outputs)."
        ),
        "timing_note": (
            "jitted and compiled ahead of time (compile_seconds), first call excluded"
            " (first_call_seconds), then --reps calls each with block_until_ready, impls"
            " alternating rep by rep; speedup_vs_<peer> = median(peer) / median(impl)."
        ),
    }
    rec = Recorder(args.out, header)
    m = header["machine"]
    log(f"backend {m.get('jax_backend')} devices {m.get('device_kinds')} jax {jax.__version__}")
    rec.save("planning")
    for entry, build, impls in plan(args):
        entry["impls"] = {}
        rec.result["cases"].append(entry)
        try:
            run_case(rec, entry, build, impls, args.reps, args.time_budget)
        except Exception as exc:  # A bug outside the per-impl guards: keep going.
            entry["error"] = error_record("case", exc)
            print_error(entry["name"], entry["error"])
        rec.save(None)
    rec.save(None)
    print("\n" + table(rec.result["cases"]), flush=True)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
