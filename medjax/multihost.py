"""Arrays and decisions of a run over several processes (`jax.distributed`).

One process per host, one global mesh over every chip: each process holds only the shards of
its own devices. What the trainer reads back on the host (scores, sampled tokens, the
parameters it exports) may therefore span hosts, and every process must take part in reading
it (a collective). Every decision that chooses which programs run next (resume, a finished
stage, an evaluation point already written) is process 0's, broadcast: two processes that
decided differently would each wait forever in a collective the other never runs.

How a run is spread: the trainer's programs (scoring, updates) run over the global mesh;
rollouts do not. Each RL step, every process takes a copy of the policy onto its own chips
(`local_copy`, sharded over them as the global mesh shards it within a host) and runs the
episodes of its own share of the step's questions (`share`: a contiguous block, so every
group of G episodes of a question stays on one process) with no collective at all: its
sampler calls, tools and agent loop are its own. The trajectories are then gathered
(`gather_json`, in process order, so the step's episodes are in the order one process would
have them), and every process computes the same rewards and group advantages from whole
groups, builds the same rows and feeds its own devices' shards of them (`put_global`). A
row's samples depend only on its episode's stream (`medjax.agents.Query.stream`), not on
the rows it was batched with, so the metrics equal one process's with as many devices.

On one process every function here is the plain single-process operation.
"""

import json

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding


def host_array(x) -> np.ndarray:
    """`x` as a numpy array on this host, whatever devices hold it.

    An array that spans other processes' devices is gathered (every process must call this,
    in the same order, with the same arrays); anything else is read where it is.

    Args:
      x: a jax.Array (any sharding) or anything np.asarray takes.

    Returns:
      The whole array, of x's shape and dtype.
    """
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def put_global(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array laid out by `sharding` from `value`, the whole array, which every
    process holds identically: each process places only its own devices' shards, whichever
    rows they are (a v5e-16 host holds rows 0-7 and 16-23 of 64, not one block).

    Unlike `jax.device_put` of a host array onto a sharding spanning processes, this runs
    no cross-process equality check (an all-gather of the whole batch on every call).
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def agree(decision: bool) -> bool:
    """Process 0's `decision`, on every process (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return bool(decision)
    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(decision))))


def barrier(name: str) -> None:
    """Waits until every process reaches `barrier(name)` (nothing on one process): what
    process 0 wrote before it is there for the others to read after it."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def share(count: int) -> slice:
    """This process's block of `count` items (blocks differ by at most one item, in
    process order)."""
    n, p = jax.process_count(), jax.process_index()
    return slice(p * count // n, (p + 1) * count // n)


def gather_json(items: list) -> list:
    """Every process's `items` (JSON values), concatenated in process order, on every
    process (a collective). JSON, not pickle: nothing a peer sends is run."""
    if jax.process_count() == 1:
        return list(items)
    data = np.frombuffer(json.dumps(items, allow_nan=False).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int64(data.size))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    every = multihost_utils.process_allgather(padded)
    out = []
    for row, size in zip(every, sizes, strict=True):
        out.extend(json.loads(row[: int(size)].tobytes()))
    return out


def process_meshes(mesh: Mesh, owner: np.ndarray, me: int) -> tuple[Mesh, Mesh]:
    """(process `me`'s devices as a mesh of `mesh`'s axes, every process's such block
    stacked along a leading "process" axis); `owner`: the process of each of mesh.devices.

    A process's block is the devices at the indices it holds along each axis, in mesh order
    (a ring order may interleave hosts along an axis: v5p's (1, 8, 1) puts host 0 at fsdp
    0, 1, 4, 5); its devices must be all of them (no process holds a checkerboard).
    """
    blocks = []
    for p in range(int(owner.max()) + 1):
        where = np.nonzero(owner == p)
        block = mesh.devices[np.ix_(*(np.unique(i) for i in where))]
        if block.size != where[0].size:
            raise ValueError(
                f"multihost: process {p}'s devices do not form one block of the mesh"
                f" {dict(mesh.shape)}; rollouts need each host's chips together."
            )
        blocks.append(block)
    if len({b.shape for b in blocks}) != 1:
        raise ValueError(
            f"multihost: the processes hold blocks of different shapes of the mesh"
            f" {dict(mesh.shape)}: {[b.shape for b in blocks]}."
        )
    types = mesh.axis_types
    stacked = Mesh(np.stack(blocks), ("process", *mesh.axis_names), axis_types=(types[0], *types))
    return Mesh(blocks[me], mesh.axis_names, axis_types=types), stacked


def local_copy(model: nnx.Module) -> nnx.Module:
    """`model` with its arrays on this process's devices only: the whole of each array,
    sharded over them as the global mesh shards it within a host (a collective: every
    process calls it). On one process, `model` itself.

    One all-gather across hosts per array, on the chips: each process's block of the mesh
    receives a full copy, and its shards become an array of its own devices (no host copy).
    """
    if jax.process_count() == 1:
        return model
    graphdef, state = nnx.split(model)
    meshes = {}

    def copy(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        sharding = x.sharding
        if not isinstance(sharding, NamedSharding):
            raise ValueError(f"multihost.local_copy: an array on {sharding}, not a mesh.")
        if sharding.mesh not in meshes:
            owner = np.vectorize(lambda d: d.process_index)(sharding.mesh.devices)
            meshes[sharding.mesh] = process_meshes(sharding.mesh, owner, jax.process_index())
        local, stacked = meshes[sharding.mesh]
        whole = jax.device_put(x, NamedSharding(stacked, sharding.spec))
        return jax.make_array_from_single_device_arrays(
            x.shape, NamedSharding(local, sharding.spec), [s.data for s in whole.addressable_shards]
        )

    return nnx.merge(graphdef, jax.tree.map(copy, state))
