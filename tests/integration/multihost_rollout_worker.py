"""One process of tests/integration/test_multihost_rollouts.py: `python
tests/integration/multihost_rollout_worker.py PROCESS_ID PORT OUT_JSON` (2 CPU devices a
process, 2 processes). A tiny model on the mesh (data 1, fsdp 2, tensor 2), whose fsdp axis
crosses the processes, is copied onto each process's devices (`multihost.local_copy`); each
process samples its share of 4 prompts on its copy and the rows are gathered. Process 0
writes what the test checks."""

import json
import pathlib
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flax import nnx  # noqa: E402

from medjax import multihost, partitioning  # noqa: E402
from medjax.llm import JaxPolicyBackend  # noqa: E402
from tests.integration import multihost_rollout_case as case  # noqa: E402


def main(process_id: int, port: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=120
    )
    model, tok = case.tiny()
    partitioning.shard_module(model, partitioning.make_mesh(1, 2, 2))
    local = multihost.local_copy(model)
    placed, equal = [], []
    for (_, whole), (_, mine) in zip(
        jax.tree.leaves_with_path(nnx.state(model)), jax.tree.leaves_with_path(nnx.state(local)),
        strict=True,
    ):  # fmt: skip
        placed.append(
            mine.is_fully_addressable and {d.process_index for d in mine.devices()} == {process_id}
        )
        equal.append(bool((multihost.host_array(whole) == multihost.host_array(mine)).all()))
    share = multihost.share(len(case.PROMPTS))
    gens = JaxPolicyBackend(local, tok, seed=case.SEED).generate_ids(
        case.PROMPTS[share], case.PARAMS, num_samples=2, streams=case.STREAMS[share]
    )
    rows = multihost.gather_json(
        [{"process": process_id, "tokens": g.token_ids, "logps": g.logps} for g in gens]
    )
    if process_id == 0:
        report = {
            "rows": rows, "placed": all(placed), "equal": all(equal), "leaves": len(placed),
            "spans": any(not x.is_fully_addressable for x in jax.tree.leaves(nnx.state(model))),
        }  # fmt: skip
        pathlib.Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
