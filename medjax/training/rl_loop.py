"""An RLStage's loop, the same for every algorithm (`medjax.training.algorithms`):

    questions -> G episodes each through the agent loop (one sampler call per turn for all
    live episodes) -> the algorithm's rows (rewards, advantages) -> old log-probs (only when
    `num_iterations` > 1; otherwise the update is exactly on-policy) and reference
    log-probs (only when the algorithm's KL coefficient is not 0) -> `num_iterations`
    passes of `num_minibatches` optimizer steps of each policy.

M-GRPO trains a second policy (the sub-agent) when `shared_model` is False; decoupled,
its sub-agent runs in another process (`decoupled_loop`).
"""

import collections
import time
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from medjax import agents, multihost, sampling
from medjax.llm import JaxPolicyBackend
from medjax.models.transformer import DecoderLM
from medjax.training import algorithms, data, decoupled_loop, evaluation, runtime

PROGRESS_KEYS = ("reward/mean", "reward/correct", "reward/answered", "update/grad_norm")


def stop_without_tokens(stage, step: int, batch: Mapping[str, np.ndarray], trajs) -> None:
    """Raises TrainError when the step's rows hold no token to train (`loss_mask` and, for
    GRAO, `ref_loss_mask` all 0): every episode ended before its policy wrote a token, so
    the update would be on nothing, and the stage would export an untrained policy with
    exit status 0. Names the episodes' finish reasons."""
    if any(np.any(v) for k, v in batch.items() if k.endswith("loss_mask")):
        return
    reasons = collections.Counter(getattr(t, "finish_reason", None) for t in trajs)
    shown = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=str))
    raise runtime.TrainError(
        f"RLStage {stage.name!r}: step {step + 1}: no token to train in {len(trajs)} episodes"
        f" (finish reasons: {shown}); the task's max_context_tokens or max_new_tokens leaves"
        " the policy no room. Stopped instead of training on nothing."
    )


def _sub_policy(run, stage, model, sub_model, tx, loss_fn, temperature) -> runtime.Policy:
    """M-GRPO's separate sub-agent: from `stage.sub_init_from`, else the previous RL
    stage's sub-agent, else a copy of the stage's starting policy."""
    if stage.sub_init_from:
        where = f"RLStage {stage.name!r}: sub_init_from"
        start = run.load_policy(where, stage.sub_init_from)
    else:
        start = sub_model if sub_model is not None else model
    copy = nnx.merge(nnx.split(start, nnx.Param)[0], runtime.params_copy(start))
    return runtime.Policy(run, copy, tx, loss_fn, stage.num_microbatches, temperature)


def _reference(run, stage, model, policy: runtime.Policy):
    """The KL term's frozen reference weights: `stage.reference`, else the policy's at the
    stage's start (a LoRA policy's: its base, the adapters off, sharing the base's buffers)."""
    if stage.reference:
        where = f"RLStage {stage.name!r}: reference"
        model = run.load_policy(where, stage.reference)
    elif policy.state.frozen is not None:
        return policy.adapters_off()
    return runtime.params_copy(model)


def run_rl(
    run: runtime.Run, stage, model: DecoderLM, sub_model: DecoderLM | None = None
) -> tuple[DecoderLM, DecoderLM | None]:
    """One RL stage from `model` (and M-GRPO's distinct sub-agent from `sub_model`, else
    `stage.sub_init_from` or a copy of `model`); returns the trained (policy, sub policy)."""
    if stage.decoupled is not None and stage.decoupled.role == "sub":
        return decoupled_loop.run_sub(run, stage, model), None
    method = stage.method
    task, tok = run.task, run.tokenizer
    temperature = task.temperature
    loss_fn = method.loss_fn(stage, temperature)
    total = stage.steps * stage.num_iterations * stage.num_minibatches
    policy = runtime.Policy(run, model, stage.optimizer(total_steps=total), loss_fn,
                            stage.num_microbatches, temperature)  # fmt: skip
    main_side = None
    if stage.decoupled is not None:
        main_side = decoupled_loop.MainSide(stage.decoupled, stage, runtime.run_id(run.run_dir))
    sub = None
    if method.hierarchical and not stage.shared_model and main_side is None:
        sub_tx = (stage.sub_optimizer or stage.optimizer)(total_steps=total)
        sub = _sub_policy(run, stage, model, sub_model, sub_tx, loss_fn, temperature)
    reference = _reference(run, stage, model, policy) if method.kl_beta(stage) else None
    pool = runtime.stage_records(run, stage)
    stream = data.IndexStream(len(pool), stage.prompts_per_step, run.seed)
    ckpt, writer = runtime.stage_outputs(run, stage, PROGRESS_KEYS)
    states = (policy.state,) if sub is None else (policy.state, sub.state)
    states, start, _ = runtime.restore(ckpt, states, writer, stage.name)
    policy.state = states[0]
    if sub is not None:
        sub.state = states[1]
    writer.start(start)
    bad = runtime.BadSteps(run.max_bad_steps, stage.name, ckpt.directory)
    last_good = start or None
    base_key = jax.random.PRNGKey(run.seed)
    for step in range(start, stage.steps):
        run.write_config()
        compiles_before = sampling.compile_count()
        t0 = time.perf_counter()
        picked = [pool[i] for i in stream[step]]
        records = [run.data.records[i] for i in picked]
        hops = [r["hops"] for r in records if isinstance(r, Mapping) and "hops" in r]
        seed = runtime.step_seed(base_key, step)
        t_wait = 0.0 if main_side is None else main_side.before_step(step, seed + 1)
        # Each process runs the episodes of its block of the questions on its own copy of
        # the policy; the trajectories are then gathered (`medjax.multihost`).
        backend = JaxPolicyBackend(multihost.local_copy(policy.model()), tok, seed=seed)
        hierarchy = {}
        if method.hierarchical:
            sub_backend = None
            if sub is not None:
                sub_copy = multihost.local_copy(sub.model())
                sub_backend = JaxPolicyBackend(sub_copy, tok, seed=seed + 1)
            hierarchy = dict(
                sub_backend=sub_backend, hierarchical=True,
                remote_sub_agent=None if main_side is None else main_side.client,
            )  # fmt: skip
        mine = records[multihost.share(len(records))]
        trajs = task.rollout(
            run.env, backend, mine, num_generations=stage.num_generations, **hierarchy
        )
        if jax.process_count() > 1:
            print(
                f"{stage.name} step {step + 1}: process {jax.process_index()} ran"
                f" {len(trajs)} episodes ({len(mine)} of {len(records)} questions)", flush=True,
            )  # fmt: skip
            trajs = [
                agents.Trajectory.from_dict(t)
                for t in multihost.gather_json([t.to_dict() for t in trajs])
            ]
        t_rollout = time.perf_counter() - t0 - t_wait
        # The rollouts' KV caches are done with: free them before the update.
        for used in (backend, hierarchy.get("sub_backend")):
            if used is not None:
                used.clear_cache()
        rows = method.rows(
            stage, algorithms.Rollouts(trajs, records, picked, step, base_key, run, main_side)
        )
        stop_without_tokens(stage, step, rows.policy, trajs)
        jobs = [(policy, rows.policy)] + ([] if rows.sub is None else [(sub, rows.sub)])
        update_metrics, t_scoring, t_update = runtime.score_and_update(
            run, stage, jobs, reference, bad, step, last_good
        )
        extra = {} if main_side is None else {"time/wait_sub_s": t_wait}
        if hops:
            extra["data/hops_mean"] = float(np.mean(hops))
        scalars = {
            **rows.stats, **update_metrics, **extra,
            "tokens_per_s": rows.stats["generated_tokens"] / max(t_rollout, 1e-9),
            "time/rollout_s": t_rollout, "time/scoring_s": t_scoring, "time/update_s": t_update,
            "time/step_s": time.perf_counter() - t0,
            "compile/sampler_new": sampling.compile_count() - compiles_before,
            "compile/sampler_total": sampling.compile_count(),
            "compile/train_step": policy.step_fn._cache_size(),
        }  # fmt: skip
        scalars.update(evaluation.heldout(
            run, stage, step + 1, policy.model, None if sub is None else sub.model,
            hierarchical=method.hierarchical,
        ))  # fmt: skip
        writer.write(step + 1, scalars)
        if ckpt.should_save(step + 1, step + 1 == stage.steps):
            saved = (policy.state,) if sub is None else (policy.state, sub.state)
            ckpt.save(step + 1, saved, {"step": step + 1, "data_step": step + 1})
            last_good = step + 1
    ckpt.close()
    writer.close()
    if main_side is not None:
        main_side.progress(done=True)
    return policy.model(), None if sub is None else sub.model()
