"""A run's stages: `SFTStage` (supervised fine-tuning on the expert's chats) and `RLStage`
(online RL with one of `medjax.training.algorithms`). Each checks its fields when made."""

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

from medjax.training import algorithms, optim, rl
from medjax.training import decoupled as decoupled_lib
from medjax.training import validate as validate_lib
from medjax.training.runtime import TrainError, fields, validated


@dataclasses.dataclass(frozen=True)
class SFTStage:
    """Supervised fine-tuning on the expert's chats (loss on the policy's own tokens only).

    Attributes:
      name: the stage's folder in the run directory.
      steps: optimizer steps.
      batch_size: chats per step.
      max_length: chats are cut to this many tokens.
      optimizer: called as `optimizer(total_steps=steps)` (bind `optim.make_optimizer`).
      num_microbatches: gradient accumulation (exact: see `medjax.training.steps`).
      save_every: checkpoint interval in steps (and always at the end).
      heldout_every: every this many steps (and at the last) the policy is evaluated on
        the held-out records (greedy, as before and after each stage) and the results are
        logged as `heldout/<key>` with the step's metrics: learning curves. 0: never.
      keep_checkpoints: how many to keep.
      role: whose chats: None, the task's own agent (the expert's chats as they are); for
        the research task also M-GRPO's "main" (delegates the question and answers with
        what the sub-agent found) or "searcher" (the sub-agent's search); see
        `rl.role_chats`. A tuple of roles trains one model on all their chats, mixed.
    """

    name: str = "sft"
    steps: int = 100
    batch_size: int = 8
    max_length: int = 2048
    optimizer: Callable[..., optax.GradientTransformation] = optim.make_optimizer
    num_microbatches: int = 1
    save_every: int = 50
    keep_checkpoints: int = 2
    heldout_every: int = 0
    role: str | tuple[str | None, ...] | None = None

    @property
    def roles(self) -> tuple[str | None, ...]:
        return tuple(self.role) if isinstance(self.role, (tuple, list)) else (self.role,)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises TrainError naming the first field that cannot run (type, range, role)."""
        values = fields(self)
        validated(validate_lib.sft_stage, values, rl.ROLES)
        validated(validate_lib.optimizers, f"SFTStage {self.name!r}", values)


@dataclasses.dataclass(frozen=True)
class RLStage:
    """Online RL on the task's training questions.

    The algorithm (`medjax.training.algorithms`) builds each step's rows and gives the
    loss; the fields below marked with an algorithm are for that one only, and setting one
    for another algorithm stops the stage (it would do nothing).

    Attributes:
      name: the stage's folder in the run directory.
      algorithm: a registered name, "grpo" (any `losses.grpo_loss` variant: bind the
        loss's options), "grao" (`losses.grao_loss`; the reference answer of each question
        is its expert chat) or "mgrpo" (main agent delegating to a searching sub-agent;
        `losses.mgrpo_policy_loss`), or an algorithm object with its options
        (`algorithms.MGRPO(sub_reward_variant=...)`; in gin `@algorithms.MGRPO()`).
      steps: rollout batches.
      prompts_per_step: questions per rollout batch.
      num_generations: G episodes per question (K rollouts for M-GRPO).
      num_iterations: passes over each rollout batch (old log-probs are scored when > 1).
      num_minibatches: optimizer steps per pass (rows split in order, by question).
      num_microbatches: gradient accumulation inside each optimizer step.
      loss: the loss, its options bound in gin; None picks the algorithm's default.
      kl_beta: GRPO's KL coefficient (passed to the loss as `beta`; or bind the loss's
        `beta`); != 0 scores a reference model.
      reference: a Hugging Face folder for the reference model; None: the stage's initial
        policy, frozen.
      advantage_scale, advantage_ddof: `losses.group_advantages` options (GRPO).
      grouped_scoring: GRPO: the update scores each question's G episodes as one packed
        row, the tokens they share up to the first one the policy wrote (the prompt)
        encoded once (`rl.shared_prefix_rows`, Prefix Grouper's layout): the loss and
        gradients of whole-episode rows from fewer tokens. Needs prompts_per_step to split
        into num_minibatches x num_microbatches, and Dr. GRPO's max_completion_length
        bound (its default, the rows' width, is not the same width packed).
      optimizer: called as `optimizer(total_steps=...)` for the policy.
      shared_model: M-GRPO: one model plays both agents (one update over main and sub rows)
        or, False, the sub-agent is its own model with `sub_optimizer`.
      sub_optimizer: M-GRPO with distinct models (None: `optimizer`).
      sub_target_count: M-GRPO's d (fixed shapes); None: the 0.99 quantile per step.
      sub_alignment: M-GRPO's trajectory alignment (Eq. 11: every rollout gives exactly d
        sub-trajectories, copied or dropped at random). False: each rollout's own
        sub-trajectories as they are (rows padded to the most of any rollout), the
        ablation the paper compares against.
      train_sub: M-GRPO with distinct models: False freezes the sub-agent (the paper's
        "main-only" baseline: only the main agent learns).
      sub_init_from: M-GRPO with distinct models: a Hugging Face folder for the sub-agent's
        starting policy; None: the previous RL stage's sub-agent, else a copy of the
        stage's starting policy.
      hops: research task: train only on questions of (min, max) hops (a curriculum is
        one stage per range); None: all.
      save_every, keep_checkpoints, heldout_every: as in SFTStage.
      decoupled: M-GRPO with the main and sub-agent trainers in separate processes
        (`medjax.training.decoupled.Decoupled`: this process's role, the shared store, the
        sub-agent's endpoint); None: both in this process.
    """

    name: str = "rl"
    algorithm: Any = "grpo"  # A name in algorithms.REGISTRY, or an RL algorithm object.
    steps: int = 10
    prompts_per_step: int = 4
    num_generations: int = 4
    num_iterations: int = 1
    num_minibatches: int = 1
    num_microbatches: int = 1
    loss: Callable | None = None
    kl_beta: float = 0.0
    reference: str | None = None
    advantage_scale: str = "group"
    advantage_ddof: int = 1
    grouped_scoring: bool = False
    optimizer: Callable[..., optax.GradientTransformation] = optim.make_optimizer
    shared_model: bool = True
    sub_optimizer: Callable[..., optax.GradientTransformation] | None = None
    sub_target_count: int | None = 2
    sub_alignment: bool = True
    train_sub: bool = True
    sub_init_from: str | None = None
    hops: tuple[int, int] | None = None
    save_every: int = 5
    keep_checkpoints: int = 2
    heldout_every: int = 0
    decoupled: decoupled_lib.Decoupled | None = None

    def __post_init__(self):
        self.validate()

    @property
    def method(self) -> algorithms.RLAlgorithm:
        """The algorithm object (`algorithm` itself, or the registered name's defaults)."""
        return algorithms.of(self.algorithm)

    def validate(self) -> None:
        """Raises TrainError naming the first field that cannot run (type, range, algorithm,
        combinations such as rows that do not split into minibatches) or that would do
        nothing with the stage's algorithm."""
        values = fields(self)
        validated(validate_lib.rl_stage, values, algorithms.names())
        method = self.method
        if not isinstance(method, algorithms.RLAlgorithm):
            raise TrainError(
                f"RLStage {self.name!r}: algorithm {self.algorithm!r} is not one of"
                f" {algorithms.names()} or an RL algorithm object."
            )
        where = f"RLStage {self.name!r}"
        validated(method.check, where, values, _RL_DEFAULTS)
        validated(validate_lib.optimizers, where, values)


_RL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RLStage)}
