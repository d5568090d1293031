"""Pure-functional RL and SFT losses: arrays in, `(loss, metrics)` out, float32 inside.

from medjax import losses
adv = losses.group_advantages(rewards, num_generations=8)
loss, metrics = losses.grpo_loss(logps, old_logps, adv, mask, loss_type="dapo")
"""

from medjax.losses.grao import grao_loss
from medjax.losses.groups import SegmentMoments, segment_moments, segment_zscores
from medjax.losses.grpo import group_advantages, grpo_loss, kl_penalty
from medjax.losses.mgrpo import (
    SubTrajectoryAlignment,
    align_sub_trajectories,
    choose_target_count,
    mgrpo_main_advantages,
    mgrpo_main_rewards,
    mgrpo_policy_loss,
    mgrpo_sub_advantages,
    mgrpo_sub_rewards,
)
from medjax.losses.sft import sft_loss

__all__ = [
    "SegmentMoments",
    "SubTrajectoryAlignment",
    "align_sub_trajectories",
    "choose_target_count",
    "grao_loss",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "mgrpo_main_advantages",
    "mgrpo_main_rewards",
    "mgrpo_policy_loss",
    "mgrpo_sub_advantages",
    "mgrpo_sub_rewards",
    "segment_moments",
    "segment_zscores",
    "sft_loss",
]
