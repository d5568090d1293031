"""M-GRPO co-training vs main-only training vs single-agent GRPO, and alignment vs none.

The claims (M-GRPO, arXiv 2511.13288, Fig. 7 and 8; the paper has curves, no tables): in
stage 2 of its curriculum the training reward orders co-training > main-only (sub-agent
frozen) > single-agent GRPO with all the sub-agent's tools, and co-training with trajectory
alignment beats co-training without it.

The same protocol at small scale, through the trainer on the research task: per seed a
1M-parameter model (or, `--setting smollm2`, SmolLM2-135M-Instruct) is trained by SFT on
the expert's chats in all three roles (researcher, main agent, searching sub-agent), then
stage 1 co-trains the two agents (distinct models, M-GRPO) on easy questions (2-3 hops).
Every stage-2 arm starts from the stage-1 checkpoint and trains `steps` steps on hard
questions (4-6 hops):

- "co-training": M-GRPO, both agents learn;
- "main-only": M-GRPO with the sub-agent frozen;
- "single-agent": GRPO of one researcher with the search and read tools (from the stage-1
  main agent's model, which was also trained as a researcher);
- "no alignment": co-training without Eq. 11 (each rollout's own sub-trajectories).

Measured: the stage-2 training reward (the task's composite reward with the from-scratch
quickstart's shaping terms, the same for all arms), and held-out accuracy and reward of greedy
episodes (the multi-agent system for the M-GRPO arms). The verdict follows `comparisons` on
the mean training reward over the second half of stage 2.

    python -m medjax.reproductions.mgrpo_cotraining --setting cpu --seeds 0 1 2 \\
        --out /tmp/repro/mgrpo_cotraining --publish docs/reproductions/mgrpo_cotraining
"""

import dataclasses
import functools
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from medjax import losses, train_lib
from medjax.envs import research
from medjax.reproductions import comparisons, provenance
from medjax.training import optim, rl

ARMS = ("co-training", "main-only", "single-agent", "no alignment")
CLAIMS = (
    ("co-training", "main-only"),
    ("main-only", "single-agent"),
    ("co-training", "no alignment"),
)
REWARD = "reward/mean"


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything the comparison holds fixed.

    Attributes:
      dataset, num_eval_questions: the questions (`ResearchTask`).
      max_turns, sub_turns, max_new_tokens, final_turn_tokens, max_context_tokens,
        max_observation_chars: the agents' budgets.
      tool_names: the researcher's and the sub-agent's tools (None: search, read, kg_lookup).
      temperature: rollouts' sampling temperature.
      shaping: the from-scratch shaping terms in the reward (False: the papers' reward,
        correct + 0.1 x valid format).
      init_from: the base policy's starting point: None trains the model below from scratch;
        "smollm2" starts from SmolLM2-135M-Instruct (`medjax.models.smollm2`), or a Hugging
        Face folder or GGUF file.
      hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
        tokenizer_vocab_size: the model, Qwen2-shaped, trained from scratch.
      base_steps, base_batch_size, base_learning_rate, base_max_length: SFT on the three
        roles' chats.
      easy_hops, hard_hops: the curriculum's question ranges.
      stage1_steps: M-GRPO co-training on easy questions.
      steps, prompts_per_step, num_generations, learning_rate: each stage-2 arm's budget
        (K = num_generations rollouts per question); num_microbatches: gradient accumulation
        of every RL update (memory only).
      sub_target_count: M-GRPO's d.
      heldout_every: stage-2 steps between held-out evaluations.
    """

    dataset: str = "med_kg_qa/tiny"
    num_eval_questions: int | None = None
    max_turns: int = 3
    sub_turns: int = 3
    # The main agent's delegate call restates the question: up to 219 tokens in the expert
    # chats of med_kg_qa/tiny (BPE of 2,048). A first run with 80 truncated every call, and
    # no rollout of stage 1 or 2 delegated.
    max_new_tokens: int = 256
    final_turn_tokens: int = 40
    max_context_tokens: int = 1536
    max_observation_chars: int = 150
    tool_names: tuple[str, ...] | None = None
    temperature: float = 1.0
    shaping: bool = True
    init_from: str | None = None
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    tokenizer_vocab_size: int = 2048
    base_steps: int = 180
    base_batch_size: int = 4
    base_learning_rate: float = 3e-3
    base_max_length: int = 2048
    easy_hops: tuple[int, int] = (2, 3)
    hard_hops: tuple[int, int] = (4, 6)
    stage1_steps: int = 4
    steps: int = 8
    prompts_per_step: int = 4
    num_generations: int = 4
    learning_rate: float = 3e-4
    num_microbatches: int = 1
    sub_target_count: int = 2
    heldout_every: int = 4

    def task(self, data_dir: str | None) -> rl.ResearchTask:
        # The from-scratch quickstart's shaping: such a policy makes errors in nearly every
        # episode, and the binary format term alone would give every arm the reward 0.
        shaping = dict(answer_weight=0.1, error_penalty=0.02) if self.shaping else {}
        reward = research.RewardConfig(format_weight=0.1, **shaping)
        return rl.ResearchTask(
            dataset=self.dataset, data_dir=data_dir, num_eval_questions=self.num_eval_questions,
            max_turns=self.max_turns, sub_turns=self.sub_turns,
            max_new_tokens=self.max_new_tokens, final_turn_tokens=self.final_turn_tokens,
            max_context_tokens=self.max_context_tokens,
            max_observation_chars=self.max_observation_chars, reward=reward,
            tool_names=self.tool_names, temperature=self.temperature,
        )  # fmt: skip

    def base(self) -> dict[str, Any]:
        """`train_lib.train`'s model arguments for the base policy's run."""
        return comparisons.base_model(self)

    def rl_stage(self, name: str, steps: int, hops, **kwargs) -> train_lib.RLStage:
        """An RL stage of this setting; `kwargs`: the algorithm and its own settings."""
        common = dict(
            prompts_per_step=self.prompts_per_step, num_generations=self.num_generations,
            num_microbatches=self.num_microbatches, save_every=steps, keep_checkpoints=1,
            hops=hops,
            optimizer=functools.partial(optim.make_optimizer, learning_rate=self.learning_rate),
        )  # fmt: skip
        return train_lib.RLStage(name=name, steps=steps, **common, **kwargs)

    def mgrpo_stage(self, name: str, steps: int, hops, **kwargs) -> train_lib.RLStage:
        """M-GRPO with distinct main and sub-agent models (d aligned sub-trajectories per
        rollout, unless `sub_alignment` is False)."""
        if kwargs.get("sub_alignment", True):
            kwargs.setdefault("sub_target_count", self.sub_target_count)
        return self.rl_stage(
            name, steps, hops, algorithm="mgrpo", loss=losses.mgrpo_policy_loss,
            shared_model=False, **kwargs,
        )  # fmt: skip


SETTINGS = {
    # The report's setting: 69 minutes for seed 1 on 2 CPU cores shared with four other runs.
    "cpu": Setting(),
    # SmolLM2-135M-Instruct as the base policy, sized for a seed in under an hour on 2 CPU
    # cores (50 minutes, 18 GB, 2026-12-06): the quickstart's one-hop lookup questions (no
    # curriculum: stage 1 and 2 draw from the same questions), the main agent delegates the
    # question, the sub-agent answers it with kg_lookup. The quickstart's lr, temperature,
    # papers' reward and SFT lr; the base SFT is longer (three roles).
    "smollm2": Setting(
        dataset="med_kg_qa/lookup",
        num_eval_questions=16,
        max_turns=2,
        sub_turns=2,
        max_new_tokens=96,  # The delegate call restates the question.
        final_turn_tokens=32,
        max_context_tokens=1024,
        max_observation_chars=400,
        tool_names=("kg_lookup",),
        temperature=0.7,
        shaping=False,
        init_from="smollm2",
        base_steps=24,
        base_learning_rate=5e-5,
        base_max_length=512,
        easy_hops=(1, 1),
        hard_hops=(1, 1),
        stage1_steps=1,
        steps=4,
        prompts_per_step=2,
        learning_rate=1e-5,
        # 16 sub-agent rows a step (d = 2): microbatches of 4 rows, as the quickstart's.
        # Microbatches of 8 ran out of 24 GB in the first stage-2 arm.
        num_microbatches=4,
    ),
    # The notebook's CI setting: the whole protocol in a few minutes, numbers meaningless.
    "tiny": Setting(
        num_eval_questions=2,
        max_turns=2,
        sub_turns=1,
        max_new_tokens=32,
        final_turn_tokens=8,
        max_context_tokens=1024,
        max_observation_chars=100,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        tokenizer_vocab_size=512,
        base_steps=2,
        base_batch_size=2,
        stage1_steps=1,
        steps=2,
        prompts_per_step=2,
        num_generations=2,
        heldout_every=2,
    ),
}


def arm_stage(arm: str, setting: Setting, stage1: str) -> train_lib.RLStage:
    """The stage-2 stage of an arm, from the stage-1 run directory `stage1`."""
    sub = os.path.join(stage1, "stage1", "export_sub")
    steps, hard = setting.steps, setting.hard_hops
    kwargs = {"heldout_every": setting.heldout_every}
    if arm == "single-agent":
        return setting.rl_stage("arm", steps, hard, algorithm="grpo", loss=losses.grpo_loss,
                                **kwargs)  # fmt: skip
    options = {
        "co-training": {}, "main-only": {"train_sub": False},
        "no alignment": {"sub_alignment": False},
    }  # fmt: skip
    if arm not in options:
        raise ValueError(f"mgrpo_cotraining: unknown arm {arm!r}; arms are {ARMS}.")
    return setting.mgrpo_stage("arm", steps, hard, sub_init_from=sub, **options[arm], **kwargs)


def stage1_policy(setting: Setting, seed: int, run_dir: str, data_dir: str | None) -> str:
    """SFT on the three roles, then M-GRPO on easy questions; returns the run directory."""
    base = train_lib.SFTStage(
        name="base", steps=setting.base_steps, batch_size=setting.base_batch_size,
        max_length=setting.base_max_length, save_every=setting.base_steps, keep_checkpoints=1,
        role=(None, "main", "searcher"),
        optimizer=functools.partial(
            optim.make_optimizer, learning_rate=setting.base_learning_rate, schedule="cosine",
            warmup_steps=max(setting.base_steps // 12, 1), final_fraction=0.1,
        ),
    )  # fmt: skip
    stage1 = setting.mgrpo_stage("stage1", setting.stage1_steps, setting.easy_hops)
    train_lib.train(
        run_dir, task=setting.task(data_dir), **setting.base(), stages=[base, stage1],
        seed=seed, mesh_shape=(1, 1, 1), evaluate=False, interactive=False,
    )  # fmt: skip
    return run_dir


def _tail_mean(points: Sequence[tuple[int, float]]) -> float:
    """Mean over the second half of a curve's steps."""
    values = [v for _, v in points]
    tail = values[len(values) // 2 :] or values
    return sum(tail) / len(tail)


def _delegation(run_dir: str, setting: Setting) -> float:
    """The share of stage 2's rollouts in which the main agent called its sub-agent (without
    delegation, co-training, main-only and no alignment are one run)."""
    without = comparisons.curve(run_dir, "arm", "sub/rollouts_without_subs")
    if not without:
        raise ValueError(f"{run_dir}/arm/metrics.jsonl has no sub/rollouts_without_subs.")
    rollouts = setting.prompts_per_step * setting.num_generations * len(without)
    return 1.0 - sum(v for _, v in without) / rollouts


def _read_back(results: Mapping[str, Any], arm: str, seed: int) -> tuple[Any, Any, Any]:
    """An earlier results.json's training curve, held-out curves and delegation (None for
    the single agent) of (arm, seed)."""
    delegated = None
    if arm != "single-agent":
        delegated = results["delegation"][arm]["values"][results["seeds"].index(seed)]
    return (
        results["training_curves"][arm][str(seed)],
        results["heldout_curves"][arm][str(seed)],
        delegated,
    )


def run(
    setting: Setting,
    seeds: Sequence[int],
    out_dir: str,
    *,
    arms: Sequence[str] = ARMS,
    data_dir: str | None = None,
    reuse: Sequence[str] = (),
) -> dict[str, Any]:
    """Every arm from every seed's stage-1 policies; writes and returns results.json's dict.
    Runs resume: finished stages are read back, not trained again, and so are the (arm, seed)
    results of `reuse`, earlier results.json files of the same setting."""
    t0 = time.perf_counter()
    earlier = comparisons.Earlier(reuse, setting)
    rewards = {arm: {} for arm in arms}
    heldout = {arm: {} for arm in arms}
    delegation = {arm: {} for arm in arms if arm != "single-agent"}
    for seed in seeds:
        seed_dir = os.path.join(out_dir, f"seed{seed}")
        stage1 = None
        for arm in arms:
            found = earlier.take("training_curves", arm, seed, _read_back)
            if found is not None:
                rewards[arm][str(seed)], heldout[arm][str(seed)], delegated = found
                if arm in delegation:
                    delegation[arm][str(seed)] = delegated
                continue
            if stage1 is None:
                stage1 = stage1_policy(setting, seed, os.path.join(seed_dir, "stage1"), data_dir)
            arm_dir = os.path.join(seed_dir, arm.replace(" ", "_"))
            train_lib.train(
                arm_dir, task=setting.task(data_dir),
                init_from=os.path.join(stage1, "stage1", "export"),
                stages=[arm_stage(arm, setting, stage1)], seed=seed, mesh_shape=(1, 1, 1),
                evaluate=False, interactive=False,
            )  # fmt: skip
            rewards[arm][str(seed)] = comparisons.curve(arm_dir, "arm", REWARD)
            if arm in delegation:
                delegation[arm][str(seed)] = _delegation(arm_dir, setting)
            heldout[arm][str(seed)] = {
                k: comparisons.curve(arm_dir, "arm", f"heldout/{k}")
                for k in ("accuracy", "mean_reward")
            }
    tail = {arm: [_tail_mean(rewards[arm][str(s)]) for s in seeds] for arm in arms}
    final = {
        arm: {
            k: comparisons.spread([heldout[arm][str(s)][k][-1][1] for s in seeds])
            for k in ("accuracy", "mean_reward")
        }
        for arm in arms
    }
    claims = [c for c in CLAIMS if c[0] in arms and c[1] in arms]
    results = {
        "finding": "stage-2 training reward: co-training > main-only > single-agent, and"
        " alignment > no alignment (arXiv 2511.13288, Fig. 7-8)",
        "setting": dataclasses.asdict(setting),
        "seeds": list(seeds),
        "metric": f"mean {REWARD} over the second half of stage 2 (sampled episodes)",
        "stage2_reward": {arm: comparisons.spread(v) for arm, v in tail.items()},
        "heldout_final": final,
        "delegation": {
            arm: comparisons.spread([per_seed[str(s)] for s in seeds])
            for arm, per_seed in delegation.items()
        },
        **comparisons.judge(tail, claims),
        "training_curves": rewards,
        "heldout_curves": heldout,
        "seconds": time.perf_counter() - t0,
        **earlier.provenance(),
        "machine": provenance.machine(),
        "versions": provenance.versions("jax", "flax", "optax", "numpy"),
    }
    comparisons.write_json(os.path.join(out_dir, "results.json"), results)
    plot(results, os.path.join(out_dir, "mgrpo_cotraining.png"))
    return results


def plot(results: dict[str, Any], path: str | None = None):
    """Stage-2 training reward and held-out reward per step, mean over seeds (min-max)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    seeds = len(results["seeds"])
    lo, hi = results["setting"]["hard_hops"]
    hops = str(lo) if lo == hi else f"{lo}-{hi}"
    comparisons.plot_curves(
        results["training_curves"], ylabel="mean training reward", ax=left,
        title=f"stage 2 ({hops}-hop questions): training reward"
        f" ({seeds} seed{'s' * (seeds > 1)})",
    )  # fmt: skip
    held = {a: {s: c["mean_reward"] for s, c in by.items()}
            for a, by in results["heldout_curves"].items()}  # fmt: skip
    comparisons.plot_curves(held, ylabel="held-out mean reward", ax=right,
                            title="held-out reward (greedy)")  # fmt: skip
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = comparisons.parser(__doc__, SETTINGS, ARMS, reuse=True)
    args = parser.parse_args(argv)
    results = run(SETTINGS[args.setting], args.seeds, args.out, arms=args.arms,
                  data_dir=args.data_dir, reuse=args.reuse)  # fmt: skip
    if args.publish:
        comparisons.publish(args.out, args.publish, ("results.json", "mgrpo_cotraining.png"))
    for arm, s in results["stage2_reward"].items():
        print(f"{arm:14s} stage-2 reward {s['mean']:+.4f} +- {s['std']:.4f} {s['values']}")
    for arm, s in results["delegation"].items():
        print(f"{arm:14s} rollouts that delegated {s['mean']:.3f} {s['values']}")
    comparisons.print_verdict(results)
    print(f"{results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
