"""M-GRPO (arXiv 2511.13288): a main agent that delegates to a searching sub-agent, each
trained with group-relative advantages of its own rewards, the sub-agent's rows aligned to
a fixed count per rollout (Eq. 11)."""

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from medjax import losses
from medjax.training import rl, steps
from medjax.training.algorithms import base
from medjax.training.validate import SettingError

SUB_REWARD_VARIANTS = ("released", "paper")
TARGET_QUANTILE = 0.99  # The paper's coverage for d (Eq. 11).


@base.register
@dataclasses.dataclass(frozen=True)
class MGRPO:
    """M-GRPO's rows and rewards. `RLStage.algorithm = "mgrpo"` takes these defaults; bind
    them in gin with `RLStage.algorithm = @algorithms.MGRPO()`.

    Attributes:
      main_reward_weights: (a1 format, a2 correct) of the main reward R_M (Eq. 4).
      sub_reward_variant: "released" (b1 format + b2 main correct: the released scripts,
        which have no r_expert) or "paper" (b1 format + b2 main correct + b3 r_expert,
        Eq. 5), which needs `expert_rater`.
      sub_reward_weights: the variant's b weights (2 for "released", 3 for "paper"); None:
        the variant's defaults ((0.1, 0.9) and (0.1, 0.4, 0.5)).
      expert_rater: "paper" only: `rater(sub_trajectory) -> float in [0, 1]`, how well the
        sub-agent carried out its subtask (the paper asks an LLM).
      target_quantile: with `RLStage.sub_target_count` None, each step aligns every
        rollout to this quantile of the rollouts' sub-trajectory counts (d of Eq. 11).
    """

    name: ClassVar[str] = "mgrpo"
    hierarchical: ClassVar[bool] = True
    fields: ClassVar[frozenset[str]] = frozenset({
        "shared_model", "sub_optimizer", "sub_target_count", "sub_alignment", "train_sub",
        "sub_init_from", "decoupled",
    })  # fmt: skip

    main_reward_weights: tuple[float, float] = losses.mgrpo.MAIN_REWARD_WEIGHTS
    sub_reward_variant: str = "released"
    sub_reward_weights: tuple[float, ...] | None = None
    expert_rater: Callable[[Any], float] | None = None
    target_quantile: float = TARGET_QUANTILE

    def check(self, where, values, defaults) -> None:
        base.unused_fields(where, self.name, self.fields, values, defaults)
        distinct = not values["shared_model"] and values["decoupled"] is None
        if (not values["train_sub"] or values["sub_init_from"]) and not distinct:
            raise base.distinct_models_only(where)
        if (
            values["sub_optimizer"] is not None
            and values["shared_model"]
            and not values["decoupled"]
        ):
            raise SettingError(
                f"{where}: sub_optimizer does nothing with shared_model True (one model, one"
                " optimizer); leave it unset or set shared_model False."
            )
        if (
            not values["sub_alignment"]
            and values["sub_target_count"] != defaults["sub_target_count"]
        ):
            raise SettingError(
                f"{where}: sub_target_count {values['sub_target_count']!r} does nothing with"
                " sub_alignment False (no alignment to a count); leave it unset."
            )
        self._check_own(where, values)

    def _check_own(self, where: str, values: Mapping[str, Any]) -> None:
        own = f"{where}: MGRPO."
        if self.sub_reward_variant not in SUB_REWARD_VARIANTS:
            raise SettingError(
                f"{own}sub_reward_variant {self.sub_reward_variant!r} is not one of"
                f" {SUB_REWARD_VARIANTS}."
            )
        _weights(own + "main_reward_weights", self.main_reward_weights, 2)
        paper = self.sub_reward_variant == "paper"
        if self.sub_reward_weights is not None:
            _weights(own + "sub_reward_weights", self.sub_reward_weights, 3 if paper else 2)
        if paper and not callable(self.expert_rater):
            raise SettingError(
                f"{own}sub_reward_variant 'paper' needs expert_rater (r_expert: a callable"
                f" rating each sub-trajectory in [0, 1]), got {self.expert_rater!r}."
            )
        if not paper and self.expert_rater is not None:
            raise SettingError(
                f"{own}expert_rater does nothing with sub_reward_variant 'released' (no"
                " r_expert term); leave it unset."
            )
        q = self.target_quantile
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < q <= 1:
            raise SettingError(f"{own}target_quantile {q!r} is not a number in (0, 1].")
        if q != TARGET_QUANTILE and (
            values["sub_target_count"] is not None or not values["sub_alignment"]
        ):
            raise SettingError(
                f"{own}target_quantile {q!r} does nothing with a fixed sub_target_count"
                f" ({values['sub_target_count']!r}) or without alignment; set"
                " RLStage.sub_target_count = None to choose d per step."
            )

    def kl_beta(self, stage) -> float:
        return 0.0

    def loss_fn(self, stage, temperature: float) -> steps.LossFn:
        return steps.policy_loss_fn(stage.loss or losses.mgrpo_policy_loss, temperature=temperature)

    def _sub_options(self) -> dict[str, Any]:
        return dict(
            sub_weights=self.sub_reward_weights, quantile=self.target_quantile,
            variant=self.sub_reward_variant, expert_rater=self.expert_rater,
        )  # fmt: skip

    def rows(self, stage, rollouts: base.Rollouts) -> base.StepRows:
        run, r = rollouts.run, rollouts
        pad_id = run.tokenizer.pad_token_id
        if r.main_side is not None:  # Decoupled: the sub-agent trains in its own process.
            main, terms, main_rewards, stats = rl.mgrpo_main_batch(
                r.trajs, r.records, stage.num_generations, reward=run.task.reward,
                pad_id=pad_id, main_weights=self.main_reward_weights,
            )  # fmt: skip
            stats.update(r.main_side.publish(r.step, r.trajs, terms, main_rewards))
            return base.StepRows(main, stats)
        main, subs, stats = rl.mgrpo_batches(
            r.trajs, r.records, stage.num_generations, stage.sub_target_count,
            alignment_key(r.key, r.step), reward=run.task.reward, pad_id=pad_id,
            align=stage.sub_alignment, main_weights=self.main_reward_weights,
            **self._sub_options(),
        )  # fmt: skip
        if stage.shared_model:  # One model plays both agents: one update over all rows.
            width = max(main["input_ids"].shape[1], subs["input_ids"].shape[1])
            both = [_widen(main, width, pad_id), _widen(subs, width, pad_id)]
            return base.StepRows({k: np.concatenate([b[k] for b in both]) for k in main}, stats)
        return base.StepRows(main, stats, sub=subs if stage.train_sub else None)

    def sub_rows(self, stage, subs, owner, correct, num_rollouts: int, step: int, key, *,
                 pad_id: int, shaping) -> tuple[base.Batch, dict[str, float]]:  # fmt: skip
        """The sub-agent's rows from the main trainer's published statistics (decoupled)."""
        return rl.mgrpo_sub_batch(
            subs, owner, correct, num_rollouts, stage.sub_target_count,
            alignment_key(key, step), pad_id=pad_id, shaping=shaping,
            align=stage.sub_alignment, **self._sub_options(),
        )  # fmt: skip


def alignment_key(base_key: jax.Array, step: int) -> jax.Array:
    """The key of a step's alignment draws (the same in one process and decoupled)."""
    return jax.random.fold_in(base_key, 10**6 + step)


def _weights(where: str, weights, count: int) -> None:
    if (
        not isinstance(weights, (tuple, list))
        or len(weights) != count
        or any(isinstance(w, bool) or not isinstance(w, numbers.Real) for w in weights)
    ):
        raise SettingError(f"{where} {weights!r} is not {count} numbers.")


def _widen(batch: Mapping[str, np.ndarray], width: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {}
    for k, v in batch.items():
        if v.ndim == 2 and v.shape[1] < width:
            fill = pad_id if k == "input_ids" else 0
            v = np.concatenate([v, np.full((v.shape[0], width - v.shape[1]), fill, v.dtype)], 1)
        out[k] = v
    return out
