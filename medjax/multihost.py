"""Arrays and decisions of a run over several processes (`jax.distributed`).

One process per host, one global mesh over every chip: each process holds only the shards of
its own devices. What the trainer reads back on the host (scores, sampled tokens, the
parameters it exports) may therefore span hosts, and every process must take part in reading
it (a collective). Every decision that chooses which programs run next (resume, a finished
stage, an evaluation point already written) is process 0's, broadcast: two processes that
decided differently would each wait forever in a collective the other never runs.

How a run is spread (rollouts in lockstep): every process runs every episode of a step, the
host-side agent loop and tools included, and makes the same sampler calls in the same order;
each call is one program over all chips, whose sampled rows every process then reads whole
(`host_array`). So every process holds every group of G episodes whole, computes the same
rewards and the same group advantages from the whole group, builds the same rows and feeds
its own devices' shards of them (`put_global`). Metrics equal one process's with as many
devices; only the host-side work is repeated on every host, not the accelerator work.

On one process every function here is the plain single-process operation.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils


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
