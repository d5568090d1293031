"""Pallas calls whose interpret mode and compiler parameters follow the platform the program
is lowered for (the devices its arrays are on), not `jax.default_backend()`: an ahead-of-time
compile for a TPU topology on a CPU host must get Mosaic and its parameters."""

from collections.abc import Callable

from jax import lax


def by_platform(make: Callable[[bool, str | None], Callable], interpret: bool | None) -> Callable:
    """The kernel call `make(interpret, platform)` builds, chosen where the program lowers.

    `lax.platform_dependent` stages one branch per platform and lowers only the lowering
    platform's: "tpu" and "cuda" get `make(False, platform)`, any other `make(False, None)`,
    and the CPU `make(True, None)` (interpret mode) unless `interpret` says otherwise.

    Args:
      make: `(interpret, platform) -> pallas call`; `platform` ("tpu", "cuda" or None) picks
        the compiler parameters.
      interpret: True: interpret mode everywhere; False: never (Pallas refuses it on CPU);
        None: on CPU only.
    """
    if interpret:
        return make(True, None)
    branches = {platform: make(False, platform) for platform in ("tpu", "cuda")}
    branches["default"] = make(False, None)
    if interpret is None:
        branches["cpu"] = make(True, None)
    return lambda *args: lax.platform_dependent(*args, **branches)
