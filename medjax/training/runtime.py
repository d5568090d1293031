"""What every stage of a run shares: the run's context (`Run`), its set-up (run directory,
data, tokenizer, model), the trained policies and their updates, checkpoints and metric
writers, and the error that stops a run (`TrainError`).

The loops that use it: `sft_loop` (SFTStage), `rl_loop` (RLStage) and `decoupled_loop`
(M-GRPO's trainers in two processes); `medjax.train_lib.train` drives them.
"""

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from medjax import multihost, partitioning, paths
from medjax.models import checkpoint as checkpoint_lib
from medjax.models import tokenizer as tokenizer_lib
from medjax.models.transformer import DecoderLM
from medjax.training import checkpoints, metrics, rl, steps
from medjax.training import validate as validate_lib
from medjax.training.task import Task, TaskData

RUN_FILE = "run.json"
# What `run_train.py --compile_only` writes; a run may start in the folder afterwards.
COMPILE_REPORT = "compile_only.json"


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def validated(check: Callable[..., None], *args) -> None:
    """Runs a `validate_lib` check; its SettingError becomes a TrainError."""
    try:
        check(*args)
    except validate_lib.SettingError as e:
        raise TrainError(str(e)) from None


def fields(stage) -> dict[str, Any]:
    """A stage's fields by name."""
    return {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}


# ---------------------------------------------------------------------------------------
# Set-up: run directory, data, tokenizer, model.


def check_run_dir(run_dir: str, stages: Sequence[Any]) -> bool:
    """Whether `run_dir` (local or remote) holds a run to resume; raises if it holds anything
    else."""
    folder = epath.Path(run_dir)
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise TrainError(f"run_dir {run_dir} is a file, not a directory.")
    entries = [e.name for e in folder.iterdir()]
    entries = [e for e in entries if not e.startswith(".") and e != COMPILE_REPORT]
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


def load_data(task: Task, env) -> TaskData:
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


def loaded(what: str, path: str, load: Callable[[], Any]) -> Any:
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


def load_policy(what: str, path: str, mesh, dtype=None, options=None) -> DecoderLM:
    """`checkpoint_lib.from_pretrained` (`options`: how the model runs, e.g. scan_layers), a
    failure as one TrainError naming the path."""
    kwargs = ({} if dtype is None else {"dtype": dtype}) | dict(options or {})
    return loaded(what, path, lambda: checkpoint_lib.from_pretrained(path, mesh=mesh, **kwargs))


def make_tokenizer(run_dir, init_from, chats, vocab_size: int, fresh: bool, chat_template):
    """(tokenizer, whether to save it in run_dir/tokenizer); nothing is written here."""
    path = os.path.join(run_dir, "tokenizer")
    if init_from is not None:
        tok = loaded("init_from", init_from, lambda: tokenizer_lib.load_tokenizer(init_from))
        if chat_template == "chatml":
            # Templates that rewrite past turns (Qwen3 drops old <think> blocks) cannot hold
            # the exact sampled ids of a multi-turn episode; ChatML renders turns verbatim.
            tok.chat_template = tokenizer_lib.CHAT_TEMPLATE
        return tok, False
    if not fresh and paths.exists(os.path.join(path, "tokenizer.json")):
        return loaded("run_dir", path, lambda: _load_tokenizer(path)), False
    texts = (m["content"] for c in chats for m in c["messages"])
    return tokenizer_lib.train_bpe(texts, vocab_size), True


def _load_tokenizer(path: str):
    """`tokenizer_lib.load_tokenizer` of a local or remote folder (read from a local copy)."""
    with paths.local_copy(path) as local:
        return tokenizer_lib.load_tokenizer(local)


def save_tokenizer(tokenizer, path: str) -> None:
    """`tokenizer.save_pretrained(path)` for a local or remote folder (Hugging Face writes
    local files only: a remote folder is written through a local staging folder)."""
    with paths.staged(path) as local:
        tokenizer.save_pretrained(local)


def init_model(config, init_from, tokenizer, seed, mesh, dtype, options) -> DecoderLM:
    if init_from is not None:
        model = load_policy("init_from", init_from, mesh, dtype, options)
        if len(tokenizer) > model.config.vocab_size:
            # Ids past the embedding's rows would be clamped by the lookup, silently.
            raise TrainError(
                f"init_from {init_from}: the tokenizer has {len(tokenizer)} tokens, but the"
                f" model's vocab_size is {model.config.vocab_size}."
            )
        return model
    config = config.replace(vocab_size=len(tokenizer), dtype=dtype, param_dtype=dtype, **options)
    with jax.set_mesh(mesh):
        model = DecoderLM(config, rngs=nnx.Rngs(seed))
    return partitioning.shard_module(model, mesh)


LORA_ADAPTER = "lora_adapter"  # A LoRA stage's export holds its adapters here (PEFT).


def save_policy(graphdef, params, tokenizer, path: str, base: str | None = None) -> None:
    """A Hugging Face folder of the policy (LoRA adapters merged in), written whole or not
    at all; a LoRA policy's adapters also as a PEFT folder, `path/lora_adapter`, whose base
    is `base` (where the stage started).

    A local folder is written beside and renamed. A remote one (no rename there) is written
    in place after removing what a killed run left, its config.json last: `stage_done` keys
    on config.json, so it only ever sees a whole export. Every process calls it: parameters
    that span hosts are gathered leaf by leaf (a collective), process 0 alone writes, and
    every process returns once the folder is written (a LoRA stage's next one loads it)."""
    if jax.process_index() != 0:
        for leaf in jax.tree.leaves(params):  # Process 0's gathers, in its order.
            multihost.host_array(leaf)
        multihost.barrier(f"save_policy {path}")
        return
    params = jax.tree.map(multihost.host_array, params)
    model = nnx.merge(graphdef, params)
    if paths.is_remote(path):
        paths.rmtree(path)
        _write_policy(model, tokenizer, path, base)
        multihost.barrier(f"save_policy {path}")
        return
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _write_policy(model, tokenizer, tmp, base)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    multihost.barrier(f"save_policy {path}")


def _write_policy(model, tokenizer, path: str, base: str | None) -> None:
    """The export's files, the model's config.json last."""
    save_tokenizer(tokenizer, path)
    if model.config.lora is not None:
        checkpoint_lib.save_peft_adapter(
            model, os.path.join(path, LORA_ADAPTER), base_model_name_or_path=base
        )
    checkpoint_lib.save_pretrained(model, path)


def stage_done(run_dir: str, stage) -> bool:
    """Whether the stage finished (its policy is exported)."""
    return paths.exists(os.path.join(run_dir, stage.name, "export", "config.json"))


def run_id(run_dir: str) -> str:
    """The run's identity: its directory and when it was created (`run.json`)."""
    record = json.loads(paths.read_text(os.path.join(run_dir, RUN_FILE)))
    return f"{run_dir} (created {record['created']:.3f})"


# ---------------------------------------------------------------------------------------
# A stage's machinery: policies, updates, checkpoints, metrics.


@dataclasses.dataclass
class Run:
    """One run: its directory, task and data, tokenizer, mesh and options."""

    run_dir: str
    task: Task
    env: Any
    data: TaskData
    tokenizer: Any
    mesh: Any
    seed: int
    max_bad_steps: int
    interactive: bool | None
    operative_config: Callable[[], str] | None
    dtype: Any = None  # Of every model the run loads (None: the checkpoint's default).
    model_options: dict = dataclasses.field(default_factory=dict)  # scan_layers, remat.
    config_written: bool = False
    heldout_rows: list | None = None  # The expert's held-out chats, tokenised (expert_nll).

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        # Each process places its own devices' rows of the batch every process holds.
        return {
            k: multihost.put_global(v, partitioning.batch_sharding(self.mesh, v.ndim))
            for k, v in batch.items()
        }

    def load_policy(self, what: str, path: str) -> DecoderLM:
        """A model the run loads (a stage's export, a reference, a sub-agent's start), at
        the run's dtype and model options, so that its parameters match the policy's."""
        return load_policy(what, path, self.mesh, self.dtype, self.model_options)

    def write_config(self) -> None:
        if self.config_written or jax.process_index() != 0:
            return
        self.config_written = True
        path = os.path.join(self.run_dir, "config.gin")
        if self.operative_config is not None and not paths.exists(path):
            paths.write_text(path, self.operative_config())


def mean_metrics(items: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    keys = items[0].keys() if items else ()
    return {k: float(np.mean([float(m[k]) for m in items])) for k in keys}


class BadSteps:
    """Stops a stage after more than `limit` non-finite updates in a row."""

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


def stage_outputs(run: Run, stage, progress_keys):
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


def restore(ckpt: checkpoints.Checkpointer, state, writer, name: str):
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


def minibatches(batch: Mapping[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
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


class Policy:
    """One trained model: its state, step function and scorer."""

    def __init__(self, run: Run, model, tx, loss_fn, num_microbatches: int, temperature: float):
        self.graphdef, self.state = steps.create_state(model, tx, run.seed, run.mesh)
        self.step_fn = steps.make_train_step(
            self.graphdef, tx, loss_fn, num_microbatches=num_microbatches,
            state_shardings=steps.shardings_of(self.state),
        )  # fmt: skip
        self.score = steps.make_score_fn(
            self.graphdef, temperature=temperature, mesh=run.mesh,
            num_microbatches=num_microbatches,
        )  # fmt: skip
        self.packed_widths = (0, 0)  # The widest (L, K) of `rl.shared_prefix_rows` so far.

    def model(self):
        return nnx.merge(self.graphdef, *self.state.weights())

    def adapters_off(self) -> tuple:
        """A LoRA policy's weights with its adapters zeroed: the model the stage started
        from (its base), for reference log-probs without a second copy of the model."""
        zeros = jax.tree.map(jnp.zeros_like, self.state.params)
        return (zeros, self.state.frozen)


def params_copy(model: DecoderLM):
    """The model's parameters in new buffers: a policy's update donates (reuses) its own,
    and nnx.merge of the same state would share the Variables themselves."""
    return jax.tree.map(lambda x: x.copy(), nnx.split(model, nnx.Param)[1])


def score_and_update(run: Run, stage, jobs, reference, bad, step: int, last_good):
    """Old / reference log-probs where needed, then `num_iterations` passes of
    `num_minibatches` updates of each (policy, batch) job. Returns (update metrics,
    scoring s, update s)."""
    t1 = time.perf_counter()
    for job_policy, job_batch in jobs:
        if "old_logps" in job_batch:
            if stage.num_iterations > 1:
                job_batch["old_logps"] = multihost.host_array(
                    job_policy.score(
                        job_policy.state.weights(), job_batch["input_ids"],
                        job_batch["attention_mask"], job_batch["loss_mask"],
                    )
                )  # fmt: skip
            else:
                del job_batch["old_logps"]  # Exactly on-policy: ratio 1.
        if reference is not None:
            job_batch["ref_logps"] = multihost.host_array(
                job_policy.score(
                    reference, job_batch["input_ids"], job_batch["attention_mask"],
                    job_batch["loss_mask"],
                )
            )  # fmt: skip
    if stage.grouped_scoring:  # GRPO only (its check): one job, groups of num_generations.
        packed = []
        for job_policy, job_batch in jobs:
            # Widths only grow within a stage: a batch narrower than one the step has
            # compiled for is padded to it (a compile costs more than the padding).
            job_batch = rl.shared_prefix_rows(
                job_batch, stage.num_generations, pad_id=0, min_widths=job_policy.packed_widths
            )
            job_policy.packed_widths = (
                job_batch["packed_ids"].shape[1],
                job_batch["input_ids"].shape[1],
            )
            packed.append((job_policy, job_batch))
        jobs = packed
    t_scoring = time.perf_counter() - t1
    t2 = time.perf_counter()
    updates = []
    for _ in range(stage.num_iterations):
        for job_policy, job_batch in jobs:
            for part in minibatches(job_batch, stage.num_minibatches):
                job_policy.state, m = job_policy.step_fn(job_policy.state, run.put(part))
                m = jax.device_get(m)
                updates.append(m)
                bad.update(float(m["update_skipped"]), step + 1, last_good)
    update_metrics = mean_metrics(
        [{k: v for k, v in m.items() if np.ndim(v) == 0} for m in updates]
    )
    return (
        {f"update/{k}": v for k, v in update_metrics.items()},
        t_scoring,
        time.perf_counter() - t2,
    )


def step_seed(base_key, step: int) -> int:
    """The sampling seed of a stage's step."""
    return int(jax.random.randint(jax.random.fold_in(base_key, step), (), 0, 2**31 - 1))


def stage_records(run: Run, stage) -> list[int]:
    """Indices of the training records an RL stage draws from (`stage.hops`)."""
    if stage.hops is None:
        return list(range(len(run.data.records)))
    low, high = stage.hops
    pool = [i for i, r in enumerate(run.data.records) if low <= r.get("hops", -1) <= high]
    if not pool:
        raise TrainError(f"RLStage {stage.name!r}: no training question has {low}-{high} hops.")
    return pool
