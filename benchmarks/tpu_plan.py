"""Before you rent a TPU: per-chip HBM, FLOPs and compile time of GRPO's programs for
Qwen2.5-1.5B, Qwen2.5-7B and Llama-3.1-8B (their gin/models shapes) on v5e-8 and v5p-8, from
the TPU compiler (libtpu, ahead of time on this CPU host: `medjax.training.aot`).

    python benchmarks/tpu_plan.py     # -> benchmarks/results/tpu_plan.json (appends as it goes)
    python benchmarks/tpu_plan.py --table   # the README's table from that file

The workload: GRPO on 8 prompts x G=8, prompt 1,024 + completion 1,024 tokens: the update
step on the 64 episodes in 8 microbatches of 8, and the sampler's call (64 rows, a 1,024-token
prompt, 1,024 new tokens; its KV cache at 2,048). Every setup: layers under scan, bf16
parameters and activations with a float32 master copy in the optimizer and bf16 Adam moments
(`optim.make_optimizer(master_dtype="float32", moments_dtype="bfloat16")`), the platform's
attention kernel (splash attention on TPU), FSDP over every chip; each names its remat
policy and LoRA rank (none: full fine-tuning). Three more compile an update step alone: the
first setup's with the layers unrolled, for the compile time scan saves, and two with less
recompute (remat save_dots) where memory may allow it.

No peer runs here: the compiler's verdict is the measurement. The lower bound on a step's
time is its model FLOPs plus remat's recompute over the chip's bf16 peak (`aot.model_flops`,
`aot.remat_flops`).
"""

import argparse
import dataclasses
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
PROMPTS, G, PROMPT, COMPLETION, MICROBATCHES = 8, 8, 1024, 1024, 8


@dataclasses.dataclass(frozen=True)
class Setup:
    model: str
    topology: str
    remat: str
    lora_rank: int | None = None  # None: full fine-tuning.
    scan: bool = True
    update_only: bool = False

    @property
    def name(self) -> str:
        tuning = "full fine-tuning" if self.lora_rank is None else f"LoRA rank {self.lora_rank}"
        layers = "scan" if self.scan else "unrolled"
        only = "; the update step only" if self.update_only else ""
        return (
            f"{tuning}; {layers}, remat {self.remat}, bf16 + f32 master, bf16 moments,"
            f" {MICROBATCHES} microbatches{only}"
        )


SETUPS = (
    Setup("Qwen2.5-1.5B", "v5e-8", remat="full"),
    Setup("Qwen2.5-7B", "v5e-8", remat="full", lora_rank=16),
    Setup("Llama-3.1-8B", "v5e-8", remat="full", lora_rank=16),
    Setup("Qwen2.5-7B", "v5p-8", remat="save_dots"),
    Setup("Llama-3.1-8B", "v5p-8", remat="save_dots"),
    Setup("Qwen2.5-1.5B", "v5e-8", remat="full", scan=False, update_only=True),
    # Less recompute where memory allows (the sampler does not change with remat).
    Setup("Qwen2.5-1.5B", "v5e-8", remat="save_dots", update_only=True),
    Setup("Qwen2.5-7B", "v5e-8", remat="save_dots", lora_rank=16, update_only=True),
)


def model_config(setup: Setup) -> config_lib.ModelConfig:
    with gin.unlock_config():
        gin.clear_config()
    gin.parse_config_file(str(ROOT / MODELS[setup.model]))
    config = gin.get_configurable(config_lib.ModelConfig)()
    lora = None if setup.lora_rank is None else config_lib.LoraConfig(rank=setup.lora_rank)
    return config.replace(
        dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=setup.scan,
        remat=setup.remat, lora=lora,
    )  # fmt: skip


def programs(plan: aot.Plan, setup: Setup) -> list[aot.Program]:
    tx = optim.make_optimizer(
        learning_rate=1e-6, total_steps=100, master_dtype="float32", moments_dtype="bfloat16"
    )
    rows, width = PROMPTS * G, PROMPT + COMPLETION
    fields = aot._tokens(rows, width)
    fields["advantages"] = ((rows,), jnp.float32)
    update = plan.train_step(
        "grpo: update step", tx, steps.policy_loss_fn(losses.grpo_loss), rows, width,
        MICROBATCHES, fields,
    )  # fmt: skip
    if setup.update_only:
        return [update]
    params = sampling.SamplingParams(max_new_tokens=COMPLETION, temperature=1.0)
    return [update, plan.sampler("grpo: sampler", rows, PROMPT, params)]


def _gib(n) -> str:
    return f"{n / 2**30:.1f}"


def table(record: dict) -> str:
    """Markdown rows: one per setup, its programs' needs and compile times listed, their
    FLOPs summed."""
    lines = [
        "| model | slice | settings | needs a chip (GiB) | HBM a chip (GiB) | fits"
        " | TFLOPs a step: model + remat | step at peak (s) | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for r in record["results"]:
        groups.setdefault((r["model"], r["topology"], r["settings"]), []).append(r)
    for (model, slice_, settings), rows in groups.items():
        need, compile_s = [], []
        for r in rows:
            name = r["program"].split(": ", 1)[1]
            if r["total_bytes"] is not None:
                need.append(f"{name} {_gib(r['total_bytes'])}")
            elif r["temp_bytes"] is not None:
                need.append(f"{name} >{_gib(r['temp_bytes'])} (temporaries)")
            else:
                need.append(f"{name}: the compiler crashed")
            compile_s.append(f"{name} {r['compile_s']:.0f}" if r.get("compile_s") else "-")
        hbm = next((r["hbm_bytes"] for r in rows if r.get("hbm_bytes")), None)
        model_flops = sum(r["model_flops"] * r["chips"] for r in rows)
        remat = sum((r.get("remat_flops") or 0) * r["chips"] for r in rows)
        seconds = sum(r["seconds_at_peak"] for r in rows)
        fits = "yes" if all(r["fits"] for r in rows) else "no"
        lines.append(
            f"| {model} | {slice_} | {settings} | {'; '.join(need)}"
            f" | {'-' if hbm is None else f'{hbm / 2**30:.2f}'} | {fits}"
            f" | {model_flops / 1e12:,.0f} + {remat / 1e12:,.0f} | {seconds:.2f}"
            f" | {'; '.join(compile_s)} |"
        )
    return "\n".join(lines)


def compile_one(index: int, program_index: int, out: str) -> None:
    """Compiles program `program_index` of setup `index`; its row to `out`."""
    setup = SETUPS[index]
    config = model_config(setup)
    topology = topologies.resolve(setup.topology)
    devices = topologies.devices(topology)
    mesh = partitioning.make_mesh(1, -1, 1, devices=devices)
    plan = aot.Plan(config, mesh, *aot.abstract_model(config, mesh))
    program = programs(plan, setup)[program_index]
    hbm = topologies.available_hbm(devices[0])
    result = aot.compile_program(program, hbm, topology.chips, topology.peak_flops)
    pathlib.Path(out).write_text(json.dumps(_row(setup, topology.chips, vars(result))))


def _row(setup: Setup, chips: int, result: dict) -> dict:
    return {"model": setup.model, "topology": setup.topology, "settings": setup.name,
            "chips": chips, **result}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--setups", nargs="*", type=int, default=list(range(len(SETUPS))),
                        help="indices into SETUPS")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="print the README table")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # setup program out
    args = parser.parse_args()
    if args.one:
        setup, program, out = args.one
        compile_one(int(setup), int(program), out)
        return
    out = pathlib.Path(args.out)
    if args.table:
        print(table(json.loads(out.read_text())))
        return
    record = json.loads(out.read_text()) if out.exists() else {}
    record.update(machine=machine(), versions=versions(), workloads=__doc__.split("\n\n")[2])
    # Rows of setups no longer listed (other settings) go.
    current = {(s.model, s.topology, s.name) for s in SETUPS}
    record["results"] = [
        r for r in record.get("results", [])
        if (r["model"], r["topology"], r.get("settings")) in current
    ]  # fmt: skip
    done = {(r["model"], r["topology"], r["settings"], r["program"]) for r in record["results"]}
    for index in args.setups:
        setup = SETUPS[index]
        topology = topologies.resolve(setup.topology)
        # The programs' names, shapes and FLOPs, without a compile.
        config = model_config(setup)
        mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        listed = programs(aot.Plan(config, mesh, *aot.abstract_model(config, mesh)), setup)
        for program_index, program in enumerate(listed):
            if (setup.model, setup.topology, setup.name, program.name) in done:
                continue
            start = time.perf_counter()
            # Each compile in its own process: libtpu can crash (a signal) on a program.
            with tempfile.TemporaryDirectory() as tmp:
                path = pathlib.Path(tmp) / "row.json"
                code = subprocess.run(
                    [sys.executable, __file__, "--one", str(index), str(program_index), str(path)]
                ).returncode
                if path.exists():
                    row = json.loads(path.read_text())
                else:
                    row = _row(setup, topology.chips, {
                        "program": program.name, "shape": program.shape, "fits": False,
                        "total_bytes": None, "temp_bytes": None,
                        **program.per_chip(topology.chips, topology.peak_flops),
                        "error": f"the TPU compiler crashed on it (exit {code})",
                    })  # fmt: skip
            print(f"{setup.model} {setup.topology} [{setup.name}] {program.name}:"
                  f" fits={row['fits']} {row.get('error') or ''}"
                  f" ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
            record["results"].append(row)
            out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
