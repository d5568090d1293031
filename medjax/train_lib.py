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

This module orchestrates; the work is in `medjax.training`: `stages` (the stage
settings), `algorithms` (each algorithm's rows and loss behind one protocol), `sft_loop`,
`rl_loop` and `decoupled_loop` (the loops), `runtime` (what the loops share), `evaluation`
and `disk` (a full disk reported in one line).
"""

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from medjax import multihost, partitioning, paths, topologies
from medjax.kernels import attention as attention_lib
from medjax.models import checkpoint as checkpoint_lib
from medjax.models.config import LoraConfig, ModelConfig
from medjax.training import algorithms, aot, disk, evaluation, rl, rl_loop, runtime, sft_loop
from medjax.training import validate as validate_lib
from medjax.training.evaluation import evaluate_policy, expert_nll
from medjax.training.runtime import RUN_FILE, TrainError
from medjax.training.stages import RLStage, SFTStage

__all__ = [
    "ALGORITHMS", "RUN_FILE", "RLStage", "SFTStage", "TrainError", "evaluate_policy",
    "expert_nll", "train",
]  # fmt: skip

ALGORITHMS = algorithms.names()


def _recorded_settings(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, RUN_FILE)
    try:
        record = json.loads(paths.read_text(path))
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
    scan_layers: bool = False,
    remat: str = "none",
    attention: str = "auto",
    lora: LoraConfig | None = None,
    seed: int = 0,
    mesh_shape: tuple[int, int, int] = (-1, 1, 1),
    evaluate: bool = True,
    max_bad_steps: int = 3,
    interactive: bool | None = None,
    operative_config: Callable[[], str] | None = None,
    config_text: Callable[[], str] | None = None,
    compile_only: "str | aot.CompileOnly | None" = None,
) -> dict:
    """Runs the stages in order in `run_dir` (resuming what is there).

    Every setting is checked before anything is written (`medjax.training.validate`). The
    first start records the settings in `run_dir/run.json`; a rerun with other settings
    stops and names them (a stage's `steps` may change while the stage is unfinished;
    mesh shape, evaluation, logging and checkpoint intervals may always change).

    Args:
      run_dir: the run's folder: new, empty, or a previous run of the same command; local
        or on any filesystem `etils.epath` and orbax reach (`gs://bucket/run` on Cloud TPU).
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
      dtype: the policy's parameter and activation dtype ("float32", "bfloat16" or
        "float16"), whether loaded with `init_from` or made from `model` (whose own dtypes
        it replaces). Log-probs and losses are float32 whatever it is. Mixed precision:
        "bfloat16" here with `optim.make_optimizer.master_dtype = "float32"` (and
        optionally `moments_dtype = "bfloat16"`).
      scan_layers: run the decoder layers under `lax.scan`, compiled once instead of once
        per layer (for large models; see `ModelConfig.scan_layers`).
      remat: what each layer keeps for the backward pass: "none", "full", "save_dots" or
        "offload_dots" (`ModelConfig.remat`).
      attention: plain causal attention's implementation: "auto" (splash attention on TPU,
        cuDNN on GPU in bf16/f16, XLA otherwise), "xla", "splash" or "cudnn"
        (`ModelConfig.attention`); one the mesh's platform cannot run stops the run.
      lora: train low-rank adapters (`models.LoraConfig`: rank, alpha, target modules)
        instead of every weight. Each stage adds new adapters (B = 0) to the model it starts
        from and trains them alone (the optimizer state is theirs); the KL reference is that
        starting model, computed by the same weights with the adapters off. The stage's
        export is the merged model (a Hugging Face folder) with the adapters also as a PEFT
        folder in `export/lora_adapter`, and the next stage starts from the merged model.
      seed: seeds initialisation, data order and sampling.
      mesh_shape: (data, fsdp, tensor); -1 takes the remaining devices.
      evaluate: evaluate on the held-out questions before the first stage and after each.
      max_bad_steps: stop after more than this many non-finite updates in a row.
      interactive: progress bar (True) or log lines (False); None: a bar on a terminal.
      operative_config: returns the config text written to `run_dir/config.gin` at step 0.
      config_text: returns the whole configuration (`gin.config_str()`); its bindings are
        recorded and compared too (an optimizer's learning rate is not in the values).
      compile_only: a Cloud TPU slice ("v5e-8") or topology ("v5e:2x4"): instead of
        training, compile every program of the run for it ahead of time (no weights, no
        data, no TPU: `medjax.training.aot`), print the per-chip table and write it to
        `run_dir/compile_only.json`.

    Returns:
      {evaluation point: {accuracy, reward/mean, ...}} (empty without `evaluate`); with
      `compile_only`, the `aot.Report`.

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
            and stage.method.hierarchical
            and not hasattr(task, "sub_agent")
        ):
            raise TrainError(
                f"RLStage {stage.name!r}: M-GRPO needs a task with a sub-agent (ResearchTask),"
                f" not {type(task).__name__}."
            )
    runtime.validated(validate_lib.train_arguments, values, checkpoint_lib.is_checkpoint)
    decoupled = [s.name for s in stages if getattr(s, "decoupled", None) is not None]
    if decoupled and jax.process_count() > 1:
        raise TrainError(
            f"RLStage {decoupled[0]!r}: decoupled M-GRPO runs in one process per trainer, not"
            f" over {jax.process_count()} processes (jax.distributed); unbind"
            " RLStage.decoupled or run without --multihost."
        )
    for stage in stages:
        if isinstance(stage, RLStage):
            for field in ("reference", "sub_init_from"):
                runtime.validated(
                    validate_lib.checkpoint_path, f"RLStage {stage.name!r}", field,
                    getattr(stage, field), checkpoint_lib.is_checkpoint,
                )  # fmt: skip
    if compile_only is not None:
        return _compile_only(compile_only, values)
    try:
        mesh = partitioning.make_mesh(*mesh_shape)
    except ValueError as e:
        raise TrainError(f"train: mesh_shape {tuple(mesh_shape)}: {e}") from None
    try:
        attention_lib.check_platform(attention, mesh.devices.flat[0].platform)
    except ValueError as e:
        raise TrainError(f"train: {e}") from None
    dtype = jnp.dtype(dtype)
    run_dir = paths.absolute(run_dir)
    if init_from is not None:
        values["init_from"] = paths.absolute(init_from)
    # Process 0 decides (and may write run.json before another process has looked).
    resuming = multihost.agree(runtime.check_run_dir(run_dir, stages))
    bindings = validate_lib.gin_bindings(config_text()) if config_text is not None else None
    settings = validate_lib.settings(values, stages, bindings)
    recorded = _recorded_settings(run_dir) if resuming else None
    if recorded is not None:
        unfinished = [s.name for s in stages if not runtime.stage_done(run_dir, s)]
        changed = validate_lib.differences(recorded, settings, unfinished)
        if changed:
            raise TrainError(
                f"run_dir {run_dir} was started with other settings ({RUN_FILE}): "
                + "; ".join(changed)
                + ". Use a new run_dir, or the settings it was started with."
            )
    # From here on a full disk (caches, datasets, the run directory, orbax's writer threads)
    # is reported once, in one line.
    quiet = disk.NoSpaceLogFilter()
    quiet.install()
    try:
        env = task.environment()
        loaded = runtime.load_data(task, env)
        tokenizer, new_tokenizer = runtime.make_tokenizer(
            run_dir, init_from, loaded.chats, tokenizer_vocab_size, not resuming, chat_template
        )
        # What only the tokenizer and data tell: the chat template renders, every stage's
        # budget holds its prompts.
        source = validate_lib.tokenizer_source(run_dir, values["init_from"], chat_template)
        runtime.validated(
            validate_lib.run_inputs, tokenizer, source, task, env, loaded, stages, evaluate
        )
        options = {"scan_layers": scan_layers, "remat": remat, "attention": attention, "lora": lora}
        policy = runtime.init_model(model, init_from, tokenizer, seed, mesh, dtype, options)
        # Nothing was written to run_dir before this point: a setting that cannot run
        # stopped above.
        if jax.process_index() == 0:
            epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
            if not resuming:
                record = {"stages": names, "created": time.time(), "settings": settings}
                path = os.path.join(run_dir, RUN_FILE)
                try:
                    paths.write_text(path, json.dumps(record, indent=1))
                except OSError as e:  # write() names no file: name it.
                    raise OSError(e.errno, e.strerror, e.filename or path) from e
            if new_tokenizer:
                runtime.save_tokenizer(tokenizer, os.path.join(run_dir, "tokenizer"))
        run = runtime.Run(run_dir, task, env, loaded, tokenizer, mesh, seed, max_bad_steps,
                          interactive, operative_config, dtype, options)  # fmt: skip
        result = _run_stages(run, stages, policy, evaluate, values["init_from"])
    except Exception as e:
        full = disk.no_space(e)
        if full is None:
            quiet.remove()
            raise
        # The filter stays: the failed writers' tasks still log as they are collected.
        raise TrainError(disk.no_space_message(full, run_dir)) from None
    quiet.remove()
    return result


def _compile_only(target: "str | aot.CompileOnly", values: dict) -> aot.Report:
    if isinstance(target, str):
        target = aot.CompileOnly(target)
    try:
        attention_lib.check_platform(values["attention"], "tpu")
    except ValueError as e:
        raise TrainError(f"compile_only: {e}") from None
    try:
        config = aot.model_config(
            values["init_from"], values["model"], jnp.dtype(values["dtype"]),
            values["tokenizer_vocab_size"],
            {k: values[k] for k in ("scan_layers", "remat", "attention", "lora")},
        )  # fmt: skip
        report = aot.compile_run(
            target.topology, config=config, stages=values["stages"], task=values["task"],
            mesh_shape=tuple(values["mesh_shape"]), evaluate=values["evaluate"],
            progress=target.progress, skip=target.skip,
            run_dir=paths.absolute(values["run_dir"]),
        )  # fmt: skip
    except (topologies.TopologyError, topologies.MissingLibtpuError) as e:
        raise TrainError(f"compile_only: {e}") from None
    except ValueError as e:  # A mesh the slice cannot hold, a size left unbounded.
        raise TrainError(f"compile_only {target.topology}: {' '.join(str(e).split())}") from None
    if target.progress is None:  # Else the supervising process reports.
        aot.publish(report, values["run_dir"])
    return report


def _run_stages(run: runtime.Run, stages, policy, evaluate: bool, init_from=None) -> dict:
    run_dir, tokenizer = run.run_dir, run.tokenizer
    # A LoRA stage's adapters apply to the model it started from (PEFT's base).
    start = init_from
    points = ["before"] + [f"after_{s.name}" for s in stages]
    sub_policy = None  # M-GRPO's distinct sub-agent, carried from one RL stage to the next.
    # Each point evaluates the agent of the stage it follows (the first: of the first stage).
    modes = [isinstance(s, RLStage) and s.method.hierarchical for s in stages]
    modes = [modes[0], *modes]
    for i, stage in enumerate(stages):
        export = os.path.join(run_dir, stage.name, "export")
        if multihost.agree(runtime.stage_done(run_dir, stage)):
            policy = run.load_policy(f"stage {stage.name!r}", export)
            if isinstance(stage, RLStage):
                sub_export = export + "_sub"
                sub_policy = (
                    run.load_policy(f"stage {stage.name!r}", sub_export)
                    if multihost.agree(paths.exists(os.path.join(sub_export, "config.json")))
                    else None
                )
            print(f"{stage.name}: finished earlier; loaded {export}", flush=True)
            start = export
            continue
        evaluation.evaluate_point(run, points[i], policy, evaluate, sub_policy, modes[i])
        if isinstance(stage, SFTStage):
            policy = sft_loop.run_sft(run, stage, policy)
        else:
            policy, sub_policy = rl_loop.run_rl(run, stage, policy, sub_policy)
            if sub_policy is not None:
                runtime.save_policy(*nnx.split(sub_policy, nnx.Param), tokenizer, export + "_sub")
                if sub_policy.config.lora is not None:
                    sub_policy = run.load_policy(f"stage {stage.name!r}", export + "_sub")
        runtime.save_policy(*nnx.split(policy, nnx.Param), tokenizer, export, start)
        if policy.config.lora is not None:
            # The next stage starts from the merged model with new adapters, as a resumed run
            # does when it loads this export.
            policy = run.load_policy(f"stage {stage.name!r}", export)
        start = export
    evaluation.evaluate_point(run, points[-1], policy, evaluate, sub_policy, modes[-1])
    if not evaluate or jax.process_index() != 0:
        return {}
    results = {}
    for p in points:
        path = os.path.join(run_dir, "eval", f"{p}.json")
        if paths.exists(path):
            results[p] = json.loads(paths.read_text(path))
    rl_stages = [s.name for s in stages if isinstance(s, RLStage)]
    return evaluation.write_results(run_dir, results, rl_stages, run.task.result_keys)
