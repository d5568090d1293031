"""What the trainer asks of an algorithm, and the checks every algorithm shares.

An RL algorithm turns one step's episodes into rows (token ids, masks, advantages or
rewards) for one or two policies, and gives the loss those rows are trained with. The RL
loop (`medjax.training.rl_loop`) does the rest the same way for all of them: rollouts,
old and reference log-probs, minibatches, checkpoints and metrics.

    class MyAlgorithm:
        name = "mine"                       # RLStage.algorithm = "mine"
        hierarchical = False                # main agent over a sub-agent (M-GRPO)
        fields = frozenset({"kl_beta"})     # RLStage settings it reads beyond the common
        def check(self, where, values, defaults): ...
        def kl_beta(self, stage): ...
        def loss_fn(self, stage, temperature): ...
        def rows(self, stage, rollouts): ...

A new algorithm is one new module in this package whose class is decorated with
`@register`: the package imports its modules, and `RLStage.algorithm` then takes the name
(or an instance, for options bound in gin: `RLStage.algorithm = @algorithms.MGRPO()`).
"""

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import numpy as np

from medjax.training import steps
from medjax.training.validate import SettingError

Batch = dict[str, np.ndarray]

# RLStage settings that only some algorithms read, and what they are for: a value other
# than the default with an algorithm that does not read it would do nothing, so the stage
# stops and names it.
SPECIFIC_FIELDS: dict[str, str] = {
    "kl_beta": "the KL term, which only GRPO-family losses have",
    "reference": "the KL term's reference model, scored only when the KL coefficient is not 0",
    "advantage_scale": "GRPO's group advantages",
    "advantage_ddof": "GRPO's group advantages scaled by a standard deviation",
    "grouped_scoring": "GRPO's update of each question's episodes as one packed row",
    "shared_model": "M-GRPO's agents",
    "sub_optimizer": "M-GRPO's separate sub-agent model",
    "sub_target_count": "M-GRPO's trajectory alignment",
    "sub_alignment": "M-GRPO's trajectory alignment",
    "train_sub": "M-GRPO with distinct models in one process",
    "sub_init_from": "M-GRPO with distinct models in one process",
    "decoupled": "M-GRPO's main and sub-agent trainers",
}


@dataclasses.dataclass
class StepRows:
    """An algorithm's rows for one step: `policy`'s rows train the stage's policy, `sub`'s
    the separate sub-agent (M-GRPO with distinct models); `stats` are logged."""

    policy: Batch
    stats: dict[str, float]
    sub: Batch | None = None


@dataclasses.dataclass
class Rollouts:
    """One RL step's episodes and what rows are built from.

    Attributes:
      trajs: the episodes, question-major (G per question).
      records: the step's questions.
      picked: their indices in the task's training records.
      step: the stage's step (0-based).
      key: the stage's base PRNG key (random draws fold in the step).
      run: the run (`medjax.training.runtime.Run`): task, environment, tokenizer, data.
      main_side: decoupled M-GRPO's main process (`decoupled_loop.MainSide`), else None.
    """

    trajs: list
    records: list
    picked: list[int]
    step: int
    key: jax.Array
    run: Any
    main_side: Any = None


@runtime_checkable
class Algorithm(Protocol):
    """What every training algorithm gives the trainer: the loss, and each step's rows (and
    the metrics that come with them) from that step's inputs: episodes for RL, expert chats
    for SFT."""

    def loss_fn(self, stage, temperature: float) -> steps.LossFn:
        """`(model, rows) -> (loss, metrics)` for `steps.make_train_step`."""

    def rows(self, stage, inputs) -> "StepRows":
        """The step's training rows and their stats."""


@runtime_checkable
class RLAlgorithm(Algorithm, Protocol):
    """An RL algorithm: rows from rollouts, the loss, and the RLStage settings it reads."""

    name: ClassVar[str]
    hierarchical: ClassVar[bool]  # Episodes of a main agent that delegates to a sub-agent.
    fields: ClassVar[frozenset[str]]  # The SPECIFIC_FIELDS it reads.

    def check(self, where: str, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
        """Raises SettingError naming a field that cannot run or would do nothing."""

    def kl_beta(self, stage) -> float:
        """The KL coefficient; not 0: the loop scores the reference model's log-probs."""

    def rows(self, stage, inputs: Rollouts) -> StepRows:
        """The step's training rows (and stats) from its episodes."""


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: makes `cls` the algorithm of `RLStage.algorithm == cls.name`."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two algorithms are named {cls.name!r}: {REGISTRY[cls.name]}, {cls}.")
    REGISTRY[cls.name] = cls
    return cls


def unused_fields(
    where: str, name: str, reads: frozenset[str], values: Mapping[str, Any],
    defaults: Mapping[str, Any],
) -> None:  # fmt: skip
    """SettingError for the first algorithm-specific field set (not its default) that an
    algorithm which does not read it would ignore."""
    for field, purpose in SPECIFIC_FIELDS.items():
        if field in reads or field not in values or _same(values[field], defaults[field]):
            continue
        if field == "decoupled":
            raise SettingError(
                f"{where}: decoupled trainers are for algorithm 'mgrpo', not {name!r}."
            )
        if field in ("train_sub", "sub_init_from"):
            raise distinct_models_only(where)
        raise SettingError(
            f"{where}: {field} {values[field]!r} does nothing with algorithm {name!r} (it is"
            f" for {purpose}); leave it unset."
        )


def distinct_models_only(where: str) -> SettingError:
    """The error for train_sub / sub_init_from where no distinct sub-agent model trains."""
    return SettingError(
        f"{where}: train_sub and sub_init_from are for M-GRPO with distinct models in one"
        " process (algorithm='mgrpo', shared_model=False)."
    )


def _same(value, default) -> bool:
    try:
        return bool(value == default)
    except Exception:  # Arrays and the like: compared by identity.
        return value is default


def rows_split(where: str, values: Mapping[str, Any]) -> None:
    """Rows (prompts_per_step * num_generations) must split in order into num_minibatches
    of num_microbatches."""
    rows = values["prompts_per_step"] * values["num_generations"]
    minibatches, microbatches = values["num_minibatches"], values["num_microbatches"]
    if not _splits(rows, values):
        raise SettingError(
            f"{where}: prompts_per_step * num_generations = {rows} rows do not split into"
            f" num_minibatches {minibatches} of num_microbatches {microbatches}."
        )


def groups_split(where: str, values: Mapping[str, Any]) -> None:
    """With grouped_scoring a row is a question: prompts_per_step must split into
    num_minibatches of num_microbatches."""
    prompts = values["prompts_per_step"]
    minibatches, microbatches = values["num_minibatches"], values["num_microbatches"]
    if not _splits(prompts, values):
        raise SettingError(
            f"{where}: grouped_scoring packs a question's episodes into one row, and"
            f" prompts_per_step {prompts} does not split into num_minibatches {minibatches}"
            f" of num_microbatches {microbatches}."
        )


def _splits(count: int, values: Mapping[str, Any]) -> bool:
    """Whether `count` rows split in order into num_minibatches of num_microbatches."""
    minibatches, microbatches = values["num_minibatches"], values["num_microbatches"]
    return count % minibatches == 0 and (count // minibatches) % microbatches == 0


def bound_option(fn: Callable, option: str) -> Any:
    """The value of `fn`'s keyword `option` bound by functools.partial or gin (None if
    neither binds it): what the function will really be called with. The library never
    imports gin: a gin wrapper can only exist where the caller already has."""
    while isinstance(fn, functools.partial):
        if option in fn.keywords:
            return fn.keywords[option]
        fn = fn.func
    gin = sys.modules.get("gin")
    inner = getattr(fn, "__wrapped__", None)
    if gin is None or inner is None:
        return None
    try:
        # Only gin's wrapper applies the bindings: the plain function called directly
        # ignores them.
        if gin.get_configurable(inner) is not fn:
            return None
        return gin.get_bindings(fn).get(option)
    except (ValueError, KeyError, TypeError):  # Not known to gin.
        return None
