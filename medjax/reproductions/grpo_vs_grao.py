"""GRPO vs GRAO vs SFT, and GRAO's three ablations, on the MedDialogRubrics doctor.

The claim (GRAO, arXiv 2508.07750, Tables 1-3): on alignment tasks GRAO > GRPO > SFT, and
removing any of GRAO's terms (imitation, exploration, the alignment regulariser) hurts.

The analogue here keeps the paper's structure: a base policy that can hold an interview but
knows nothing case-specific (SFT on generic interviews: half the cases by the checklist
doctor, half by the doctor who asks about random findings, so that the base samples varied
questions as a pretrained model would), reference
answers y from a stronger policy (the oracle doctor, which asks each case's must-ask items
by priority), and a reward that judges the policy's own interviews (weighted rubric
coverage, `training.consultation`). From the same base (per seed) every arm gets the same
budget, `steps` updates on `prompts_per_step` cases each:

- "sft": SFT on the cases' reference interviews y;
- "grpo": GRPO on G sampled interviews per case (TRL's defaults, no KL);
- "grao": GRAO (beta 0.5, lambda 0.6) on the G samples plus y;
- "grao_no_imitation", "grao_no_exploration", "grao_no_alignment": GRAO without one term.

Measured: held-out weighted rubric coverage of greedy interviews on validation cases
(diseases never seen in training) every `heldout_every` steps, and the training reward.
The verdict follows `comparisons` on the final held-out coverage.

    python -m medjax.reproductions.grpo_vs_grao --setting cpu --seeds 0 1 2 \\
        --out /tmp/repro/grpo_vs_grao --publish docs/reproductions/grpo_vs_grao
"""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from medjax import losses, train_lib
from medjax.reproductions import comparisons, provenance
from medjax.training import consultation, optim

ARMS = ("sft", "grpo", "grao", "grao_no_imitation", "grao_no_exploration", "grao_no_alignment")
# The paper's orderings, as (better, worse) claims on the final held-out coverage.
CLAIMS = (
    ("grao", "grpo"),
    ("grpo", "sft"),
    ("grao", "grao_no_imitation"),
    ("grao", "grao_no_exploration"),
    ("grao", "grao_no_alignment"),
)
METRIC = "heldout/coverage"
BASE_EXPERTS = ("checklist", "random")  # The base policy's SFT data.


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything a comparison holds fixed.

    Attributes:
      dataset, num_train_cases, num_eval_cases: the cases (`ConsultationTask`).
      max_turns, max_new_tokens, max_context_tokens: the interview budget.
      temperature: rollouts' sampling temperature.
      init_from: the base policy's starting point: None trains the model below from scratch;
        "smollm2" starts from SmolLM2-135M-Instruct (`medjax.models.smollm2`), or a Hugging
        Face folder or GGUF file.
      hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: the model
        (Qwen2-shaped, trained from scratch), tokenizer_vocab_size its BPE.
      base_steps, base_batch_size, base_learning_rate, base_max_length: the base policy's
        SFT on the generic interviews (checklist and random doctors; cosine schedule).
      steps, prompts_per_step, num_generations, learning_rate: each arm's budget
        (constant learning rate, AdamW); num_microbatches: gradient accumulation of every
        RL update (memory only).
      heldout_every: steps between held-out evaluations.
    """

    dataset: str = "med_dialog_rubrics/default"
    num_train_cases: int | None = 400
    num_eval_cases: int | None = 50
    max_turns: int = 6
    max_new_tokens: int = 24
    max_context_tokens: int = 768
    temperature: float = 1.0
    init_from: str | None = None
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    tokenizer_vocab_size: int = 1024
    base_steps: int = 150
    base_batch_size: int = 8
    base_learning_rate: float = 3e-3
    base_max_length: int = 2048
    steps: int = 40
    prompts_per_step: int = 4
    num_generations: int = 4
    learning_rate: float = 3e-4
    num_microbatches: int = 1
    heldout_every: int = 10

    def task(self, expert, data_dir: str | None) -> consultation.ConsultationTask:
        return consultation.ConsultationTask(
            dataset=self.dataset, data_dir=data_dir, num_train_cases=self.num_train_cases,
            num_eval_questions=self.num_eval_cases, max_turns=self.max_turns,
            max_new_tokens=self.max_new_tokens, final_turn_tokens=self.max_new_tokens,
            max_context_tokens=self.max_context_tokens, expert=expert,
            temperature=self.temperature,
        )  # fmt: skip

    def base(self) -> dict[str, Any]:
        """`train_lib.train`'s model arguments for the base policy's run."""
        return comparisons.base_model(self)


SETTINGS = {
    # The report's setting: about 80 minutes for 3 seeds on 2 CPU cores.
    "cpu": Setting(),
    # SmolLM2-135M-Instruct as the base policy, sized for a seed in about an hour on 2 CPU
    # cores (32 minutes for the base, SFT, GRPO and GRAO, 2026-12-06): 4 updates of 2 cases
    # x 4 interviews per arm, 16 held-out cases. The quickstart's RL learning rate,
    # temperature and SFT learning rate.
    "smollm2": Setting(
        num_eval_cases=16,
        max_new_tokens=32,
        max_context_tokens=1024,
        temperature=0.7,
        init_from="smollm2",
        base_steps=16,
        base_batch_size=4,
        base_learning_rate=5e-5,
        base_max_length=1024,
        steps=4,
        prompts_per_step=2,
        learning_rate=1e-5,
        num_microbatches=2,
        heldout_every=4,
    ),
    # The notebook's CI setting: the whole protocol in about a minute, numbers meaningless.
    "tiny": Setting(
        dataset="med_dialog_rubrics/tiny",
        num_train_cases=None,
        num_eval_cases=2,
        max_turns=2,
        max_new_tokens=8,
        max_context_tokens=384,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        tokenizer_vocab_size=512,
        base_steps=2,
        base_batch_size=2,
        steps=2,
        prompts_per_step=2,
        num_generations=2,
        heldout_every=1,
    ),
}


def arm_stage(arm: str, setting: Setting) -> train_lib.SFTStage | train_lib.RLStage:
    """The one stage an arm runs from the base policy."""
    opt = functools.partial(optim.make_optimizer, learning_rate=setting.learning_rate)
    common = dict(steps=setting.steps, save_every=setting.steps, keep_checkpoints=1,
                  heldout_every=setting.heldout_every, optimizer=opt)  # fmt: skip
    if arm == "sft":
        return train_lib.SFTStage(
            name="arm", batch_size=setting.prompts_per_step, max_length=2048, **common
        )
    rl = dict(prompts_per_step=setting.prompts_per_step, num_generations=setting.num_generations,
              num_microbatches=setting.num_microbatches)  # fmt: skip
    if arm == "grpo":
        return train_lib.RLStage(name="arm", algorithm="grpo", loss=losses.grpo_loss, **rl,
                                 **common)  # fmt: skip
    switches = {
        "grao": {}, "grao_no_imitation": {"use_imitation": False},
        "grao_no_exploration": {"use_exploration": False},
        "grao_no_alignment": {"use_alignment": False},
    }  # fmt: skip
    if arm not in switches:
        raise ValueError(f"grpo_vs_grao: unknown arm {arm!r}; arms are {ARMS}.")
    loss = functools.partial(losses.grao_loss, beta=0.5, lam=0.6, **switches[arm])
    return train_lib.RLStage(name="arm", algorithm="grao", loss=loss, **rl, **common)


def base_policy(setting: Setting, seed: int, run_dir: str, data_dir: str | None) -> str:
    """Trains (or finds) the seed's base policy; returns its Hugging Face folder."""
    stage = train_lib.SFTStage(
        name="base", steps=setting.base_steps, batch_size=setting.base_batch_size,
        max_length=setting.base_max_length, save_every=setting.base_steps, keep_checkpoints=1,
        heldout_every=setting.base_steps,  # The arms' step 0.
        optimizer=functools.partial(
            optim.make_optimizer, learning_rate=setting.base_learning_rate, schedule="cosine",
            warmup_steps=max(setting.base_steps // 15, 1), final_fraction=0.1,
        ),
    )  # fmt: skip
    train_lib.train(
        run_dir, task=setting.task(BASE_EXPERTS, data_dir), **setting.base(), stages=[stage],
        seed=seed, mesh_shape=(1, 1, 1), evaluate=False, interactive=False,
    )  # fmt: skip
    return os.path.join(run_dir, "base", "export")


def _read_back(results: Mapping[str, Any], arm: str, seed: int) -> tuple[Any, Any]:
    """An earlier results.json's held-out and training curves of (arm, seed)."""
    return results["curves"][arm][str(seed)], results["training_curves"][arm][str(seed)]


def run(
    setting: Setting,
    seeds: Sequence[int],
    out_dir: str,
    *,
    arms: Sequence[str] = ARMS,
    data_dir: str | None = None,
    reuse: Sequence[str] = (),
) -> dict[str, Any]:
    """Every arm from every seed's base policy; writes and returns `results.json`'s dict.

    Runs resume: a finished base or arm is read back, not trained again, and so are the
    (arm, seed) results of `reuse`, earlier results.json files of the same setting.
    """
    t0 = time.perf_counter()
    earlier = comparisons.Earlier(reuse, setting)
    curves = {arm: {} for arm in arms}
    rewards = {arm: {} for arm in arms}
    base_scores = {}
    for seed in seeds:
        seed_dir = os.path.join(out_dir, f"seed{seed}")
        base = None
        for arm in arms:
            found = earlier.take("curves", arm, seed, _read_back)
            if found is not None:
                curves[arm][str(seed)], rewards[arm][str(seed)] = found
                base_scores[str(seed)] = curves[arm][str(seed)][0][1]  # Step 0 is the base.
                continue
            if base is None:
                base = base_policy(setting, seed, os.path.join(seed_dir, "base"), data_dir)
                base_scores[str(seed)] = _base_coverage(os.path.join(seed_dir, "base"))
            arm_dir = os.path.join(seed_dir, arm)
            train_lib.train(
                arm_dir, task=setting.task("oracle", data_dir), init_from=base,
                stages=[arm_stage(arm, setting)], seed=seed, mesh_shape=(1, 1, 1),
                evaluate=False, interactive=False,
            )  # fmt: skip
            points = [(0, base_scores[str(seed)]), *comparisons.curve(arm_dir, "arm", METRIC)]
            curves[arm][str(seed)] = points
            key = "loss" if arm == "sft" else "reward/mean"
            rewards[arm][str(seed)] = comparisons.curve(arm_dir, "arm", key)
    final = {arm: [curves[arm][str(s)][-1][1] for s in seeds] for arm in arms}
    claims = [c for c in CLAIMS if c[0] in arms and c[1] in arms]
    results = {
        "finding": "GRAO > GRPO > SFT, and each of GRAO's terms helps (arXiv 2508.07750)",
        "setting": dataclasses.asdict(setting),
        "seeds": list(seeds),
        "metric": f"{METRIC}: greedy interviews of {setting.num_eval_cases} validation cases",
        "base": {
            "heldout_coverage": comparisons.spread([base_scores[str(s)] for s in seeds]),
        },
        "final": {arm: comparisons.spread(v) for arm, v in final.items()},
        **comparisons.judge(final, claims),
        "curves": curves,
        "training_curves": rewards,
        "seconds": time.perf_counter() - t0,
        **earlier.provenance(),
        "machine": provenance.machine(),
        "versions": provenance.versions("jax", "flax", "optax", "numpy"),
    }
    comparisons.write_json(os.path.join(out_dir, "results.json"), results)
    plot(results, os.path.join(out_dir, "grpo_vs_grao.png"))
    return results


def _base_coverage(run_dir: str) -> float:
    """The base policy's held-out coverage: logged at its last SFT step, or (runs made
    before the base was evaluated that way) its run's `after_base` evaluation."""
    logged = comparisons.curve(run_dir, "base", METRIC)
    if logged:
        return logged[-1][1]
    with open(os.path.join(run_dir, "eval", "after_base.json"), encoding="utf-8") as f:
        return float(json.load(f)["coverage"])


def plot(results: dict[str, Any], path: str | None = None):
    """Held-out coverage and training reward per step, mean over seeds with min-max bands."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    seeds = len(results["seeds"])
    colors = {arm: f"C{i}" for i, arm in enumerate(results["curves"])}
    comparisons.plot_curves(
        results["curves"], ylabel="held-out weighted rubric coverage", ax=left, colors=colors,
        title=f"held-out coverage (greedy; {seeds} seed{'s' * (seeds > 1)}, min-max shaded)",
    )  # fmt: skip
    rl = {a: c for a, c in results["training_curves"].items() if a != "sft"}
    comparisons.plot_curves(rl, ylabel="mean training reward", title="training reward (sampled)",
                            ax=right, colors=colors)  # fmt: skip
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
        comparisons.publish(args.out, args.publish, ("results.json", "grpo_vs_grao.png"))
    for arm, s in results["final"].items():
        print(f"{arm:22s} final held-out coverage {s['mean']:.4f} +- {s['std']:.4f} {s['values']}")
    comparisons.print_verdict(results)
    print(f"{results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
