"""medjax.multihost on one process (8 CPU devices): the helpers are the plain operations
there. Their two-process behaviour is tests/integration/test_multihost.py's."""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medjax import multihost, partitioning


def test_put_global_places_each_row_on_the_device_device_put_would():
    """Catches: shards taken from the wrong rows (an index computed per process instead of
    from the sharding's own index map)."""
    mesh = partitioning.make_mesh(2, 2, 2)
    value = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    sharding = partitioning.batch_sharding(mesh, 2)
    placed = multihost.put_global(value, sharding)
    expected = jax.device_put(value, sharding)
    assert placed.sharding == sharding
    for a, b in zip(placed.addressable_shards, expected.addressable_shards, strict=True):
        assert a.device == b.device
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_host_array_reads_a_sharded_array_whole():
    """Catches: a read that returns one device's shard (or one process's) instead of all."""
    mesh = partitioning.make_mesh(2, 4, 1)
    value = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    x = jax.device_put(value, NamedSharding(mesh, P(("data", "fsdp"), None)))
    out = multihost.host_array(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, value)
    np.testing.assert_array_equal(multihost.host_array([1, 2]), np.array([1, 2]))


def test_agree_is_the_decision_itself_on_one_process():
    """Catches: a broadcast that turns a decision into its negation or a non-bool."""
    assert multihost.agree(True) is True
    assert multihost.agree(0) is False
