"""medjax.multihost on one process (8 CPU devices): the helpers are the plain operations
there. Their two-process behaviour is tests/integration/test_multihost.py's."""

import jax
import numpy as np
import pytest
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


def test_share_splits_items_into_process_blocks(monkeypatch):
    """Catches: blocks that overlap or drop items when the count does not divide (10 items
    over 4 processes: 2, 3, 2, 3), or blocks out of process order."""
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    blocks = []
    for p in range(4):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        blocks.append(list(range(10))[multihost.share(10)])
    assert blocks == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]


def test_gather_json_is_the_items_on_one_process():
    """Catches: a single-process gather that wraps or reorders the items."""
    items = [{"a": 1, "b": [0.1, -2.5]}, {"a": 2}]
    assert multihost.gather_json(items) == items


def testprocess_meshes_take_each_process_block_of_the_mesh():
    """The mesh of gin/testing/multihost.gin's shape class ((data 2, fsdp 2, tensor 2), fsdp
    across two processes): process 1's block is the devices at fsdp index 1, as a (2, 1, 2)
    mesh, and the stacked view has each block in process order. Catches: blocks taken along
    the wrong axis, or a view whose process axis is not the process order."""
    mesh = partitioning.make_mesh(2, 2, 2)
    owner = np.zeros((2, 2, 2), int)
    owner[:, 1, :] = 1
    local, stacked = multihost.process_meshes(mesh, owner, 1)
    assert local.axis_names == ("data", "fsdp", "tensor")
    assert local.devices.shape == (2, 1, 2)
    assert [d.id for d in local.devices.flat] == [d.id for d in mesh.devices[:, 1:2, :].flat]
    assert stacked.axis_names == ("process", "data", "fsdp", "tensor")
    assert stacked.devices.shape == (2, 2, 1, 2)
    for p in range(2):
        assert [d.id for d in stacked.devices[p].flat] == [
            d.id for d in mesh.devices[:, p : p + 1, :].flat
        ]


def testprocess_meshes_refuse_a_process_whose_devices_are_scattered():
    """A checkerboard of owners: no process's devices form a block, so no local mesh
    exists. Catches: a silently wrong local mesh built from a bounding box."""
    mesh = partitioning.make_mesh(2, 2, 2)
    owner = np.indices((2, 2, 2)).sum(axis=0) % 2
    with pytest.raises(ValueError, match="process 0's devices do not form one block"):
        multihost.process_meshes(mesh, owner, 0)


def test_process_meshes_take_indices_a_ring_order_interleaves():
    """fsdp over 8 devices whose hosts alternate in pairs (a v5p ring order puts host 0 at
    fsdp 0, 1, 4, 5): process 0's block is those 4 devices in mesh order, a (1, 4, 1) mesh.
    Catches: a bounding box (all 6 devices from 0 to 5) or a refusal of a valid layout."""
    mesh = partitioning.make_mesh(1, 8, 1)
    owner = np.array([0, 0, 1, 1, 0, 0, 1, 1]).reshape(1, 8, 1)
    local, stacked = multihost.process_meshes(mesh, owner, 0)
    flat = list(mesh.devices.flat)
    assert local.devices.shape == (1, 4, 1)
    assert [d.id for d in local.devices.flat] == [flat[i].id for i in (0, 1, 4, 5)]
    assert [d.id for d in stacked.devices[1].flat] == [flat[i].id for i in (2, 3, 6, 7)]


def test_process_meshes_refuse_blocks_of_different_shapes():
    """Three processes whose blocks are (1, 2, 2), (1, 2, 1) and (1, 2, 1): each a block,
    but no stacked view holds them. Catches: np.stack's own shape error instead of one
    naming the mesh and the blocks."""
    mesh = partitioning.make_mesh(2, 2, 2)
    owner = np.zeros((2, 2, 2), int)
    owner[1, :, 0], owner[1, :, 1] = 1, 2
    with pytest.raises(ValueError, match=r"blocks of different shapes .*\(1, 2, 2\), \(1, 2, 1\)"):
        multihost.process_meshes(mesh, owner, 0)
