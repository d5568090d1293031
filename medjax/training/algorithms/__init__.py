"""The training algorithms behind one protocol (`base.Algorithm`): GRPO family, GRAO and
M-GRPO for `RLStage`, SFT for `SFTStage`.

Every module of this package is imported here, so an algorithm registers itself
(`@base.register`) by being a module in it: adding one touches one new file.
"""

import importlib
import pkgutil

from medjax.training.algorithms.base import (
    REGISTRY,
    Algorithm,
    RLAlgorithm,
    Rollouts,
    StepRows,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from medjax.training.algorithms.grao import GRAO  # noqa: E402
from medjax.training.algorithms.grpo import GRPO  # noqa: E402
from medjax.training.algorithms.mgrpo import MGRPO  # noqa: E402
from medjax.training.algorithms.sft import SFT  # noqa: E402


def names() -> tuple[str, ...]:
    """The names `RLStage.algorithm` takes."""
    return tuple(REGISTRY)


def of(algorithm) -> RLAlgorithm:
    """The algorithm object of `RLStage.algorithm`: a registered name (its defaults) or an
    algorithm instance (options bound in gin). Raises KeyError for an unknown name."""
    if isinstance(algorithm, str):
        return REGISTRY[algorithm]()
    return algorithm


__all__ = [
    "GRAO", "GRPO", "MGRPO", "REGISTRY", "SFT", "Algorithm", "RLAlgorithm", "Rollouts",
    "StepRows", "names", "of", "register",
]  # fmt: skip
