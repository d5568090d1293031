"""Supervised fine-tuning: the expert's chats, loss on the policy's own tokens only."""

from typing import ClassVar

import numpy as np

from medjax.training import data, steps
from medjax.training.algorithms import base


class SFT:
    """Rows: a step's chats (token ids and the mask of the assistant's tokens), padded to
    a bucketed width no longer than `SFTStage.max_length`; loss: the token-mean NLL."""

    name: ClassVar[str] = "sft"

    def loss_fn(self, stage, temperature: float = 1.0) -> steps.LossFn:
        return steps.sft_loss_fn

    def chats(self, run, stage) -> list[tuple[list[int], list[int]]]:
        """The stage's training chats (of each of `stage.roles`), tokenised."""
        task = run.task
        return [
            data.chat_ids(run.tokenizer, messages, max_observation_chars=task.max_observation_chars)
            for role in stage.roles
            for messages in task.sft_chats(run.env, run.data.chats, role)
        ]

    def rows(self, stage, inputs: tuple[list, int]) -> base.StepRows:
        """`inputs`: (the step's tokenised chats, the pad id)."""
        picked, pad_id = inputs
        width = data.bucket(min(max(len(ids) for ids, _ in picked), stage.max_length))
        batch = data.pad_rows(picked, min(width, stage.max_length), pad_id=pad_id)
        return base.StepRows(batch, {"tokens": float(np.sum(batch["attention_mask"]))})
