"""Cloud TPU slices as the TPU compiler sees them, without a TPU.

`resolve("v5e-8")` maps a Cloud TPU name to its topology (chips, hosts, chip generation);
`devices(topology)` gives the slice's devices from libtpu's ahead-of-time topology
description, on which `jax.jit(f).lower(...).compile()` runs the real TPU compiler from a
CPU machine (as MaxText's train_compile.py does). `available_hbm(devices)` is the HBM a
program may use on one chip, as the compiler states it.

Names: v5e-N / v5litepod-N and v6e-N count chips (v5e-8: 8 chips on one host); v4-N and
v5p-N count TensorCores, two a chip (v5p-8: 4 chips on one host). Slices of more than 8
v5e/v6e chips or more than 4 v4/v5p chips have 4 chips a host. A topology string
("v5e:2x4", "v5p:2x2x2") is taken as it is.
"""

import dataclasses
import functools
import importlib.util
import math
import os
import re

import numpy as np

# The bf16 matmul peak of one chip (Google's published figures), for step-time lower bounds.
PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
# TPU_ACCELERATOR_TYPE's generation names (libtpu reads it; without it, it warns).
_ACCELERATOR = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
# A chip that holds two TensorCores is one device ("megacore") on v4 and v5p.
_CHIP_CONFIG = {"v4": "megacore", "v5e": "default", "v5p": "megacore", "v6e": "default"}
# 2D slices of v5e/v6e chips by count (Cloud TPU's shapes).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}  # fmt: skip
# 3D slices of v4/v5p chips by count.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)}  # fmt: skip

INSTALL = 'pip install -e ".[tpu]"'  # libtpu at the version jax's `tpu` extra pins.


class TopologyError(ValueError):
    """A name that is not a Cloud TPU slice or topology string."""


class MissingLibtpuError(RuntimeError):
    """libtpu is not installed: the TPU compiler is not there."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice.

    Attributes:
      name: what the user asked for ("v5e-8" or "v5e:2x4").
      generation: "v4", "v5e", "v5p" or "v6e".
      shape: chips along each axis (2 numbers for v5e/v6e, 3 for v4/v5p).
      chips_per_host: the chips of one host along each axis (3 numbers).
    """

    name: str
    generation: str
    shape: tuple[int, ...]
    chips_per_host: tuple[int, int, int]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host)

    @property
    def topology(self) -> str:
        """libtpu's topology string, e.g. "v5e:2x4"."""
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def peak_flops(self) -> float:
        """bf16 matmul FLOP/s of one chip."""
        return PEAK_BF16_FLOPS[self.generation]

    def describe(self) -> str:
        hosts = "1 host" if self.hosts == 1 else f"{self.hosts} hosts"
        return f"{self.name} ({self.topology}, {self.chips} chips, {hosts})"


def _per_host(generation: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    padded = tuple(shape) + (1,) * (3 - len(shape))
    if generation in ("v5e", "v6e"):
        # Up to 8 chips sit on one host; larger slices have hosts of 2x2 chips.
        return padded if math.prod(shape) <= 8 else (2, 2, 1)
    return tuple(min(s, b) for s, b in zip(padded, (2, 2, 1), strict=True))


def resolve(name: str) -> Topology:
    """The Topology of a Cloud TPU name ("v5e-8", "v5litepod-16", "v5p-8", "v4-32",
    "v6e-8") or a topology string ("v5e:2x4", "v5p:2x2x2").

    Raises:
      TopologyError: naming what is accepted.
    """
    text = str(name).strip().lower()
    if m := re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", text):
        generation, shape = m.group(1), tuple(int(s) for s in m.group(2).split("x"))
        want = 2 if generation in ("v5e", "v6e") else 3
        if len(shape) != want or min(shape) < 1:
            raise TopologyError(
                f"topology {name!r}: {generation} slices are {want}-dimensional"
                f" ({'v5e:2x4' if want == 2 else 'v5p:2x2x2'})."
            )
        return Topology(name, generation, shape, _per_host(generation, shape))
    if m := re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", text):
        generation = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        count = int(m.group(2))
        if generation in ("v5e", "v6e"):
            if count not in _SHAPES_2D:
                raise TopologyError(
                    f"topology {name!r}: {generation} slices have {sorted(_SHAPES_2D)} chips."
                )
            shape = _SHAPES_2D[count]
        else:  # Cores: two a chip.
            if count % 2 or count // 2 not in _SHAPES_3D:
                raise TopologyError(
                    f"topology {name!r}: {generation}-N counts TensorCores, 2 a chip; N is one"
                    f" of {sorted(2 * c for c in _SHAPES_3D)}."
                )
            shape = _SHAPES_3D[count // 2]
        return Topology(name, generation, shape, _per_host(generation, shape))
    raise TopologyError(
        f"topology {name!r}: give a Cloud TPU name (v4-8, v5e-8, v5e-16, v5p-8, v6e-8, ...)"
        " or a topology string (v5e:2x4, v5p:2x2x2)."
    )


def require_libtpu() -> None:
    """Raises MissingLibtpuError (one line with the install command) when libtpu is absent."""
    if importlib.util.find_spec("libtpu") is None:
        raise MissingLibtpuError(f"the TPU compiler (libtpu) is not installed: {INSTALL}")


def devices(topology: Topology) -> list:
    """The slice's devices (libtpu's ahead-of-time description; no TPU needed)."""
    require_libtpu()
    # libtpu warns about every setting a real TPU VM would have; the accelerator type is
    # the one it needs to stay quiet, and several processes may load it (pytest-xdist).
    os.environ.setdefault(
        "TPU_ACCELERATOR_TYPE", f"{_ACCELERATOR[topology.generation]}-{topology.chips}"
    )
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return _devices(topology.topology, topology.generation, topology.chips_per_host)


@functools.cache
def _devices(topology: str, generation: str, chips_per_host: tuple[int, int, int]) -> list:
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name=_CHIP_CONFIG[generation],
        chips_per_host_bounds=chips_per_host, num_slices=1,
    )  # fmt: skip
    return list(desc.devices)


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _stated_bytes(message: str, label: str) -> int | None:
    m = re.search(re.escape(label) + r" \(([\d.]+)([KMGT])\)", message)
    return None if m is None else int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_available(message: str) -> int | None:
    """The available HBM in bytes that a RESOURCE_EXHAUSTED message states, or None."""
    return _stated_bytes(message, "exceeds available HBM")


def parse_required(message: str) -> int | None:
    """The bytes of temporaries a RESOURCE_EXHAUSTED message says a program needs, or None."""
    return _stated_bytes(message, "required for HLO temporaries")


@functools.cache
def available_hbm(device) -> int:
    """Bytes of HBM a program may use on one chip of `device`'s kind: what the compiler
    says when a program asks for more (a 1 TiB buffer; nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    one = Mesh(np.array([device]), ("x",))
    huge = jax.ShapeDtypeStruct((2**38,), jnp.float32, sharding=NamedSharding(one, PartitionSpec()))
    try:
        jax.jit(lambda x: x + 1).lower(huge).compile()
    except Exception as e:  # XlaRuntimeError; its type moves between jax versions.
        found = parse_available(str(e))
        if found is not None:
            return found
        raise RuntimeError(f"cannot read the HBM of {device.device_kind}: {e}") from None
    raise RuntimeError(f"{device.device_kind}: a 1 TiB program compiled; cannot bound its HBM.")
