"""GRAO (arXiv 2508.07750): G samples and each question's expert chat as the reference
answer, `losses.grao_loss` with its options bound in gin."""

from typing import ClassVar

from medjax import losses
from medjax.training import data, rl, steps
from medjax.training.algorithms import base


@base.register
class GRAO:
    """Rows: the G sampled episodes with their rewards, and the question's expert chat
    (tokenised as a rollout would be) with the task's reward for it (`reference_reward`);
    the loss weighs exploration, imitation and alignment by group advantages."""

    name: ClassVar[str] = "grao"
    hierarchical: ClassVar[bool] = False
    fields: ClassVar[frozenset[str]] = frozenset()

    def check(self, where, values, defaults) -> None:
        base.unused_fields(where, self.name, self.fields, values, defaults)
        base.rows_split(where, values)

    def kl_beta(self, stage) -> float:
        return 0.0

    def loss_fn(self, stage, temperature: float) -> steps.LossFn:
        return steps.grao_loss_fn(
            stage.loss or losses.grao_loss, num_generations=stage.num_generations,
            temperature=temperature,
        )  # fmt: skip

    def rows(self, stage, rollouts: base.Rollouts) -> base.StepRows:
        run = rollouts.run
        task = run.task
        rewards, stats = task.score(
            run.env, rollouts.trajs, rollouts.records, stage.num_generations
        )
        references = []
        for i in rollouts.picked:
            chat = run.data.chats[i]
            ids, mask = data.chat_ids(
                run.tokenizer, chat["messages"], max_observation_chars=task.max_observation_chars
            )
            references.append((ids, mask, task.reference_reward(chat)))
        batch, more = rl.grao_batch(
            rollouts.trajs, rewards, references, pad_id=run.tokenizer.pad_token_id
        )
        return base.StepRows(batch, {**stats, **more})
