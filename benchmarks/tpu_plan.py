"""Before you rent a TPU: per-chip HBM and FLOPs of SFT and GRPO programs for Qwen2.5-1.5B,
Qwen2.5-7B and Llama-3.1-8B (their gin/models shapes) on v5e-8, v5p-8 and v6e-8, from the
TPU compiler (libtpu, ahead of time on this CPU host: `medjax.training.aot`).

    python benchmarks/tpu_plan.py     # -> benchmarks/results/tpu_plan.json (appends as it goes)

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
import time

import gin
import jax.numpy as jnp
from common import machine, versions

from medjax import partitioning, sampling, topologies
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
    from medjax import losses

    update = plan.train_step(
        "grpo: update step", tx, steps.policy_loss_fn(losses.grpo_loss), rows, width,
        MICROBATCHES, fields,
    )  # fmt: skip
    params = sampling.SamplingParams(max_new_tokens=COMPLETION, temperature=1.0)
    sampler = plan.sampler("grpo: sampler", rows, PROMPT, params)
    return {"sft": [sft], "grpo": [update, sampler]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    record.update(machine=machine(), versions=versions(), workloads=__doc__.split("\n\n")[2])
    record.setdefault("results", [])
    done = {(r["model"], r["topology"], r["program"]) for r in record["results"]}
    for name in args.models:
        config = model_config(MODELS[name])
        for topo_name in args.topologies:
            topology = topologies.resolve(topo_name)
            devices = topologies.devices(topology)
            mesh = partitioning.make_mesh(1, -1, 1, devices=devices)
            hbm = topologies.available_hbm(devices[0])
            graphdef, params = aot.abstract_model(config, mesh)
            plan = aot.Plan(config, mesh, graphdef, params)
            for workload, todo in programs(plan).items():
                for program in todo:
                    if (name, topo_name, program.name) in done:
                        continue
                    start = time.perf_counter()
                    result = aot.compile_program(
                        program, hbm, topology.chips, topology.peak_flops
                    )
                    print(
                        f"{name} {topo_name} {program.name}: fits={result.fits}"
                        f" total={result.total_bytes} temp={result.temp_bytes}"
                        f" ({time.perf_counter() - start:.0f} s)",
                        flush=True,
                    )
                    row = {"model": name, "topology": topo_name, "workload": workload,
                           "chips": topology.chips, **vars(result)}  # fmt: skip
                    record["results"].append(row)
                    out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
