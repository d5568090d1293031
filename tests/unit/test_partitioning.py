"""medjax.partitioning: rules, fitted shardings and the multi-host switch."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from medjax import partitioning


def test_logical_to_spec():
    assert partitioning.logical_to_spec(("batch", "length", "embed")) == P(
        ("data", "fsdp"), None, "fsdp"
    )
    assert partitioning.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert partitioning.logical_to_spec((None, "vocab")) == P(None, "tensor")
    with pytest.raises(ValueError, match="logical axis 'experts' has no rule"):
        partitioning.logical_to_spec(("experts",))


def test_a_dimension_the_mesh_does_not_divide_is_replicated():
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    assert partitioning.sharding_for((64, 128), ("embed", "mlp"), mesh).spec == P("fsdp", "tensor")
    # 3 KV heads * 1 head dim cannot be split two ways: replicated, not an error.
    assert partitioning.sharding_for((64, 3), ("embed", "kv_heads"), mesh).spec == P("fsdp", None)


def test_batch_sharding():
    mesh = partitioning.make_mesh(data=4, fsdp=2)
    assert partitioning.batch_sharding(mesh, ndim=3).spec == P(("data", "fsdp"), None, None)


@pytest.fixture
def calls(monkeypatch):
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "MEDJAX_DISTRIBUTED",
    ):
        monkeypatch.delenv(name, raising=False)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    return recorded


def test_single_host_does_not_initialize(calls):
    assert partitioning.maybe_initialize_distributed() is False
    assert partitioning.maybe_initialize_distributed("10.0.0.1:1234", num_processes=1) is False
    assert calls == []


def test_multi_host_from_environment(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert partitioning.maybe_initialize_distributed() is True
    assert calls == [{"coordinator_address": "host0:1234", "num_processes": 4, "process_id": 2}]


def test_multi_host_from_flags_and_tpu_autodetect(calls, monkeypatch):
    assert partitioning.maybe_initialize_distributed("host1:99", num_processes=2, process_id=0)
    monkeypatch.setenv("MEDJAX_DISTRIBUTED", "1")  # Cloud TPU: jax finds the rest itself.
    assert partitioning.maybe_initialize_distributed()
    assert calls == [
        {"coordinator_address": "host1:99", "num_processes": 2, "process_id": 0},
        {"coordinator_address": None, "num_processes": None, "process_id": None},
    ]
