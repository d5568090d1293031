"""Every program of a run, compiled ahead of time for a Cloud TPU slice, without a TPU.

`python run_train.py --gin_file=F --compile_only --topology=v5e-8` calls `train()`, which
hands its checked arguments to `compile_run` instead of training. No weights are read and
no data is built: the model's shapes come from the checkpoint's config.json or GGUF
metadata (or `model`), the programs' sizes from the stages and the task, and
`jax.jit(f).lower(abstract arguments).compile()` runs the TPU compiler (libtpu) on the
slice's devices (`medjax.topologies`). Each program is the one the run jits, at the
largest size the run can give it:

- SFT: the train step at `batch_size` rows of `max_length` tokens (bucketed as the run
  buckets), with its microbatches.
- RL: the update step of each policy at `prompts_per_step * num_generations /
  num_minibatches` rows (M-GRPO: main rows and `sub_target_count` aligned sub rows per
  rollout; GRAO: and a reference row per question), episodes of `max_context_tokens`;
  old/reference log-prob scoring where the run scores (`num_iterations` > 1, a KL term);
  the sampler's longest turn: every episode's row with a prompt of `max_context_tokens`,
  a KV cache of prompt + `max_new_tokens` (rows and lengths bucketed as
  `JaxPolicyBackend` buckets them), and a later turn continuing the kept KV cache (the cache
  and a new one of prompt + `max_new_tokens` slots, with a tool's output prefilled, at most
  `max_observation_chars` + 128 tokens). On a slice of several hosts rollouts run on each host's
  own chips (`multihost.local_copy`): the sampler is compiled on process 0's block of the
  mesh, with a whole copy of the parameters, for the episodes of its share of the questions
  (evaluation: all of them).
- Evaluation: the greedy sampler over `num_eval_questions` rows and the expert-NLL
  scoring of as many chats.

The sampler is compiled without the shared-prefix split (`prefix_ids`), which the run
uses when every prompt of a call shares 64 tokens or more: the same cache length, with
the shared part held once instead of once per row, so this bounds it from above.

Per program: the compiler's per-chip bytes (arguments, outputs, temporaries; donated
buffers counted once) against the HBM the compiler allows a chip, model FLOPs per chip
(`model_flops`) and what remat recomputes on top (`remat_flops`): their sum at the chip's
peak is the lower bound on its time. And the compiler's own FLOPs count, which counts each
loop body once (a scanned layer: once, not per layer) and counts work the chips repeat.
"""

import dataclasses
import functools
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from medjax import multihost, partitioning, paths, sampling, topologies
from medjax.llm import jax_backend
from medjax.models.config import ModelConfig
from medjax.models.transformer import DecoderLM, KVCache
from medjax.training import algorithms, data, runtime, steps
from medjax.training.stages import RLStage, SFTStage

REPORT_FILE = runtime.COMPILE_REPORT
_print = functools.partial(print, flush=True)
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class CompileOnly:
    """`train(compile_only=...)`: compile the run's programs for a TPU slice instead.

    Attributes:
      topology: a Cloud TPU slice ("v5e-8") or topology string ("v5e:2x4").
      progress: a JSON-lines file the results go to as they come (`Progress`), for a
        supervising process that reports them; None: print and write the report here.
      skip: programs an earlier process compiled (or crashed on).
    """

    topology: str
    progress: str | None = None
    skip: int = 0


@dataclasses.dataclass
class Program:
    """One program of the run: a jitted function and abstract arguments.

    Attributes:
      name: e.g. "sft: train step".
      shape: its sizes in words.
      build: () -> (jitted function, positional arguments); built when compiled.
      flops: the model FLOPs of one run of it on its chips (`model_flops`).
      recompute_flops: what remat recomputes on top, on its chips (`remat_flops`).
      chips: the chips it runs on; None: the whole slice (a rollout program runs on one
        host's chips).
    """

    name: str
    shape: str
    build: Callable[[], tuple[Any, tuple]]
    flops: float
    recompute_flops: float = 0.0
    chips: int | None = None

    def per_chip(self, chips: int, peak: float) -> dict:
        """Model and remat FLOPs a chip (of the slice's `chips`, unless the program runs on
        fewer), and the time their sum takes at `peak`."""
        chips = self.chips or chips
        model, remat = self.flops / chips, self.recompute_flops / chips
        return {"model_flops": model, "remat_flops": remat,
                "seconds_at_peak": (model + remat) / peak}  # fmt: skip


@dataclasses.dataclass
class Result:
    """What the compiler says about one program, per chip."""

    program: str
    shape: str
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None
    hbm_bytes: int | None = None
    fits: bool = False
    model_flops: float | None = None
    remat_flops: float | None = None
    xla_flops: float | None = None
    seconds_at_peak: float | None = None
    compile_s: float | None = None
    error: str | None = None
    largest: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Abstract arguments.


def _abstract(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def abstract_model(config: ModelConfig, mesh) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, parameters as ShapeDtypeStructs sharded on `mesh` by their logical axes),
    as `partitioning.shard_module` places a real model."""
    model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = partitioning.state_shardings(params, mesh)
    params = jax.tree.map(
        lambda v, s: v.replace(_abstract(v.shape, v.dtype, s)), params, shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )  # fmt: skip
    return graphdef, params


def abstract_train_state(params, tx, mesh) -> steps.TrainState:
    """A TrainState of ShapeDtypeStructs: the optimizer state where the run places it
    (`partitioning.optimizer_shardings`: moments like their parameters, the rest
    replicated)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(tx.init, params)
    placed = partitioning.optimizer_shardings(tx, params, mesh)
    opt_state = jax.tree.map(lambda s, p: _abstract(s.shape, s.dtype, p), shapes, placed)
    return steps.TrainState(
        _abstract((), jnp.int32, replicated), params, opt_state,
        _abstract((2,), jnp.uint32, replicated),
    )  # fmt: skip


def _batch(mesh, fields: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
    return {
        k: _abstract(shape, dtype, partitioning.batch_sharding(mesh, len(shape)))
        for k, (shape, dtype) in fields.items()
    }


def _tokens(rows: int, width: int, prefix: str = "") -> dict:
    return {
        f"{prefix}{k}": ((rows, width), jnp.int32)
        for k in ("input_ids", "attention_mask", "loss_mask")
    }


# ---------------------------------------------------------------------------------------
# The programs of each stage.


def _linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer, by its Hugging Face name."""
    c = config
    d, k, m = c.hidden_size, c.head_dim, c.intermediate_size
    q, kv = c.num_heads * k, c.num_kv_heads * k
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}  # fmt: skip


def _matmul_weights(config: ModelConfig, lm_head: bool = True) -> int:
    """Weights a token is multiplied by: the projections of every layer (+ the LM head)."""
    c = config
    layer = sum(i * o for i, o in _linear_shapes(c).values())
    return c.num_layers * layer + (c.hidden_size * c.vocab_size if lm_head else 0)


def _adapter_weights(config: ModelConfig) -> int:
    """LoRA's A and B weights a token is multiplied by, over every layer (0 without LoRA)."""
    lora = config.lora
    if lora is None:
        return 0
    shapes = _linear_shapes(config)
    return config.num_layers * sum(lora.rank * sum(shapes[t]) for t in lora.target_modules)


def _flops_per_key(config: ModelConfig) -> int:
    """Attention's FLOPs for one (query, key) pair over every layer: QK^T and PV."""
    return 4 * config.num_layers * config.num_heads * config.head_dim


def model_flops(config: ModelConfig, kind: str, rows: int, width: int, new: int = 0) -> float:
    """The model FLOPs of one program on `rows` sequences (the dense decoder's matmuls and
    causal attention, 2 FLOPs a multiply-add; nothing for padding, masking or remat: the
    work any implementation must do; `remat_flops` is what remat adds).

    kind: "train" (forward and backward of `width` tokens: 3x the forward; with LoRA the
    frozen weights get no gradient, so their matmuls count 2x and the adapters' 3x),
    "score" (forward), "sample" (prefill of `width` prompt tokens, the LM head on the last
    only, then `new` decode steps, each attending to the whole cache so far).
    """
    c = config
    per_key = _flops_per_key(c)
    causal = width * (width + 1) / 2  # Keys attended by a sequence's queries, in all.
    weights = 2 * width * _matmul_weights(c)
    adapters = 2 * width * _adapter_weights(c)
    attention = per_key * causal
    if kind == "train":
        if c.lora is None:
            return rows * 3 * (weights + attention)
        # Forward, then the gradient with respect to the activations of everything and to
        # the adapters' weights only.
        return rows * (2 * weights + 3 * adapters + 3 * attention)
    if kind == "score":
        return rows * (weights + adapters + attention)
    if kind != "sample":
        raise ValueError(f"model_flops: kind {kind!r} is not train, score or sample.")
    # A LoRA policy samples with its adapters unmerged: they count too.
    layers = _matmul_weights(c, lm_head=False) + _adapter_weights(c)
    prefill = 2 * layers * width + attention + 2 * c.hidden_size * c.vocab_size
    decode = new * 2 * (layers + c.hidden_size * c.vocab_size)
    decode += per_key * sum(width + i + 1 for i in range(new))
    return rows * (prefill + decode)


def remat_flops(config: ModelConfig, rows: int, width: int) -> float:
    """The FLOPs a train step on `rows` x `width` tokens recomputes under `config.remat`:
    "full" runs each layer's forward again (not the LM head, outside the layers);
    "save_dots" and "offload_dots" keep the matmuls without batch dims (projections and
    MLP) and recompute attention's scores and outputs; "none" nothing."""
    c = config
    if c.remat == "none":
        return 0.0
    attention = _flops_per_key(c) * width * (width + 1) / 2
    if c.remat != "full":
        return rows * attention
    layers = 2 * width * (_matmul_weights(c, lm_head=False) + _adapter_weights(c))
    return rows * (layers + attention)


@dataclasses.dataclass
class Plan:
    """What the programs are built from."""

    config: ModelConfig
    mesh: Any
    graphdef: nnx.GraphDef
    params: Any  # Abstract, sharded.
    # Where rollouts run: over several hosts, process 0's block of the mesh and its copy of
    # the parameters (`multihost.local_copy`); else the mesh and parameters above.
    rollout_mesh: Any = None
    rollout_params: Any = None
    hosts: int = 1

    def __post_init__(self):
        if self.rollout_mesh is None:
            self.rollout_mesh, self.rollout_params = self.mesh, self.params

    def train_step(self, name, tx, loss_fn, rows: int, width: int, microbatches: int,
                   fields: dict, scored_rows: int | None = None) -> Program:  # fmt: skip
        """The update step on `rows` rows; `scored_rows` when the loss runs the model over
        more rows than it trains on (GRAO's references)."""

        def build():
            params, frozen = self.params, None
            if self.config.lora is not None:  # The adapters train; the base rides along.
                params, frozen = nnx.split_state(self.params, nnx.LoRAParam, nnx.Param)
            state = abstract_train_state(params, tx, self.mesh)._replace(frozen=frozen)
            step = steps.make_train_step(
                self.graphdef, tx, loss_fn, num_microbatches=microbatches,
                state_shardings=steps.shardings_of(state),
            )  # fmt: skip
            return step, (state, _batch(self.mesh, fields))

        shape = f"{rows} rows x {width} tokens" + (
            f", {microbatches} microbatches" if microbatches > 1 else ""
        )
        scored = rows if scored_rows is None else scored_rows
        return Program(
            name, shape, build, model_flops(self.config, "train", scored, width),
            remat_flops(self.config, scored, width),
        )  # fmt: skip

    def score(self, name, rows: int, width: int, temperature: float,
              microbatches: int = 1) -> Program:  # fmt: skip
        def build():
            # The run passes host arrays: the compiler places them (unspecified shardings).
            args = [_abstract((rows, width), jnp.int32) for _ in range(3)]
            score = steps.make_score_fn(
                self.graphdef, temperature=temperature, mesh=self.mesh,
                num_microbatches=microbatches,
            )  # fmt: skip
            return score, (self.params, *args)

        flops = model_flops(self.config, "score", rows, width)
        shape = f"{rows} rows x {width} tokens" + (
            f", {microbatches} microbatches" if microbatches > 1 else ""
        )
        return Program(name, shape, build, flops)

    def sampler(self, name, rows: int, width: int, params: sampling.SamplingParams) -> Program:
        """`sampling._generate` on `rows` prompts left-padded to `width`, one sample each."""
        new = params.max_new_tokens

        def build():
            args = (
                self.graphdef, self.rollout_params, _abstract((rows, width), jnp.int32),
                _abstract((rows, width), jnp.int32), _row_keys(rows),
                _abstract((rows,), jnp.int32), params, 1, None, self.rollout_mesh,
            )  # fmt: skip
            return sampling._generate, args

        flops = model_flops(self.config, "sample", rows, width, new)
        return self._rollout(name, f"{rows} rows, prompt {width} + {new} new tokens", build, flops)

    def continuing(self, name, episodes: int, context: int, chunk: int,
                   params: sampling.SamplingParams) -> Program:  # fmt: skip
        """`sampling._continue`: a later turn of `episodes` live episodes, each continuing
        its row of the kept KV cache with up to `chunk` new tokens (a tool's output and the
        template's framing), at the context's end: the kept cache and the new one of
        padded_length(context - 1 + max_new_tokens) slots each, as `JaxPolicyBackend`
        sizes them."""
        c, new = self.config, params.max_new_tokens
        rows = jax_backend.padded_rows(episodes)
        width = jax_backend.padded_length(min(chunk, context - 1))
        slots = jax_backend.padded_length(context - 1 + new)
        mesh = self.rollout_mesh
        rows_spec = partitioning.batch_sharding(mesh, 1).spec[0]

        def build():
            kv = NamedSharding(mesh, PartitionSpec(None, rows_spec))
            by_row = NamedSharding(mesh, PartitionSpec(rows_spec))
            shape = (c.num_layers, rows, c.num_kv_heads, slots, c.head_dim)
            cache = KVCache(
                k=_abstract(shape, c.dtype, kv), v=_abstract(shape, c.dtype, kv),
                positions=_abstract((rows, slots), jnp.int32, by_row),
                index=_abstract((), jnp.int32, NamedSharding(mesh, PartitionSpec())),
                lengths=_abstract((rows,), jnp.int32, by_row),
            )  # fmt: skip
            args = (
                self.graphdef, self.rollout_params, cache, _abstract((rows,), jnp.int32),
                _abstract((rows,), jnp.int32), _abstract((rows, width), jnp.int32),
                _abstract((rows, width), jnp.int32), _row_keys(rows),
                _abstract((rows,), jnp.int32), params, 1, slots, mesh,
            )  # fmt: skip
            return sampling._continue, args

        flops = model_flops(self.config, "sample", rows, width, new)
        shape = f"{rows} rows, {slots} cached slots, {width} new prompt + {new} new tokens"
        return self._rollout(name, shape, build, flops)

    def _rollout(self, name, shape: str, build, flops: float) -> Program:
        """A sampler program, on the chips rollouts run on (one host's, over several)."""
        if self.hosts > 1:
            shape += f", on one host's {self.rollout_mesh.size} chips"
        return Program(name, shape, build, flops, chips=self.rollout_mesh.size)

    def longest_turn(self, name, episodes: int, context: int,
                     params: sampling.SamplingParams) -> Program:  # fmt: skip
        """The sampler's call of a turn where every one of `episodes` episodes is live with
        a prompt of `context` - 1 tokens, padded as `JaxPolicyBackend.generate_ids` pads it."""
        rows = jax_backend.padded_rows(episodes)
        return self.sampler(name, rows, jax_backend.padded_length(context - 1), params)


def _row_keys(rows: int) -> jax.ShapeDtypeStruct:
    """One key a prompt: the agent loop names each episode's random stream."""
    return jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))


def _sampling_params(task, greedy: bool) -> sampling.SamplingParams:
    return sampling.SamplingParams(
        max_new_tokens=task.max_new_tokens, temperature=task.temperature,
        top_p=getattr(task, "top_p", 1.0), greedy=greedy,
    )  # fmt: skip


def _chunk(task, context: int) -> int:
    """The most tokens a later turn appends (a tool's output, cut at the task's
    `max_observation_chars`, a token at least a character, and the template's framing and
    early-stop prompt, within 128 tokens); the whole context where outputs are not cut."""
    limit = getattr(task, "max_observation_chars", None)
    return context - 1 if limit is None else min(context - 1, limit + 128)


def _context(task, where: str) -> int:
    limit = getattr(task, "max_context_tokens", None)
    if not limit:
        raise ValueError(
            f"{where}: {type(task).__name__}.max_context_tokens is None (unbounded): set it to"
            " size the episodes' programs."
        )
    return int(limit)


def _rl_programs(plan: Plan, stage: RLStage, task, notes: list[str]) -> list[Program]:
    method = stage.method
    where = f"RLStage {stage.name!r}"
    context = _context(task, where)
    width = data.bucket(context)
    p, g = stage.prompts_per_step, stage.num_generations
    loss_fn = method.loss_fn(stage, task.temperature)
    total = stage.steps * stage.num_iterations * stage.num_minibatches
    tx = stage.optimizer(total_steps=total)
    parts, micro = stage.num_minibatches, stage.num_microbatches
    scored = stage.num_iterations > 1
    kl = bool(method.kl_beta(stage))
    out = []

    def episode_fields(rows):
        fields = _tokens(rows, width)
        if scored:
            fields["old_logps"] = ((rows, width), jnp.float32)
        if kl:
            fields["ref_logps"] = ((rows, width), jnp.float32)
        fields["advantages"] = ((rows,), jnp.float32)
        return fields

    def update(label, rows, fields, scored_rows=None):
        out.append(plan.train_step(
            f"{stage.name}: {label}", tx, loss_fn, rows, width, micro, fields, scored_rows
        ))  # fmt: skip

    if method.name == "grao":
        rows = p * g // parts
        fields = {**_tokens(rows, width), "rewards": ((rows,), jnp.float32)}
        fields.update(_tokens(p // parts, width, "ref_"))
        fields["ref_rewards"] = ((p // parts,), jnp.float32)
        update("update step (+ references)", rows, fields, rows + p // parts)
        notes.append(
            f"{stage.name}: GRAO's reference rows are sized at max_context_tokens; the run"
            " pads them to its longest expert chat."
        )
        scored = kl = False  # GRAO scores nothing besides the update.
    elif method.hierarchical:
        d = stage.sub_target_count or task.max_turns
        if stage.sub_target_count is None:
            notes.append(
                f"{stage.name}: sub_target_count None (the 0.99 quantile per step): sized at"
                f" max_turns = {d} sub-trajectories per rollout."
            )
        main, sub = p * g, p * g * d
        if stage.shared_model:
            update("update step (main + sub rows)", (main + sub) // parts,
                   episode_fields((main + sub) // parts))  # fmt: skip
        else:
            update("update step (main agent)", main // parts, episode_fields(main // parts))
            if stage.train_sub:
                update("update step (sub-agent)", sub // parts, episode_fields(sub // parts))
    else:
        update("update step", p * g // parts, episode_fields(p * g // parts))
    if scored or kl:
        why = " and ".join(
            w for w, on in (("old", scored), ("reference", kl)) if on
        )  # fmt: skip
        out.append(plan.score(
            f"{stage.name}: {why} log-probs", p * g, width, task.temperature, micro
        ))  # fmt: skip
    # Over several hosts each runs the episodes of its block of the questions
    # (`multihost.share`): the largest block.
    mine = -(-p // plan.hosts)
    sampled = _sampling_params(task, False)
    out.append(
        plan.longest_turn(f"{stage.name}: sampler (longest turn)", mine * g, context, sampled)
    )
    out.append(plan.continuing(
        f"{stage.name}: sampler (a later turn, kept cache)", mine * g, context,
        _chunk(task, context), sampled,
    ))  # fmt: skip
    return out


def _eval_programs(plan: Plan, task, notes: list[str]) -> list[Program]:
    count = task.num_eval_questions
    if count is None:
        notes.append(
            "evaluation: num_eval_questions None (the whole split): not sized; set it to"
            " compile the evaluation's programs."
        )
        return []
    context = _context(task, "evaluation")
    greedy = _sampling_params(task, True)
    return [
        plan.longest_turn("eval: sampler (greedy, longest turn)", count, context, greedy),
        plan.continuing(
            "eval: sampler (greedy, a later turn, kept cache)",
            count,
            context,
            _chunk(task, context),
            greedy,
        ),
        plan.score("eval: expert NLL scoring", count, data.bucket(context), 1.0),
    ]


def programs(plan: Plan, stages: Sequence[SFTStage | RLStage], task, evaluate: bool,
             notes: list[str]) -> list[Program]:  # fmt: skip
    """Every program the run jits, in the order it first runs them."""
    out = []
    evaluated = evaluate or any(s.heldout_every for s in stages)
    for stage in stages:
        if isinstance(stage, SFTStage):
            width = min(data.bucket(stage.max_length), stage.max_length)
            method = algorithms.SFT()
            out.append(
                plan.train_step(
                    f"{stage.name}: train step", stage.optimizer(total_steps=stage.steps),
                    method.loss_fn(stage), stage.batch_size, width, stage.num_microbatches,
                    _tokens(stage.batch_size, width),
                )
            )  # fmt: skip
        else:
            out.extend(_rl_programs(plan, stage, task, notes))
    if evaluated:
        out.extend(_eval_programs(plan, task, notes))
    return out


# ---------------------------------------------------------------------------------------
# Compiling and reporting.

_VALUE = re.compile(r"value: <\d+ ([^ ]+) @\d+> \(size=(\d+),offset=\d+\): (\S+)")
_OP_NAME = re.compile(r'metadata=\{[^}]*op_name="([^"]+)"')


def largest_buffers(dump_dir: str, count: int = 5) -> list[str]:
    """The largest HBM buffers of a compiled (or failed) program, one line each: size,
    shape, kind and the JAX operation that made it, from the compiler's buffer assignment
    and optimised HLO in `dump_dir` (XLA's --xla_dump_to)."""
    files = sorted(os.listdir(dump_dir)) if os.path.isdir(dump_dir) else []
    assignment = [f for f in files if f.endswith("after_optimizations-buffer-assignment.txt")]
    if not assignment:
        return []
    buffers: dict[str, tuple[int, str, str]] = {}
    kind = "temp"
    with open(os.path.join(dump_dir, assignment[-1]), encoding="utf-8") as f:
        for line in f:
            if line.startswith("allocation "):
                kind = (
                    "argument" if "parameter" in line
                    else "output" if "output shape" in line
                    else "temp"
                )  # fmt: skip
                if ", color " in line:  # On-chip scratch (VMEM, SMEM), not HBM.
                    kind = None
            elif kind and (m := _VALUE.search(line)):
                name, size, shape = m.group(1), int(m.group(2)), m.group(3).split("{")[0]
                if size > buffers.get(name, (0,))[0]:
                    buffers[name] = (size, shape, kind)
    biggest = sorted(buffers.items(), key=lambda item: -item[1][0])[:count]
    ops = {}
    hlo = assignment[-1].replace("-buffer-assignment.txt", ".txt")
    if hlo in files:
        wanted = {f"%{name.split('{')[0]} = " for name, _ in biggest}
        with open(os.path.join(dump_dir, hlo), encoding="utf-8") as f:
            for line in f:
                head = line.strip().split("= ", 1)[0] + "= "
                if head in wanted and (m := _OP_NAME.search(line)):
                    ops[head[1:-3]] = m.group(1)
    return [
        f"{size / GIB:.2f} GiB {shape} {kind}: {ops.get(name.split('{')[0], name)}"
        for name, (size, shape, kind) in biggest
    ]


def compile_program(program: Program, hbm: int, chips: int, peak: float) -> Result:
    """Compiles one program; a program that does not fit (or fails) is a Result with its
    error, not an exception."""
    result = Result(program.name, program.shape, hbm_bytes=hbm, **program.per_chip(chips, peak))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medjax_aot_") as dump:
        # The buffer assignment the compiler writes even when it runs out of memory.
        options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True,
                   "xla_dump_hlo_pass_re": "^$"}  # fmt: skip
        try:
            fn, args = program.build()
            compiled = fn.lower(*args).compile(options)
        except Exception as e:  # XlaRuntimeError and friends: the message is the report.
            result.compile_s = round(time.perf_counter() - start, 1)
            message = str(e)
            result.temp_bytes = topologies.parse_required(message)
            if result.temp_bytes is not None:
                result.error = "does not fit: " + " ".join(
                    message.split("RESOURCE_EXHAUSTED:")[-1].split("\n")[0].split()
                )
            else:
                result.error = " ".join(message.split())[:500]
            result.largest = largest_buffers(dump)
            return result
        result.largest = largest_buffers(dump)
    result.compile_s = round(time.perf_counter() - start, 1)
    memory = compiled.memory_analysis()
    result.argument_bytes = int(memory.argument_size_in_bytes)
    result.output_bytes = int(memory.output_size_in_bytes)
    result.alias_bytes = int(memory.alias_size_in_bytes)
    result.temp_bytes = int(memory.temp_size_in_bytes)
    result.code_bytes = int(memory.generated_code_size_in_bytes)
    result.total_bytes = (
        result.argument_bytes + result.output_bytes - result.alias_bytes + result.temp_bytes
        + result.code_bytes
    )  # fmt: skip
    result.fits = result.total_bytes <= hbm
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result.xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
    return result


@dataclasses.dataclass
class Report:
    topology: topologies.Topology
    model: dict
    mesh: dict
    results: list[Result]
    notes: list[str]

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.results)

    def as_json(self) -> dict:
        t = self.topology
        return {
            "topology": {
                "name": t.name, "topology": t.topology, "chips": t.chips, "hosts": t.hosts,
                "chips_per_host": list(t.chips_per_host), "peak_bf16_flops_per_chip": t.peak_flops,
                "device_kind": self.model.get("device_kind"),
            },
            "model": {k: v for k, v in self.model.items() if k != "device_kind"},
            "mesh": self.mesh,
            "fits": self.fits,
            "programs": [dataclasses.asdict(r) for r in self.results],
            "notes": self.notes,
            "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()},
        }  # fmt: skip


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def format_table(report: Report) -> str:
    """The report as a text table, then each failing program's largest buffers."""
    hbm = report.results[0].hbm_bytes if report.results else None
    head = (
        f"{report.topology.describe()}, {_gib(hbm)} GiB HBM a chip; model"
        f" {report.model['parameters'] / 1e9:.2f}B parameters ({report.model['dtype']}),"
        f" mesh {report.mesh}"
    )
    columns = ("program", "shape", "args GiB", "out GiB", "temp GiB", "total GiB", "fits",
               "TFLOPs/chip", "+ remat", "XLA TFLOPs", "s at peak")  # fmt: skip
    rows = []
    for r in report.results:
        out_bytes = None if r.output_bytes is None else r.output_bytes - (r.alias_bytes or 0)
        rows.append((
            r.program, r.shape, _gib(r.argument_bytes), _gib(out_bytes), _gib(r.temp_bytes),
            _gib(r.total_bytes) if r.total_bytes is not None
            else "-" if r.temp_bytes is None else f">{_gib(r.temp_bytes)}",
            "yes" if r.fits else "NO",
            f"{r.model_flops / 1e12:.3g}",
            f"{(r.remat_flops or 0) / 1e12:.3g}",
            "-" if r.xla_flops is None else f"{r.xla_flops / 1e12:.3g}",
            f"{r.seconds_at_peak:.3g}",
        ))  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    text = [head, line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows]
    for r in report.results:
        if not r.fits:
            text.append(f"{r.program}: {r.error or 'exceeds the HBM'}")
            text.extend(f"  {b}" for b in r.largest)
    text.extend(f"note: {n}" for n in report.notes)
    return "\n".join(text)


def model_config(init_from: str | None, model: ModelConfig | None, dtype,
                 vocab_size: int, options=None) -> ModelConfig:  # fmt: skip
    """The run's ModelConfig without reading a weight: config.json or GGUF metadata of
    `init_from`, else `model` with the tokenizer's size; at `dtype` and with `options`
    (scan_layers, remat), as the run makes the policy."""
    options = dict(options or {})
    if init_from is not None:
        from medjax.models import checkpoint as checkpoint_lib

        if checkpoint_lib.is_gguf(init_from):
            from medjax.models import gguf_checkpoint

            file = gguf_checkpoint.open_gguf(init_from)
            return gguf_checkpoint.gguf_config(file, dtype=dtype, param_dtype=dtype, **options)
        return checkpoint_lib.load_config(init_from, dtype=dtype, param_dtype=dtype, **options)
    return model.replace(vocab_size=vocab_size, dtype=dtype, param_dtype=dtype, **options)


class Progress:
    """A JSON-lines file a compiling process appends to as it goes: a header, then a
    "start" line before each program and its result after. A compiler that crashes the
    process (it happens: libtpu 0.0.42.1 overflows a stack on some attention shapes) leaves
    a "start" without a result; `run_train.py --compile_only` then adds a "crashed" line
    and resumes with the next program in a new process (`skip`)."""

    def __init__(self, path: str | None):
        self.path = path

    def write(self, **record) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def report(path: str, topology: topologies.Topology) -> "tuple[Report, str]":
        """(the Report the file holds, the run directory). A program whose process died
        while compiling it (a "crashed" line, or a start without a result) is recorded as
        crashed."""
        header, results, started, crashed = None, {}, {}, {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if "header" in record:
                    header = record["header"]
                elif "start" in record:
                    started[record["start"]] = record
                elif "result" in record:
                    results[record["result"]] = Result(**record["fields"])
                elif "crashed" in record:
                    crashed[record["crashed"]] = record["signal"]
        if header is None:
            raise ValueError(f"{path}: no header; nothing was compiled.")
        for index, start in started.items():
            if index not in results:
                signal = crashed.get(index)
                why = f"signal {signal}" if signal else "no result"
                results[index] = Result(
                    start["program"], start["shape"], hbm_bytes=start["hbm_bytes"],
                    model_flops=start["model_flops"], remat_flops=start.get("remat_flops"),
                    seconds_at_peak=start["seconds_at_peak"],
                    error=f"the TPU compiler crashed on it ({why}); see its log above",
                )  # fmt: skip
        ordered = [results[i] for i in sorted(results)]
        report = Report(topology, header["model"], header["mesh"], ordered, header["notes"])
        return report, header["run_dir"]

    @staticmethod
    def count(path: str) -> int | None:
        """How many programs the run has (the header's count), None before the header."""
        with open(path, encoding="utf-8") as f:
            for line in f:
                if "header" in (record := json.loads(line)):
                    return record["header"]["programs"]
        return None

    @staticmethod
    def resume_at(path: str) -> int:
        """The index of the first program no process has started."""
        with open(path, encoding="utf-8") as f:
            starts = [json.loads(line).get("start") for line in f]
        return max((s for s in starts if s is not None), default=-1) + 1


def _host_mesh(topology: topologies.Topology, mesh) -> Any:
    """Process 0's block of `mesh` (`multihost.process_meshes`: where its rollouts run) on the
    devices of a one-host slice of the same chips: the compiler takes a program for part of
    a slice's devices only as a program for a slice of that many chips, and a host's chips
    are the same chips, linked the same way."""
    owner = np.vectorize(lambda d: d.process_index)(mesh.devices)
    block = multihost.process_meshes(mesh, owner, 0)[0]
    per_host = topology.chips_per_host
    host = topologies.Topology(
        f"one host of {topology.name}", topology.generation,
        per_host[: len(topology.shape)], per_host,
    )  # fmt: skip
    return jax.make_mesh(
        block.devices.shape,
        block.axis_names,
        axis_types=block.axis_types,
        devices=topologies.devices(host),
    )


def compile_run(
    topology: str | topologies.Topology,
    *,
    config: ModelConfig,
    stages: Sequence[SFTStage | RLStage],
    task,
    mesh_shape: tuple[int, int, int],
    evaluate: bool,
    log: Callable[[str], None] = _print,
    progress: str | None = None,
    skip: int = 0,
    run_dir: str | None = None,
) -> Report:
    """Compiles every program of a run (see the module docstring) for `topology`.

    Args:
      progress: a JSON-lines file to append the header and each program's start and
        result to (`Progress`), for a supervising process.
      skip: leave out the first `skip` programs (compiled, or crashed, in an earlier
        process).
      run_dir: where the supervising process writes the report (in the header).
    """
    if not isinstance(topology, topologies.Topology):
        topology = topologies.resolve(topology)
    devices = topologies.devices(topology)
    mesh = partitioning.make_mesh(*mesh_shape, devices=devices)
    hbm = topologies.available_hbm(devices[0])
    graphdef, params = abstract_model(config, mesh)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    plan = Plan(config, mesh, graphdef, params)
    if topology.hosts > 1:
        local = _host_mesh(topology, mesh)
        plan = Plan(config, mesh, graphdef, params, local, abstract_model(config, local)[1],
                    topology.hosts)  # fmt: skip
    notes: list[str] = []
    todo = programs(plan, stages, task, evaluate, notes)
    model = {
        "family": config.family, "parameters": count, "dtype": jnp.dtype(config.param_dtype).name,
        "hidden_size": config.hidden_size, "num_layers": config.num_layers,
        "vocab_size": config.vocab_size, "device_kind": devices[0].device_kind,
    }  # fmt: skip
    record = Progress(progress)
    if skip == 0:
        record.write(header={"model": model, "mesh": dict(mesh.shape), "notes": notes,
                             "run_dir": run_dir, "programs": len(todo)})  # fmt: skip
        log(f"compile_only: {len(todo)} programs for {topology.describe()}")
    results = []
    for index, program in enumerate(todo):
        if index < skip:
            continue
        record.write(
            start=index, program=program.name, shape=program.shape, hbm_bytes=hbm,
            **program.per_chip(topology.chips, topology.peak_flops),
        )  # fmt: skip
        log(f"  {program.name}: compiling ...")
        result = compile_program(program, hbm, topology.chips, topology.peak_flops)
        record.write(result=index, fields=dataclasses.asdict(result))
        status = "fits" if result.fits else "DOES NOT FIT" if result.temp_bytes else "FAILED"
        log(f"  {program.name}: {status} ({result.compile_s} s to compile)")
        results.append(result)
    return Report(topology, model, dict(mesh.shape), results, notes)


def publish(report: Report, run_dir: str) -> None:
    """Prints the table and, from process 0, writes it to `run_dir`."""
    print(format_table(report), flush=True)
    if jax.process_index() == 0:
        print(f"compile_only: wrote {write_report(report, paths.absolute(run_dir))}")


def write_report(report: Report, run_dir: str) -> str:
    """Writes the report as JSON in `run_dir` (local or remote); returns the path."""
    path = os.path.join(run_dir, REPORT_FILE)
    paths.write_text(path, json.dumps(report.as_json(), indent=1))
    return path
