"""Before you rent a TPU: per-chip HBM and FLOPs of SFT and GRPO programs for Qwen2.5-1.5B,
Qwen2.5-7B and Llama-3.1-8B (their gin/models shapes) on v5e-8, v5p-8 and v6e-8, from the
TPU compiler (libtpu, ahead of time on this CPU host: `medjax.training.aot`).

    python benchmarks/tpu_plan.py     # -> benchmarks/results/tpu_plan.json (appends as it goes)
    python benchmarks/tpu_plan.py --table   # the README's table from that file

The workloads, bf16 parameters and activations (the optimizer's moments follow them),
FSDP over every chip of the slice:
- SFT: the train step on 8 chats of 2,048 tokens.
- GRPO: 8 prompts x G=8, prompt 1,024 + completion 1,024 tokens: the update step on the 64
  episodes in 8 microbatches of 8, and the sampler's call (64 rows, a 1,024-token prompt,
  1,024 new tokens; its KV cache at 2,048).

No peer runs here: the compiler's verdict is the measurement. The lower bound on a step's
time is its model FLOPs over the chip's bf16 peak (`aot.model_flops`).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import gin
import jax
import jax.numpy as jnp
from common import machine, versions

from medjax import losses, partitioning, sampling, topologies
from medjax.models import config as config_lib
from medjax.training import aot, optim, steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = pathlib.Path(__file__).parent / "results" / "tpu_plan.json"
MODELS = {
    "Qwen2.5-1.5B": "gin/models/qwen2_5_1_5b.gin",
    "Qwen2.5-7B": "gin/models/qwen2_5_7b.gin",
    "Llama-3.1-8B": "gin/models/llama3_1_8b.gin",
}
TOPOLOGIES = ("v5e-8", "v5p-8", "v6e-8")
SFT_ROWS, PROMPTS, G, PROMPT, COMPLETION, MICROBATCHES = 8, 8, 8, 1024, 1024, 8


def model_config(path: str) -> config_lib.ModelConfig:
    with gin.unlock_config():
        gin.clear_config()
    gin.parse_config_file(str(ROOT / path))
    config = gin.get_configurable(config_lib.ModelConfig)()
    return config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def programs(plan: aot.Plan) -> dict[str, list[aot.Program]]:
    tx = optim.make_optimizer(learning_rate=1e-6, total_steps=100)
    width = PROMPT + COMPLETION
    sft = plan.train_step(
        "sft: train step", tx, steps.sft_loss_fn, SFT_ROWS, width, 1,
        aot._tokens(SFT_ROWS, width),
    )  # fmt: skip
    rows = PROMPTS * G
    fields = aot._tokens(rows, width)
    fields["advantages"] = ((rows,), jnp.float32)
    update = plan.train_step(
        "grpo: update step", tx, steps.policy_loss_fn(losses.grpo_loss), rows, width,
        MICROBATCHES, fields,
    )  # fmt: skip
    params = sampling.SamplingParams(max_new_tokens=COMPLETION, temperature=1.0)
    sampler = plan.sampler("grpo: sampler", rows, PROMPT, params)
    return {"sft": [sft], "grpo": [update, sampler]}


def _gib(n) -> str:
    return f"{n / 2**30:.1f}"


def table(record: dict) -> str:
    """Markdown rows: one per (model, slice, workload), slice by slice; a workload of
    several programs lists each one's need and sums their FLOPs."""
    lines = [
        "| model | slice | workload | needs a chip (GiB) | HBM a chip (GiB) | fits"
        " | model TFLOPs a step | step at peak (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for r in record["results"]:
        groups.setdefault((r["model"], r["topology"], r["workload"]), []).append(r)
    order = lambda key: (TOPOLOGIES.index(key[1]), list(MODELS).index(key[0]), key[2] != "sft")  # noqa: E731
    for key in sorted(groups, key=order):
        model, slice_, workload = key
        rows = groups[key]
        need = []
        for r in rows:
            name = r["program"].split(": ", 1)[1]
            if r["total_bytes"] is not None:
                need.append(f"{name} {_gib(r['total_bytes'])}")
            elif r["temp_bytes"] is not None:
                need.append(f"{name} >{_gib(r['temp_bytes'])} (temporaries)")
            else:
                need.append(f"{name}: the compiler crashed")
        hbm = next((r["hbm_bytes"] for r in rows if r.get("hbm_bytes")), None)
        flops = sum(r["model_flops"] * r["chips"] for r in rows)
        seconds = sum(r["seconds_at_peak"] for r in rows)
        fits = "yes" if all(r["fits"] for r in rows) else "no"
        lines.append(
            f"| {model} | {slice_} | {workload} | {'; '.join(need)}"
            f" | {'-' if hbm is None else f'{hbm / 2**30:.2f}'} | {fits} | {flops / 1e12:,.0f}"
            f" | {seconds:.2f} |"
        )
    return "\n".join(lines)


def compile_one(model: str, topo_name: str, index: int, out: str) -> None:
    """Compiles program `index` of the model's workloads on the slice; its Result to `out`."""
    config = model_config(MODELS[model])
    topology = topologies.resolve(topo_name)
    devices = topologies.devices(topology)
    mesh = partitioning.make_mesh(1, -1, 1, devices=devices)
    plan = aot.Plan(config, mesh, *aot.abstract_model(config, mesh))
    workload, program = _flat(plan)[index]
    hbm = topologies.available_hbm(devices[0])
    result = aot.compile_program(program, hbm, topology.chips, topology.peak_flops)
    row = {"model": model, "topology": topo_name, "workload": workload,
           "chips": topology.chips, **vars(result)}  # fmt: skip
    pathlib.Path(out).write_text(json.dumps(row))


def _flat(plan) -> list[tuple[str, aot.Program]]:
    return [(w, p) for w, todo in programs(plan).items() for p in todo]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    parser.add_argument("--table", action="store_true", help="print the README table")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # model slice index out
    args = parser.parse_args()
    if args.one:
        model, topo_name, index, out = args.one
        compile_one(model, topo_name, int(index), out)
        return
    out = pathlib.Path(args.out)
    if args.table:
        print(table(json.loads(out.read_text())))
        return
    record = json.loads(out.read_text()) if out.exists() else {}
    record.update(machine=machine(), versions=versions(), workloads=__doc__.split("\n\n")[2])
    record.setdefault("results", [])
    done = {(r["model"], r["topology"], r["program"]) for r in record["results"]}
    # Slice by slice (v5e-8, the most rented, first), every model on each.
    listed = {m: _flat(_cpu_plan(model_config(MODELS[m]))) for m in args.models}
    for topo_name in args.topologies:
        chips = topologies.resolve(topo_name).chips
        peak = topologies.resolve(topo_name).peak_flops
        for model in args.models:
            # The programs' names, shapes and FLOPs, without a compile.
            for index, (workload, program) in enumerate(listed[model]):
                name = program.name
                if (model, topo_name, name) in done:
                    continue
                start = time.perf_counter()
                # Each compile in its own process: libtpu can crash (a signal) on a program.
                with tempfile.TemporaryDirectory() as tmp:
                    path = pathlib.Path(tmp) / "row.json"
                    code = subprocess.run(
                        [sys.executable, __file__, "--one", model, topo_name, str(index),
                         str(path)],
                    ).returncode  # fmt: skip
                    if path.exists():
                        row = json.loads(path.read_text())
                    else:
                        row = {
                            "model": model, "topology": topo_name, "workload": workload,
                            "chips": chips, "program": name, "shape": program.shape,
                            "fits": False, "total_bytes": None, "temp_bytes": None,
                            "model_flops": program.flops / chips,
                            "seconds_at_peak": program.flops / chips / peak,
                            "error": f"the TPU compiler crashed on it (exit {code})",
                        }  # fmt: skip
                print(f"{model} {topo_name} {name}: fits={row['fits']} {row.get('error') or ''}"
                      f" ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
                record["results"].append(row)
                out.write_text(json.dumps(record, indent=1) + "\n")


def _cpu_plan(config) -> aot.Plan:
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return aot.Plan(config, mesh, *aot.abstract_model(config, mesh))


if __name__ == "__main__":
    main()
