"""Device meshes, logical axis rules and sharding helpers.

Model code names only logical axes (the fixed vocabulary below); a rules table maps each to
mesh axes. One table serves data parallel, FSDP, tensor parallel and FSDP+TP: a mesh axis of
size 1 shards nothing, so the mesh shape alone picks the strategy:

    make_mesh(data=8)                 data parallel
    make_mesh(data=1, fsdp=8)         FSDP (parameters and optimizer state sharded on embed)
    make_mesh(data=1, tensor=8)       tensor parallel (heads, mlp and vocab split)
    make_mesh(data=2, fsdp=2, tensor=2)  all three
"""

import contextlib
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = (
    "batch",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "vocab",
    "layers",
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; -1 takes what the others leave.

    Axis types are Auto (GSPMD): with Explicit axes, this Flax version's embedding lookup
    cannot resolve its output sharding.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"make_mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}."
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"make_mesh: {len(devices)} devices do not divide into fsdp * tensor = {known}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        total = int(np.prod(sizes))
        raise ValueError(f"make_mesh: data * fsdp * tensor = {total}, but {len(devices)} devices.")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> P:
    """PartitionSpec for an array whose dimensions have these logical names."""
    table = dict(rules)
    spec = []
    for name in axes:
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}.")
        spec.append(None if name is None else table[name])
    return P(*spec)


def sharding_for(
    shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> NamedSharding:
    """NamedSharding of one array; a dimension its mesh axes do not divide is replicated."""
    spec = logical_to_spec(axes, rules)
    fitted = []
    for dim, entry in zip(shape, spec, strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if size > 1 and dim % size:
            logging.info(
                "replicating a dimension of %d: mesh axes %s (%d) do not divide it",
                dim,
                names,
                size,
            )
            entry = None
        fitted.append(entry)
    return NamedSharding(mesh, P(*fitted))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for an nnx.State whose Variables carry `logical_axes` metadata.

    Variables without that metadata (e.g. RNG counters) are replicated.
    """

    def one(v):
        axes = v.get_metadata().get("logical_axes")
        shape = v.shape
        return (
            sharding_for(shape, axes, mesh, rules) if axes is not None else NamedSharding(mesh, P())
        )

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Places a module's variables on the mesh by their logical axes (in place; returns it)."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))
    return module


def optimizer_shardings(tx, params, mesh: Mesh):
    """Where `tx.init(params)` belongs on the mesh: each per-parameter leaf (a moment, a
    master copy) sharded like its parameter, the rest (step counts) replicated.

    Named explicitly: the compiler does not carry a parameter's sharding into
    `zeros_like(parameter)`, which depends on no value of it, and would replicate every
    moment on every device."""
    shapes = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, P())
    # Always a NamedSharding on the mesh, also on a 1-device mesh: a jitted step's outputs
    # carry the mesh, and inputs without it would compile the step a second time.
    like = jax.tree.map(lambda x: x.sharding if on_mesh(x.sharding, mesh) else replicated, params)
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, shapes, like, transform_non_params=lambda _: replicated
    )


def init_optimizer_state(tx, params, mesh: Mesh):
    """`tx.init(params)` placed by `optimizer_shardings`."""
    return jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))(params)


def mesh_of(tree) -> Mesh | None:
    """The mesh of the first NamedSharding in `tree` (of arrays or of shardings); None when
    nothing in it is on a mesh."""
    for leaf in jax.tree.leaves(tree):
        sharding = leaf if isinstance(leaf, NamedSharding) else getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def on_mesh(sharding, mesh: Mesh) -> bool:
    """Whether `sharding` is a NamedSharding on a mesh of `mesh`'s shape (what
    `init_optimizer_state` keeps; anything else it replicates)."""
    return isinstance(sharding, NamedSharding) and sharding.mesh.shape == mesh.shape


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [batch, ...] input: batch over its mesh axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def constrain_batch(x: jax.Array, rules: Rules = DEFAULT_RULES, axis: int = 0) -> jax.Array:
    """x [batch, ...] pinned to its batch dim (`axis`: [L, batch, ...] for a KV cache) over
    the batch's mesh axes, the rest whole, when traced under a mesh (`jax.set_mesh`,
    `jax.sharding.use_abstract_mesh`); x as it is without one.

    The model pins its residual stream so: left to itself, the compiler follows the
    FSDP-sharded weights (embed over fsdp) and has every device compute every row."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    axes = [None] * x.ndim
    axes[axis] = "batch"
    return jax.lax.with_sharding_constraint(x, logical_to_spec(tuple(axes), rules))


def activations_on(mesh: Mesh | None):
    """Context for tracing a model on `mesh`: its `constrain_batch` calls then spread rows
    over the mesh's batch axes (nothing without a mesh)."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def microbatch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of [microbatches, batch, ...] arrays: each microbatch's rows over the batch's
    mesh axes."""
    return NamedSharding(mesh, logical_to_spec((None, "batch") + (None,) * (ndim - 2), rules))


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: int | None = None,
    init_timeout: int | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` for a multi-host run; does nothing on one host.

    Arguments come from the caller (flags) or else from the environment: JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID. On Cloud TPU pods jax finds them itself, so
    MEDJAX_DISTRIBUTED=1 alone asks for the call.

    Args:
      coordinator_address, num_processes, process_id: as `jax.distributed.initialize`.
      heartbeat_timeout: seconds without a heartbeat after which a process counts as lost
        and the others abort (None: jax's default, 100 s).
      init_timeout: seconds to wait for every process to join (None: jax's, 300 s).

    Returns:
      Whether jax.distributed was initialised.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address is None and env.get("MEDJAX_DISTRIBUTED") != "1":
        return False
    if num_processes == 1:
        return False
    timeouts = {}
    if heartbeat_timeout is not None:
        timeouts["heartbeat_timeout_seconds"] = int(heartbeat_timeout)
    if init_timeout is not None:
        timeouts["initialization_timeout"] = int(init_timeout)
    # Collectives between processes on CPU (the local two-process run) go over gloo: jax
    # 0.10's default, named so that a changed default cannot leave them without one.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, **timeouts,
    )  # fmt: skip
    return True
