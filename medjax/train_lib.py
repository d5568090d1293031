"""The trainer: SFT on expert chats, then online RL (GRPO family, GRAO or M-GRPO), with
orbax checkpoints, automatic resume, metrics and before/after evaluation.

`run_train.py` parses gin and calls `train()`; gin binds its arguments and the stages':

    train_lib.train.run_dir = '/tmp/run'
    train_lib.train.stages = [@train_lib.SFTStage(), @train_lib.RLStage()]
    train_lib.RLStage.algorithm = 'grpo'          # or 'grao', 'mgrpo'
    train_lib.RLStage.loss = @losses.grpo_loss    # options bound on losses.grpo_loss

A run directory holds `run.json` (what it is: its settings, compared on a rerun),
`config.gin` (the operative config, written by process 0 at step 0), `tokenizer/` (trained
when no checkpoint gives one), one folder per stage (`checkpoints/`, `metrics.jsonl`,
TensorBoard events, `export/`: the stage's final policy as a Hugging Face folder), `eval/`
(one JSON per evaluation point) and
`results.json` / `results.md` with the before/after table. Stages run in order; each starts
from the previous one's policy. Running the same command again resumes: finished stages
are skipped (their exports loaded), an unfinished one restores its latest checkpoint (onto
the current mesh) and continues with the same data, since batches are addressed by step.

One RL step: a batch of questions -> G episodes each through the agent loop (one sampler
call per turn for all live episodes) -> rewards -> advantages -> old log-probs (only when
`num_iterations` > 1; otherwise the update is exactly on-policy) and reference log-probs
(only when `kl_beta` != 0) -> `num_iterations` passes of `num_minibatches` optimizer steps.
"""

import dataclasses
import errno
import functools
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medjax import losses, partitioning, sampling
from medjax import store as store_lib
from medjax.llm import JaxPolicyBackend
from medjax.models import checkpoint as checkpoint_lib
from medjax.models import tokenizer as tokenizer_lib
from medjax.models.config import ModelConfig
from medjax.models.transformer import DecoderLM
from medjax.training import checkpoints, data, metrics, optim, rl, steps
from medjax.training import decoupled as decoupled_lib
from medjax.training import validate as validate_lib

ALGORITHMS = validate_lib.ALGORITHMS
RUN_FILE = "run.json"
# Writes that fail because the disk (or the user's quota, or the file size limit) is full.
_NO_SPACE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "no space left (disk quota exceeded)",
    errno.EFBIG: "no space left (file too large for the file size limit)",
}


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def _validated(check: Callable[..., None], *args) -> None:
    """Runs a `validate_lib` check; its SettingError becomes a TrainError."""
    try:
        check(*args)
    except validate_lib.SettingError as e:
        raise TrainError(str(e)) from None


def _fields(stage) -> dict[str, Any]:
    return {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}


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
        _validated(validate_lib.sft_stage, _fields(self), rl.ROLES)


@dataclasses.dataclass(frozen=True)
class RLStage:
    """Online RL on the task's training questions.

    Attributes:
      name: the stage's folder in the run directory.
      algorithm: "grpo" (any `losses.grpo_loss` variant: bind the loss's options), "grao"
        (`losses.grao_loss`; the reference answer of each question is its expert chat) or
        "mgrpo" (main agent delegating to a searching sub-agent; `losses.mgrpo_policy_loss`).
      steps: rollout batches.
      prompts_per_step: questions per rollout batch.
      num_generations: G episodes per question (K rollouts for M-GRPO).
      num_iterations: passes over each rollout batch (old log-probs are scored when > 1).
      num_minibatches: optimizer steps per pass (rows split in order, by question).
      num_microbatches: gradient accumulation inside each optimizer step.
      loss: the loss, its options bound in gin; None picks the algorithm's default.
      kl_beta: GRPO's KL coefficient (passed to the loss as `beta`); != 0 scores a
        reference model.
      reference: a Hugging Face folder for the reference model; None: the stage's initial
        policy, frozen.
      advantage_scale, advantage_ddof: `losses.group_advantages` options (GRPO).
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
    algorithm: str = "grpo"
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

    def validate(self) -> None:
        """Raises TrainError naming the first field that cannot run (type, range, algorithm,
        combinations such as rows that do not split into minibatches)."""
        _validated(validate_lib.rl_stage, _fields(self))


# ---------------------------------------------------------------------------------------
# Set-up: run directory, data, tokenizer, model.


def _check_run_dir(run_dir: str, stages: Sequence[Any]) -> bool:
    """Whether `run_dir` holds a run to resume; raises if it holds anything else."""
    if not os.path.exists(run_dir):
        return False
    if not os.path.isdir(run_dir):
        raise TrainError(f"run_dir {run_dir} is a file, not a directory.")
    entries = [e for e in os.listdir(run_dir) if not e.startswith(".")]
    if not entries:
        return False
    if RUN_FILE not in entries:
        raise TrainError(
            f"run_dir {run_dir} is not empty and is not a medjax run (no {RUN_FILE}); choose"
            " an empty or new directory. Nothing was written."
        )
    for stage in stages:
        try:
            checkpoints._check_directory(os.path.join(run_dir, stage.name, "checkpoints"))
        except checkpoints.CheckpointDirError as e:
            raise TrainError(str(e)) from None
    return True


def _load_data(task, env) -> rl.TaskData:
    try:
        loaded = task.load(env)
    except (ValueError, KeyError) as e:
        raise TrainError(str(e)) from None
    if not loaded.chats:
        raise TrainError(f"{type(task).__name__}.dataset {task.dataset!r}: no expert chats.")
    if not loaded.eval_records:
        raise TrainError(
            f"no held-out questions: {task.dataset} split {task.eval_split!r} gives none with"
            f" {type(task).__name__}.num_eval_questions is {task.num_eval_questions}."
        )
    return loaded


def _loaded(what: str, path: str, load: Callable[[], Any]) -> Any:
    """`load()`, with any failure (a truncated or corrupt file: CheckpointError, or whatever
    the readers below it raise) as one TrainError naming the path."""
    try:
        return load()
    except TrainError:
        raise
    # safetensors, tokenizers, json, gguf: the readers below raise many types.
    except Exception as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        if os.fspath(path) not in detail:
            detail = f"{os.fspath(path)}: {detail}"
        raise TrainError(f"{what}: cannot load {detail}") from None


def _load_policy(what: str, path: str, mesh, dtype=None) -> DecoderLM:
    """`checkpoint_lib.from_pretrained`, a failure as one TrainError naming the path."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    return _loaded(what, path, lambda: checkpoint_lib.from_pretrained(path, mesh=mesh, **kwargs))


def _tokenizer(run_dir, init_from, chats, vocab_size: int, fresh: bool, chat_template):
    """(tokenizer, whether to save it in run_dir/tokenizer); nothing is written here."""
    path = os.path.join(run_dir, "tokenizer")
    if init_from is not None:
        tok = _loaded("init_from", init_from, lambda: tokenizer_lib.load_tokenizer(init_from))
        if chat_template == "chatml":
            # Templates that rewrite past turns (Qwen3 drops old <think> blocks) cannot hold
            # the exact sampled ids of a multi-turn episode; ChatML renders turns verbatim.
            tok.chat_template = tokenizer_lib.CHAT_TEMPLATE
        return tok, False
    if not fresh and os.path.exists(os.path.join(path, "tokenizer.json")):
        return _loaded("run_dir", path, lambda: tokenizer_lib.load_tokenizer(path)), False
    texts = (m["content"] for c in chats for m in c["messages"])
    return tokenizer_lib.train_bpe(texts, vocab_size), True


def _init_model(config, init_from, tokenizer, seed, mesh, dtype) -> DecoderLM:
    if init_from is not None:
        return _load_policy("init_from", init_from, mesh, dtype)
    config = config.replace(vocab_size=len(tokenizer))
    with jax.set_mesh(mesh):
        model = DecoderLM(config, rngs=nnx.Rngs(seed))
    return partitioning.shard_module(model, mesh)


def _save_policy(graphdef, params, tokenizer, path: str) -> None:
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint_lib.save_pretrained(nnx.merge(graphdef, params), tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Evaluation.


def evaluate_policy(
    task, env, model, tokenizer, records, *, seed: int = 0, sub_model=None,
    hierarchical: bool = False,
) -> dict:  # fmt: skip
    """Greedy episodes of the task's agent on `records` (`task.evaluate`); `hierarchical`:
    M-GRPO's main agent over its sub-agent (`sub_model`, default `model`)."""
    backend = JaxPolicyBackend(model, tokenizer, seed=seed)
    if not hierarchical:
        return task.evaluate(env, backend, records)
    sub = backend if sub_model is None else JaxPolicyBackend(sub_model, tokenizer, seed=seed)
    return task.evaluate(env, backend, records, sub_backend=sub, hierarchical=True)


# ---------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Run:
    run_dir: str
    task: Any  # rl.ResearchTask, consultation.ConsultationTask
    env: Any
    data: rl.TaskData
    tokenizer: Any
    mesh: Any
    seed: int
    max_bad_steps: int
    interactive: bool | None
    operative_config: Callable[[], str] | None
    config_written: bool = False
    heldout_rows: list | None = None  # The expert's held-out chats, tokenised (expert_nll).

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            k: jax.device_put(v, partitioning.batch_sharding(self.mesh, v.ndim))
            for k, v in batch.items()
        }

    def write_config(self) -> None:
        if self.config_written or jax.process_index() != 0:
            return
        self.config_written = True
        path = os.path.join(self.run_dir, "config.gin")
        if self.operative_config is not None and not os.path.exists(path):
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.operative_config())


def _mean_metrics(items: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    keys = items[0].keys() if items else ()
    return {k: float(np.mean([float(m[k]) for m in items])) for k in keys}


class _BadSteps:
    def __init__(self, limit: int, stage: str, directory: str):
        self.limit, self.stage, self.directory, self.in_a_row, self.total = (
            limit,
            stage,
            directory,
            0,
            0,
        )

    def update(self, skipped: float, step: int, last_good: int | None) -> None:
        if skipped:
            self.in_a_row += 1
            self.total += 1
        else:
            self.in_a_row = 0
        if self.in_a_row > self.limit:
            where = f"step {last_good} in {self.directory}" if last_good else "none saved yet"
            raise TrainError(
                f"stage {self.stage!r}: {self.in_a_row} non-finite losses or gradients in a row"
                f" (up to step {step}); stopped. Last good checkpoint: {where}. Lower the"
                " learning rate or check the data."
            )


def _stage_outputs(run: _Run, stage, progress_keys):
    """The stage's checkpointer and metrics writer."""
    ckpt = checkpoints.Checkpointer(
        os.path.join(run.run_dir, stage.name, "checkpoints"), save_every=stage.save_every,
        keep=stage.keep_checkpoints,
    )  # fmt: skip
    writer = metrics.MetricsWriter(
        run.run_dir, subdir=stage.name, total_steps=stage.steps,
        is_writer=jax.process_index() == 0, interactive=run.interactive, desc=stage.name,
        progress_keys=progress_keys,
    )  # fmt: skip
    return ckpt, writer


def _restore(ckpt: checkpoints.Checkpointer, state, writer, name: str):
    """(state, step, meta) of the latest checkpoint, or (state, 0, {}). Metric records of
    later steps are dropped: a run killed before (or while) saving repeats those steps."""
    latest = ckpt.latest_step()
    if latest is None:
        dropped = writer.truncate_after(0)
        if dropped:
            print(f"{name}: no checkpoint; {dropped} earlier metric records dropped", flush=True)
        return state, 0, {}
    state, meta = ckpt.restore(latest, state)
    dropped = writer.truncate_after(latest)
    print(
        f"{name}: resumed from step {latest} ({dropped} later metric records dropped)", flush=True
    )
    return state, int(meta["step"]), meta


def _heldout(run: _Run, stage, step: int, model_fn, sub_fn=None) -> dict[str, float]:
    """`heldout/<key>` of a greedy held-out evaluation on `stage.heldout_every` steps
    (M-GRPO stages evaluate the main agent over the sub-agent)."""
    every = stage.heldout_every
    if not every or (step % every and step != stage.steps):
        return {}
    result = evaluate_policy(
        run.task, run.env, model_fn(), run.tokenizer, run.data.eval_records, seed=run.seed,
        sub_model=None if sub_fn is None else sub_fn(),
        hierarchical=getattr(stage, "algorithm", None) == "mgrpo",
    )  # fmt: skip
    return {f"heldout/{k}": float(result[k]) for k in run.task.result_keys if k in result}


def _run_sft(run: _Run, stage: SFTStage, model: DecoderLM) -> DecoderLM:
    tx = stage.optimizer(total_steps=stage.steps)
    graphdef, state = steps.create_state(model, tx, run.seed, run.mesh)
    rows = [
        data.chat_ids(run.tokenizer, messages, max_observation_chars=run.task.max_observation_chars)
        for role in stage.roles
        for messages in run.task.sft_chats(run.env, run.data.chats, role)
    ]
    stream = data.IndexStream(len(rows), stage.batch_size, run.seed)
    step_fn = steps.make_train_step(
        graphdef, tx, steps.sft_loss_fn, num_microbatches=stage.num_microbatches,
        state_shardings=steps.shardings_of(state),
    )  # fmt: skip
    ckpt, writer = _stage_outputs(run, stage, ("loss", "grad_norm", "tokens_per_s"))
    state, start, _ = _restore(ckpt, state, writer, stage.name)
    writer.start(start)
    bad = _BadSteps(run.max_bad_steps, stage.name, ckpt.directory)
    pad_id = run.tokenizer.pad_token_id
    last_good = start or None
    for step in range(start, stage.steps):
        run.write_config()
        t0 = time.perf_counter()
        picked = [rows[i] for i in stream[step]]
        width = data.bucket(min(max(len(ids) for ids, _ in picked), stage.max_length))
        width = min(width, stage.max_length)
        batch = data.pad_rows(picked, width, pad_id=pad_id)
        state, m = step_fn(state, run.put(batch))
        m = jax.device_get(m)
        elapsed = time.perf_counter() - t0
        tokens = int(batch["attention_mask"].sum())
        scalars = {
            "loss": m["loss"], "grad_norm": m["grad_norm"], "update_skipped": m["update_skipped"],
            "num_tokens": m["num_tokens"], "tokens_per_s": tokens / elapsed,
            "time/update_s": elapsed, "compile/train_step": step_fn._cache_size(),
        }  # fmt: skip
        final = step + 1 == stage.steps
        scalars.update(
            _heldout(run, stage, step + 1, functools.partial(nnx.merge, graphdef, state.params))
        )
        writer.write(step + 1, scalars)
        bad.update(float(m["update_skipped"]), step + 1, last_good)
        if ckpt.should_save(step + 1, final):
            ckpt.save(step + 1, state, {"step": step + 1, "data_step": step + 1})
            last_good = step + 1
    ckpt.close()
    writer.close()
    return nnx.merge(graphdef, state.params)


def _loss_for(stage: RLStage, temperature: float):
    if stage.algorithm == "grao":
        loss = stage.loss or losses.grao_loss
        return steps.grao_loss_fn(
            loss, num_generations=stage.num_generations, temperature=temperature
        )
    if stage.algorithm == "mgrpo":
        loss = stage.loss or losses.mgrpo_policy_loss
    else:
        base = stage.loss or losses.grpo_loss
        loss = functools.partial(base, beta=stage.kl_beta) if stage.kl_beta else base
    return steps.policy_loss_fn(loss, temperature=temperature)


def _minibatches(batch: Mapping[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    if count == 1:
        return [dict(batch)]
    out = [{} for _ in range(count)]
    for k, v in batch.items():
        if v.shape[0] % count:
            raise TrainError(
                f"RLStage: {v.shape[0]} rows of {k!r} do not split into {count} minibatches."
            )
        for i, part in enumerate(np.split(v, count)):
            out[i][k] = part
    return out


class _Policy:
    """One trained model: its state, step function and scorer."""

    def __init__(self, run: _Run, model, tx, loss_fn, num_microbatches: int, temperature: float):
        self.graphdef, self.state = steps.create_state(model, tx, run.seed, run.mesh)
        self.step_fn = steps.make_train_step(
            self.graphdef, tx, loss_fn, num_microbatches=num_microbatches,
            state_shardings=steps.shardings_of(self.state),
        )  # fmt: skip
        self.score = steps.make_score_fn(self.graphdef, temperature=temperature)

    def model(self):
        return nnx.merge(self.graphdef, self.state.params)


def _params_copy(model: DecoderLM):
    """The model's parameters in new buffers: a policy's update donates (reuses) its own,
    and nnx.merge of the same state would share the Variables themselves."""
    return jax.tree.map(lambda x: x.copy(), nnx.split(model, nnx.Param)[1])


def _score_and_update(run: _Run, stage: RLStage, jobs, reference, bad, step: int, last_good):
    """Old / reference log-probs where needed, then `num_iterations` passes of
    `num_minibatches` updates of each (policy, batch) job. Returns (update metrics,
    scoring s, update s)."""
    t1 = time.perf_counter()
    for job_policy, job_batch in jobs:
        if "old_logps" in job_batch:
            if stage.num_iterations > 1:
                job_batch["old_logps"] = np.asarray(
                    job_policy.score(
                        job_policy.state.params, job_batch["input_ids"],
                        job_batch["attention_mask"], job_batch["loss_mask"],
                    )
                )  # fmt: skip
            else:
                del job_batch["old_logps"]  # Exactly on-policy: ratio 1.
        if reference is not None:
            job_batch["ref_logps"] = np.asarray(
                job_policy.score(
                    reference, job_batch["input_ids"], job_batch["attention_mask"],
                    job_batch["loss_mask"],
                )
            )  # fmt: skip
    t_scoring = time.perf_counter() - t1
    t2 = time.perf_counter()
    updates = []
    for _ in range(stage.num_iterations):
        for job_policy, job_batch in jobs:
            for part in _minibatches(job_batch, stage.num_minibatches):
                job_policy.state, m = job_policy.step_fn(job_policy.state, run.put(part))
                m = jax.device_get(m)
                updates.append(m)
                bad.update(float(m["update_skipped"]), step + 1, last_good)
    update_metrics = _mean_metrics(
        [{k: v for k, v in m.items() if np.ndim(v) == 0} for m in updates]
    )
    return (
        {f"update/{k}": v for k, v in update_metrics.items()},
        t_scoring,
        time.perf_counter() - t2,
    )


def _step_seed(base_key, step: int) -> int:
    return int(jax.random.randint(jax.random.fold_in(base_key, step), (), 0, 2**31 - 1))


def _sub_alignment_key(base_key, step: int):
    return jax.random.fold_in(base_key, 10**6 + step)


def _run_id(run_dir: str) -> str:
    with open(os.path.join(run_dir, RUN_FILE), encoding="utf-8") as f:
        return f"{run_dir} (created {json.load(f)['created']:.3f})"


def _claimed_store(config: decoupled_lib.Decoupled, role: str, run_id: str):
    try:
        store = store_lib.open_store(config.store)
        decoupled_lib.claim(store, role, run_id)
    except Exception as e:  # The first contact: a wrong URL, no server, another run's store.
        raise TrainError(f"Decoupled.store {config.store}: {e}") from None
    return store


class _MainSide:
    """Decoupled M-GRPO's main process: the remote sub-agent and the store."""

    def __init__(self, config: decoupled_lib.Decoupled, stage: RLStage, run_id: str):
        self.config, self.stage = config, stage
        self.store = _claimed_store(config, "main", run_id)
        self.epoch = decoupled_lib.next_epoch(self.store)
        self.client = decoupled_lib.RemoteSubAgent(
            self._url, self.epoch, on_failure=config.on_sub_failure,
            timeout=config.request_timeout_s, status_every=config.status_every_s,
            secret_env=config.secret_env,
        )  # fmt: skip
        self.published = 0
        print(f"{stage.name}: main trainer, epoch {self.epoch}, store {config.store}", flush=True)
        self._wait(
            self.client.healthy, poll=0.5,
            status=lambda w: f"main: waiting for the sub-agent to start ({w:.0f} s)",
        )  # fmt: skip

    def _wait(self, predicate, status, poll: float = 0.1) -> None:
        try:
            decoupled_lib.wait_for(
                predicate, timeout=self.config.wait_timeout_s, every=self.config.status_every_s,
                status=status, poll=poll,
            )  # fmt: skip
        except decoupled_lib.WaitTimeoutError as e:
            raise TrainError(f"stage {self.stage.name!r}: {e}") from None

    def _url(self) -> str | None:
        if self.config.sub_url:
            return self.config.sub_url
        return (self.store.get("sub/progress") or {}).get("url")

    def before_step(self, step: int, seed: int) -> float:
        """Waits for the sub trainer when lockstep asks it; returns the seconds waited."""
        t0 = time.perf_counter()
        lag = self.config.max_sub_lag
        if lag is not None and step - lag > 0:
            need = step - lag

            def applied():
                return (self.store.get("sub/progress") or {}).get("applied_steps", 0) >= need

            self._wait(
                applied,
                status=lambda w: f"main: step {step} waits for the sub trainer to apply {need}"
                f" steps ({w:.0f} s)",
            )  # fmt: skip
        self.client.begin_step(step, seed)
        return time.perf_counter() - t0

    def publish(self, step: int, trajs, terms, main_rewards) -> dict[str, float]:
        new = decoupled_lib.publish_step(
            self.store, step, self.epoch, step, trajs, terms, main_rewards,
            self.stage.num_generations,
        )  # fmt: skip
        self.published = step + 1
        self.progress(done=False)
        sub = self.store.get("sub/progress") or {}
        return {
            "decoupled/published_new": float(new),
            "decoupled/delegate_failures": float(sum(t.tool_failures for t in trajs)),
            "decoupled/sub_lag_steps": float(step + 1 - sub.get("applied_steps", 0)),
            "decoupled/sub_version": float(sub.get("version", 0)),
        }

    def progress(self, done: bool) -> None:
        self.store.put("main/progress", {
            "published_steps": self.published, "epoch": self.epoch, "time": time.time(),
            "delegate_failures": self.client.failures, "done": done,
        })  # fmt: skip


def _run_rl(
    run: _Run, stage: RLStage, model: DecoderLM, sub_model: DecoderLM | None = None
) -> tuple[DecoderLM, DecoderLM | None]:
    """One RL stage from `model` (and M-GRPO's distinct sub-agent from `sub_model`, else
    `stage.sub_init_from` or a copy of `model`); returns the trained (policy, sub policy)."""
    if stage.decoupled is not None and stage.decoupled.role == "sub":
        return _run_sub(run, stage, model), None
    task, tok = run.task, run.tokenizer
    temperature = task.temperature
    loss_fn = _loss_for(stage, temperature)
    total = stage.steps * stage.num_iterations * stage.num_minibatches
    policy = _Policy(run, model, stage.optimizer(total_steps=total), loss_fn,
                     stage.num_microbatches, temperature)  # fmt: skip
    main_side = None
    if stage.decoupled is not None:
        main_side = _MainSide(stage.decoupled, stage, _run_id(run.run_dir))
    sub = None
    if stage.algorithm == "mgrpo" and not stage.shared_model and main_side is None:
        sub_tx = (stage.sub_optimizer or stage.optimizer)(total_steps=total)
        if stage.sub_init_from:
            where = f"RLStage {stage.name!r}: sub_init_from"
            start_sub = _load_policy(where, stage.sub_init_from, run.mesh)
        else:
            start_sub = sub_model if sub_model is not None else model
        copy = nnx.merge(nnx.split(start_sub, nnx.Param)[0], _params_copy(start_sub))
        sub = _Policy(run, copy, sub_tx, loss_fn, stage.num_microbatches, temperature)
    reference = None
    if stage.kl_beta and stage.algorithm == "grpo":
        ref_model = (
            _load_policy(f"RLStage {stage.name!r}: reference", stage.reference, run.mesh)
            if stage.reference
            else model
        )
        reference = _params_copy(ref_model)
    references = None
    if stage.algorithm == "grao":
        references = []
        for c in run.data.chats:
            ids, mask = data.chat_ids(
                tok, c["messages"], max_observation_chars=task.max_observation_chars
            )
            references.append((ids, mask, task.reference_reward(c)))
    pool = _stage_records(run, stage)
    stream = data.IndexStream(len(pool), stage.prompts_per_step, run.seed)
    ckpt, writer = _stage_outputs(
        run, stage, ("reward/mean", "reward/correct", "reward/answered", "update/grad_norm")
    )
    states = (policy.state,) if sub is None else (policy.state, sub.state)
    states, start, _ = _restore(ckpt, states, writer, stage.name)
    policy.state = states[0]
    if sub is not None:
        sub.state = states[1]
    writer.start(start)
    bad = _BadSteps(run.max_bad_steps, stage.name, ckpt.directory)
    pad_id = tok.pad_token_id
    last_good = start or None
    base_key = jax.random.PRNGKey(run.seed)
    for step in range(start, stage.steps):
        run.write_config()
        compiles_before = sampling.compile_count()
        t0 = time.perf_counter()
        picked = [pool[i] for i in stream[step]]
        records = [run.data.records[i] for i in picked]
        hops = [r["hops"] for r in records if isinstance(r, Mapping) and "hops" in r]
        step_seed = _step_seed(base_key, step)
        t_wait = 0.0 if main_side is None else main_side.before_step(step, step_seed + 1)
        backend = JaxPolicyBackend(policy.model(), tok, seed=step_seed)
        sub_backend = (
            None if sub is None else JaxPolicyBackend(sub.model(), tok, seed=step_seed + 1)
        )
        hierarchy = {}
        if stage.algorithm == "mgrpo":
            hierarchy = dict(
                sub_backend=sub_backend, hierarchical=True,
                remote_sub_agent=None if main_side is None else main_side.client,
            )  # fmt: skip
        trajs = task.rollout(
            run.env, backend, records, num_generations=stage.num_generations, **hierarchy
        )
        t_rollout = time.perf_counter() - t0 - t_wait
        extra = {}
        if stage.algorithm == "grpo":
            rewards, stats = task.score(run.env, trajs, records, stage.num_generations)
            batch, more = rl.grpo_batch(
                trajs, rewards, stage.num_generations, pad_id=pad_id,
                scale=stage.advantage_scale, ddof=stage.advantage_ddof,
            )  # fmt: skip
            stats.update(more)
            jobs = [(policy, batch)]
        elif stage.algorithm == "grao":
            rewards, stats = task.score(run.env, trajs, records, stage.num_generations)
            refs = [references[i] for i in picked]
            batch, more = rl.grao_batch(trajs, rewards, refs, pad_id=pad_id)
            stats.update(more)
            jobs = [(policy, batch)]
        elif main_side is not None:
            main, terms, main_rewards, stats = rl.mgrpo_main_batch(
                trajs, records, stage.num_generations, reward=task.reward, pad_id=pad_id
            )
            extra = main_side.publish(step, trajs, terms, main_rewards)
            extra["time/wait_sub_s"] = t_wait
            jobs = [(policy, main)]
        else:
            main, subs, stats = rl.mgrpo_batches(
                trajs, records, stage.num_generations, stage.sub_target_count,
                _sub_alignment_key(base_key, step), reward=task.reward, pad_id=pad_id,
                align=stage.sub_alignment,
            )  # fmt: skip
            if sub is None:
                width = max(main["input_ids"].shape[1], subs["input_ids"].shape[1])
                both = [_widen(main, width, pad_id), _widen(subs, width, pad_id)]
                jobs = [(policy, {k: np.concatenate([b[k] for b in both]) for k in main})]
            else:
                jobs = [(policy, main), (sub, subs)] if stage.train_sub else [(policy, main)]
        update_metrics, t_scoring, t_update = _score_and_update(
            run, stage, jobs, reference, bad, step, last_good
        )
        elapsed = time.perf_counter() - t0
        if hops:
            extra["data/hops_mean"] = float(np.mean(hops))
        scalars = {
            **stats, **update_metrics, **extra,
            "tokens_per_s": stats["generated_tokens"] / max(t_rollout, 1e-9),
            "time/rollout_s": t_rollout, "time/scoring_s": t_scoring, "time/update_s": t_update,
            "time/step_s": elapsed,
            "compile/sampler_new": sampling.compile_count() - compiles_before,
            "compile/sampler_total": sampling.compile_count(),
            "compile/train_step": policy.step_fn._cache_size(),
        }  # fmt: skip
        final = step + 1 == stage.steps
        scalars.update(_heldout(run, stage, step + 1, policy.model,
                                None if sub is None else sub.model))  # fmt: skip
        writer.write(step + 1, scalars)
        if ckpt.should_save(step + 1, final):
            saved = (policy.state,) if sub is None else (policy.state, sub.state)
            ckpt.save(step + 1, saved, {"step": step + 1, "data_step": step + 1})
            last_good = step + 1
    ckpt.close()
    writer.close()
    if main_side is not None:
        main_side.progress(done=True)
    return policy.model(), None if sub is None else sub.model()


def _run_sub(run: _Run, stage: RLStage, model: DecoderLM) -> DecoderLM:
    """Decoupled M-GRPO's sub process: serves the sub-agent and trains it on each published
    main step, in order, from its own logged sub-trajectories (`medjax.training.decoupled`).
    """
    config, task, tok = stage.decoupled, run.task, run.tokenizer
    store = _claimed_store(config, "sub", _run_id(run.run_dir))
    stage_dir = os.path.join(run.run_dir, stage.name)
    log = store_lib.FileStore(os.path.join(stage_dir, "sub_trajectories"))
    total = stage.steps * stage.num_iterations * stage.num_minibatches
    tx = (stage.sub_optimizer or stage.optimizer)(total_steps=total)
    policy = _Policy(run, model, tx, _loss_for(stage, task.temperature), stage.num_microbatches,
                     task.temperature)  # fmt: skip
    ckpt, writer = _stage_outputs(
        run, stage, ("sub/reward_mean", "decoupled/dropped_stale", "update/grad_norm")
    )
    (policy.state,), start, meta = _restore(ckpt, (policy.state,), writer, stage.name)
    applied = list(meta.get("applied", []))
    counts = {k: int(meta.get(k, 0)) for k in ("dropped_stale", "missing")}
    writer.start(start)

    def serving():
        return nnx.merge(policy.graphdef, _params_copy(policy.model()))

    def make_agent(m, seed):
        return task.sub_agent(run.env, JaxPolicyBackend(m, tok, seed=seed))

    server = decoupled_lib.SubAgentServer(
        make_agent,
        log,
        host=config.host,
        port=config.port,
        batch_window=config.batch_window_s,
        secret_env=config.secret_env,
    )
    server.set_policy(serving(), start)

    def progress(applied_steps: int, status: str) -> None:
        # The sub policy's version is its number of updates: the steps it has applied.
        store.put("sub/progress", {
            "applied_steps": applied_steps, "version": applied_steps, "url": server.url,
            "time": time.time(), "status": status, **counts,
        })  # fmt: skip

    server.start()
    progress(start, "serving")
    print(
        f"{stage.name}: sub-agent serving {server.url}; trainer at step {start}"
        f" ({len(applied)} rollout statistics applied)",
        flush=True,
    )
    bad = _BadSteps(run.max_bad_steps, stage.name, ckpt.directory)
    base_key = jax.random.PRNGKey(run.seed)
    last_good = start or None

    def waiting(step):
        def status(waited):
            main = store.get("main/progress") or {}
            age = time.time() - main["time"] if main else float("nan")
            return (
                f"sub: waiting for main step {step}'s statistics ({waited:.0f} s); main has"
                f" published {main.get('published_steps', 0)} steps, last {age:.0f} s ago"
            )

        return status

    try:
        for step in range(start, stage.steps):
            run.write_config()
            t0 = time.perf_counter()
            record = decoupled_lib.wait_for(
                lambda s=step: store.get(decoupled_lib.step_key(s)),
                timeout=config.wait_timeout_s, every=config.status_every_s, status=waiting(step),
            )  # fmt: skip
            t_wait = time.perf_counter() - t0
            got = decoupled_lib.gather_step(record, log, step, config.staleness_window)
            batch, stats = rl.mgrpo_sub_batch(
                got.subs, got.owner, got.correct, record["num_rollouts"], stage.sub_target_count,
                _sub_alignment_key(base_key, step), pad_id=tok.pad_token_id,
                shaping=task.reward, align=stage.sub_alignment,
            )  # fmt: skip
            update_metrics, t_scoring, t_update = _score_and_update(
                run, stage, [(policy, batch)], None, bad, step, last_good
            )
            store.put(decoupled_lib.applied_key(step), got.applied)
            applied.extend(r["key"] for r in record["rollouts"])
            counts["dropped_stale"] += got.dropped_stale
            counts["missing"] += got.missing
            if got.missing:
                print(
                    f"sub: step {step}: {got.missing} sub-trajectories not in the log", flush=True
                )
            scalars = {
                **stats, **update_metrics,
                "decoupled/dropped_stale": float(got.dropped_stale),
                "decoupled/missing": float(got.missing),
                "decoupled/main_epoch": float(record["epoch"]),
                "decoupled/record_age_s": time.time() - record["time"],
                "decoupled/server_batches": float(server.batches),
                "time/wait_main_s": t_wait, "time/scoring_s": t_scoring,
                "time/update_s": t_update, "time/step_s": time.perf_counter() - t0,
            }  # fmt: skip
            writer.write(step + 1, scalars)
            if ckpt.should_save(step + 1, step + 1 == stage.steps):
                ckpt.save(step + 1, (policy.state,), {
                    "step": step + 1, "data_step": step + 1, "applied": applied, **counts,
                })  # fmt: skip
                last_good = step + 1
            server.set_policy(serving(), step + 1)
            progress(step + 1, "training")
    except decoupled_lib.WaitTimeoutError as e:
        raise TrainError(f"stage {stage.name!r}: {e}") from None
    finally:
        ckpt.close()
        writer.close()
    progress(stage.steps, "done")
    server.close()
    return policy.model()


def _stage_records(run: _Run, stage: RLStage) -> list[int]:
    """Indices of the training records the stage draws from (`stage.hops`)."""
    if stage.hops is None:
        return list(range(len(run.data.records)))
    low, high = stage.hops
    pool = [i for i, r in enumerate(run.data.records) if low <= r.get("hops", -1) <= high]
    if not pool:
        raise TrainError(f"RLStage {stage.name!r}: no training question has {low}-{high} hops.")
    return pool


def _widen(batch: Mapping[str, np.ndarray], width: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {}
    for k, v in batch.items():
        if v.ndim == 2 and v.shape[1] < width:
            fill = pad_id if k == "input_ids" else 0
            v = np.concatenate([v, np.full((v.shape[0], width - v.shape[1]), fill, v.dtype)], 1)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------
# Entry point.


def _stage_done(run_dir: str, stage) -> bool:
    return os.path.exists(os.path.join(run_dir, stage.name, "export", "config.json"))


def _evaluate_point(
    run: _Run, point: str, model, evaluate: bool, sub_model=None, hierarchical: bool = False
) -> dict | None:
    if not evaluate:
        return None
    path = os.path.join(run.run_dir, "eval", f"{point}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    t0 = time.perf_counter()
    result = evaluate_policy(
        run.task, run.env, model, run.tokenizer, run.data.eval_records, seed=run.seed,
        sub_model=sub_model, hierarchical=hierarchical,
    )  # fmt: skip
    result["expert_nll"] = expert_nll(run, model)
    result["time_s"] = time.perf_counter() - t0
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    shown = ", ".join(f"{k} {result[k]:.4g}" for k in run.task.result_keys)
    print(f"eval {point}: {shown} ({len(run.data.eval_records)} held-out records)", flush=True)
    return result


def expert_nll(run: _Run, model) -> float:
    """Token-mean NLL of the scripted expert's chats on the held-out questions (assistant
    tokens only, observations cut as in rollouts): how well the policy imitates the expert
    on questions it never trained on."""
    if run.heldout_rows is None:
        chats = run.task.expert_chats(run.env, run.data.eval_records)
        run.heldout_rows = [
            data.chat_ids(
                run.tokenizer, messages, max_observation_chars=run.task.max_observation_chars
            )
            for messages in chats
        ]
    rows = run.heldout_rows
    width = data.bucket(max(len(ids) for ids, _ in rows))
    batch = data.pad_rows(rows, width, pad_id=run.tokenizer.pad_token_id)
    graphdef, params = nnx.split(model, nnx.Param)
    logps = np.asarray(
        steps.make_score_fn(graphdef)(
            params, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        )
    )
    mask = batch["loss_mask"] > 0
    return float(-(logps * mask).sum() / mask.sum())


def _write_results(run_dir: str, results: dict[str, dict], stages, keys) -> dict:
    table = {p: {k: r[k] for k in keys} for p, r in results.items()}
    lines = ["| point | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for point, row in table.items():
        lines.append(f"| {point} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    plots = []
    for stage in stages:
        if isinstance(stage, RLStage):
            path = _plot_rewards(run_dir, stage.name)
            if path:
                plots.append(os.path.basename(path))
    text = "# Results\n\nHeld-out evaluation (greedy, one episode per question):\n\n"
    text += "\n".join(lines) + "\n"
    text += "".join(f"\n![reward per step]({p})\n" for p in plots)
    with open(os.path.join(run_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    print("\n" + "\n".join(lines), flush=True)
    return table


def _plot_rewards(run_dir: str, stage: str) -> str | None:
    records = metrics.read_jsonl(os.path.join(run_dir, stage, "metrics.jsonl"))
    points = [(r["step"], r["reward/mean"]) for r in records if "reward/mean" in r]
    if not points:
        return None
    # A Figure of its own, not pyplot's: no global backend switched under a notebook.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean training reward")
    ax.set_title(f"{stage}: reward per step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, f"{stage}_reward_per_step.png")
    fig.savefig(path, dpi=120)
    return path


# Tensorstore (orbax's array writer) raises ValueError with the OS error code in the text.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_FAILED_FILE = re.compile(r'(?:Failed writing|local file):? "([^"]+)"')


def _no_space(error: BaseException | None) -> tuple[int, str | None] | None:
    """(errno, path or None) of the out-of-space write failure behind `error` (itself, its
    cause or its context), if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return error.errno, error.filename and os.fspath(error.filename)
        code = _OS_ERROR_CODE.search(str(error))
        if code and int(code.group(1)) in _NO_SPACE:
            path = _FAILED_FILE.search(str(error))
            return int(code.group(1)), path and path.group(1)
        error = error.__cause__ or error.__context__
    return None


class _NoSpaceLogFilter(logging.Filter):
    """Holds back the log records of out-of-space write failures: orbax's background threads
    log each failed array write with its traceback (dozens for one full disk); train()
    reports the failure once, in one line.

    Also holds back the "Event loop is closed" errors that tensorstore's writer threads raise
    when they call back into the event loop of an orbax save that has already failed: Python
    reports those through `sys.unraisablehook` (a traceback each), never to train()."""

    LOGGERS = ("absl", "asyncio")

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return _no_space(error) is None and _no_space(ValueError(record.getMessage())) is None

    def _unraisable(self, unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self._previous_hook(unraisable)

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook


def _no_space_error(full: tuple[int, str | None], run_dir: str) -> TrainError:
    code, path = full
    return TrainError(
        f"{path or f'a file being written (the run directory is {run_dir})'}: {_NO_SPACE[code]};"
        " free some space and run the same command again to resume."
    )


def _recorded_settings(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: unreadable ({' '.join(str(e).split())}).") from None
    return record.get("settings") if isinstance(record, dict) else None


def train(
    run_dir: str | None = None,
    *,
    stages: Sequence[SFTStage | RLStage] = (),
    task: Any = None,
    model: ModelConfig | None = None,
    init_from: str | None = None,
    tokenizer_vocab_size: int = 2048,
    chat_template: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    mesh_shape: tuple[int, int, int] = (-1, 1, 1),
    evaluate: bool = True,
    max_bad_steps: int = 3,
    interactive: bool | None = None,
    operative_config: Callable[[], str] | None = None,
    config_text: Callable[[], str] | None = None,
) -> dict:
    """Runs the stages in order in `run_dir` (resuming what is there).

    Every setting is checked before anything is written (`medjax.training.validate`). The
    first start records the settings in `run_dir/run.json`; a rerun with other settings
    stops and names them (a stage's `steps` may change while the stage is unfinished;
    mesh shape, evaluation, logging and checkpoint intervals may always change).

    Args:
      run_dir: the run's folder: new, empty, or a previous run of the same command.
      stages: `SFTStage`s and `RLStage`s, run in order.
      task: the task (data, agent budgets, reward): `rl.ResearchTask` (the default) or
        `consultation.ConsultationTask` (the MedDialogRubrics doctor).
      model: a ModelConfig to train from scratch (its vocab_size becomes the tokenizer's).
      init_from: a Hugging Face folder (weights and tokenizer) or a GGUF file to start from
        instead (e.g. `medjax.models.smollm2.gguf_path()`).
      tokenizer_vocab_size: from scratch, a byte-level BPE of this size is trained on the
        expert chats and saved in `run_dir/tokenizer`.
      chat_template: None keeps the checkpoint's template; "chatml" replaces it with
        medjax's verbatim ChatML (needed for Qwen3, whose template rewrites past turns).
      dtype: parameter and activation dtype of a model loaded with `init_from`.
      seed: seeds initialisation, data order and sampling.
      mesh_shape: (data, fsdp, tensor); -1 takes the remaining devices.
      evaluate: evaluate on the held-out questions before the first stage and after each.
      max_bad_steps: stop after more than this many non-finite updates in a row.
      interactive: progress bar (True) or log lines (False); None: a bar on a terminal.
      operative_config: returns the config text written to `run_dir/config.gin` at step 0.
      config_text: returns the whole configuration (`gin.config_str()`); its bindings are
        recorded and compared too (an optimizer's learning rate is not in the values).

    Returns:
      {evaluation point: {accuracy, reward/mean, ...}} (empty without `evaluate`).

    Raises:
      TrainError: anything that stops the run, with what to do about it.
    """
    values = dict(locals())
    if not run_dir:
        raise TrainError("train: run_dir is required (bind train_lib.train.run_dir).")
    if not isinstance(stages, (tuple, list)) or not stages:
        raise TrainError("train: no stages (bind train_lib.train.stages to a list of stages).")
    for i, stage in enumerate(stages):
        if not isinstance(stage, (SFTStage, RLStage)):
            raise TrainError(f"train: stages[{i}] {stage!r} is not an SFTStage or RLStage.")
        stage.validate()
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise TrainError(f"train: stage names repeat: {names}.")
    task = values["task"] = task or rl.ResearchTask()
    for stage in stages:
        bad_roles = [r for r in getattr(stage, "roles", ()) if r not in task.roles]
        if bad_roles:
            raise TrainError(
                f"SFTStage {stage.name!r}: role {bad_roles[0]!r} is not one of"
                f" {type(task).__name__}'s roles {task.roles}."
            )
        if (
            isinstance(stage, RLStage)
            and stage.algorithm == "mgrpo"
            and not hasattr(task, "sub_agent")
        ):
            raise TrainError(
                f"RLStage {stage.name!r}: M-GRPO needs a task with a sub-agent (ResearchTask),"
                f" not {type(task).__name__}."
            )
    _validated(validate_lib.train_arguments, values, checkpoint_lib.is_checkpoint)
    for stage in stages:
        if isinstance(stage, RLStage):
            for field in ("reference", "sub_init_from"):
                _validated(
                    validate_lib.checkpoint_path, f"RLStage {stage.name!r}", field,
                    getattr(stage, field), checkpoint_lib.is_checkpoint,
                )  # fmt: skip
    try:
        mesh = partitioning.make_mesh(*mesh_shape)
    except ValueError as e:
        raise TrainError(f"train: mesh_shape {tuple(mesh_shape)}: {e}") from None
    dtype = jnp.dtype(dtype)
    run_dir = os.path.abspath(run_dir)
    if init_from is not None:
        values["init_from"] = os.path.abspath(init_from)
    resuming = _check_run_dir(run_dir, stages)
    bindings = validate_lib.gin_bindings(config_text()) if config_text is not None else None
    settings = validate_lib.settings(values, stages, bindings)
    recorded = _recorded_settings(run_dir) if resuming else None
    if recorded is not None:
        unfinished = [s.name for s in stages if not _stage_done(run_dir, s)]
        changed = validate_lib.differences(recorded, settings, unfinished)
        if changed:
            raise TrainError(
                f"run_dir {run_dir} was started with other settings ({RUN_FILE}): "
                + "; ".join(changed)
                + ". Use a new run_dir, or the settings it was started with."
            )
    # From here on a full disk (caches, datasets, the run directory, orbax's writer threads)
    # is reported once, in one line.
    quiet = _NoSpaceLogFilter()
    quiet.install()
    try:
        env = task.environment()
        loaded = _load_data(task, env)
        tokenizer, new_tokenizer = _tokenizer(
            run_dir, init_from, loaded.chats, tokenizer_vocab_size, not resuming, chat_template
        )
        policy = _init_model(model, init_from, tokenizer, seed, mesh, dtype)
        # Nothing was written to run_dir before this point: a setting that cannot run
        # stopped above.
        if jax.process_index() == 0:
            os.makedirs(run_dir, exist_ok=True)
            if not resuming:
                record = {"stages": names, "created": time.time(), "settings": settings}
                path = os.path.join(run_dir, RUN_FILE)
                try:
                    with open(path, "w", encoding="utf-8") as f:
                        json.dump(record, f, indent=1)
                except OSError as e:  # write() names no file: name it.
                    raise OSError(e.errno, e.strerror, e.filename or path) from e
            if new_tokenizer:
                tokenizer.save_pretrained(os.path.join(run_dir, "tokenizer"))
        run = _Run(run_dir, task, env, loaded, tokenizer, mesh, seed, max_bad_steps,
                   interactive, operative_config)  # fmt: skip
        result = _run_stages(run, stages, policy, dtype, evaluate)
    except Exception as e:
        full = _no_space(e)
        if full is None:
            quiet.remove()
            raise
        # The filter stays: the failed writers' tasks still log as they are collected.
        raise _no_space_error(full, run_dir) from None
    quiet.remove()
    return result


def _run_stages(run: _Run, stages, policy, dtype, evaluate: bool) -> dict:
    run_dir, mesh, tokenizer = run.run_dir, run.mesh, run.tokenizer
    points = ["before"] + [f"after_{s.name}" for s in stages]
    sub_policy = None  # M-GRPO's distinct sub-agent, carried from one RL stage to the next.
    # Each point evaluates the agent of the stage it follows (the first: of the first stage).
    modes = [getattr(s, "algorithm", None) == "mgrpo" for s in stages]
    modes = [modes[0], *modes]
    for i, stage in enumerate(stages):
        export = os.path.join(run_dir, stage.name, "export")
        if _stage_done(run_dir, stage):
            policy = _load_policy(f"stage {stage.name!r}", export, mesh, dtype)
            if isinstance(stage, RLStage):
                sub_export = export + "_sub"
                sub_policy = (
                    _load_policy(f"stage {stage.name!r}", sub_export, mesh, dtype)
                    if os.path.exists(os.path.join(sub_export, "config.json"))
                    else None
                )
            print(f"{stage.name}: finished earlier; loaded {export}", flush=True)
            continue
        _evaluate_point(run, points[i], policy, evaluate, sub_policy, modes[i])
        if isinstance(stage, SFTStage):
            policy = _run_sft(run, stage, policy)
        else:
            policy, sub_policy = _run_rl(run, stage, policy, sub_policy)
            if sub_policy is not None:
                _save_policy(*nnx.split(sub_policy, nnx.Param), tokenizer, export + "_sub")
        _save_policy(*nnx.split(policy, nnx.Param), tokenizer, export)
    _evaluate_point(run, points[-1], policy, evaluate, sub_policy, modes[-1])
    if not evaluate or jax.process_index() != 0:
        return {}
    results = {}
    for p in points:
        path = os.path.join(run_dir, "eval", f"{p}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                results[p] = json.load(f)
    return _write_results(run_dir, results, stages, run.task.result_keys)
