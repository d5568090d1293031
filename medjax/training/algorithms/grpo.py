"""The GRPO family (GRPO, BNPO, Dr. GRPO, DAPO, GSPO): group-relative advantages of the
rewards and `losses.grpo_loss`, with its options bound in gin."""

import functools
from typing import ClassVar

from medjax import losses
from medjax.training import rl, steps
from medjax.training.algorithms import base
from medjax.training.validate import SettingError


@base.register
class GRPO:
    """G episodes per question, rewards -> group advantages (`RLStage.advantage_scale`,
    `advantage_ddof`), the clipped surrogate of `RLStage.loss` (default `losses.grpo_loss`)
    and, when its KL coefficient is not 0, a KL term to the reference model.

    The KL coefficient is `RLStage.kl_beta`, or the `beta` bound on the loss (in gin,
    `losses.grpo_loss.beta`); both set and different stops the stage."""

    name: ClassVar[str] = "grpo"
    hierarchical: ClassVar[bool] = False
    fields: ClassVar[frozenset[str]] = frozenset(
        {"kl_beta", "reference", "advantage_scale", "advantage_ddof", "grouped_scoring"}
    )

    def _loss(self, stage):
        return stage.loss or losses.grpo_loss

    def check(self, where, values, defaults) -> None:
        base.unused_fields(where, self.name, self.fields, values, defaults)
        base.rows_split(where, values)
        loss = values["loss"] or losses.grpo_loss
        if values["grouped_scoring"]:
            base.groups_split(where, values)
            dr_grpo = base.bound_option(loss, "loss_type") == "dr_grpo"
            if dr_grpo and base.bound_option(loss, "max_completion_length") is None:
                raise SettingError(
                    f"{where}: grouped_scoring with loss_type 'dr_grpo' needs the loss's"
                    " max_completion_length bound: its default, the rows' width, is another"
                    " width once the episodes are packed."
                )
        bound = base.bound_option(loss, "beta")
        kl = values["kl_beta"]
        if kl and bound and float(bound) != float(kl):
            raise SettingError(
                f"{where}: kl_beta {kl!r} and the loss's bound beta {bound!r} disagree; set one."
            )
        if values["advantage_scale"] != "group" and values["advantage_ddof"] != 1:
            raise SettingError(
                f"{where}: advantage_ddof {values['advantage_ddof']!r} does nothing with"
                f" advantage_scale {values['advantage_scale']!r} (only 'group' divides by a"
                " group's standard deviation); leave it unset."
            )

    def kl_beta(self, stage) -> float:
        return float(stage.kl_beta or base.bound_option(self._loss(stage), "beta") or 0.0)

    def loss_fn(self, stage, temperature: float) -> steps.LossFn:
        loss = self._loss(stage)
        if stage.kl_beta:
            loss = functools.partial(loss, beta=stage.kl_beta)
        return steps.policy_loss_fn(loss, temperature=temperature)

    def rows(self, stage, rollouts: base.Rollouts) -> base.StepRows:
        run = rollouts.run
        rewards, stats = run.task.score(
            run.env, rollouts.trajs, rollouts.records, stage.num_generations
        )
        batch, more = rl.grpo_batch(
            rollouts.trajs, rewards, stage.num_generations, pad_id=run.tokenizer.pad_token_id,
            scale=stage.advantage_scale, ddof=stage.advantage_ddof,
        )  # fmt: skip
        return base.StepRows(batch, {**stats, **more})
