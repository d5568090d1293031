"""A run's settings, checked before anything is written, and the record of them that a
resumed run is compared with.

The checks take the values of a stage's or `train()`'s fields by name, not the classes, so
they hold wherever those classes live. Each raises `SettingError` with one line that names
where (`SFTStage 'sft'`, `RLStage 'rl'`, `train`) and which field:

    SFTStage 'sft': steps -1 is not an integer >= 1.

`run_inputs()` checks what only the loaded data and tokenizer tell, still before anything
is written: the chat template renders the conversations medjax sends, and every stage's
token budget holds its prompts (an RL turn has room to generate, an SFT chat keeps an
assistant token).

`settings()` flattens what defines a run into {key: JSON value}; `train()` stores it in
`run.json` at the first start and, on a rerun, `differences()` names every key whose value
changed. Fields that only say how the run is carried out (mesh shape, logging, checkpoint
intervals) are left out: a run may resume on another mesh or log more often.
"""

import contextlib
import dataclasses
import functools
import math
import numbers
import os
import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from medjax.losses import grpo as grpo_losses
from medjax.models import tokenizer as tokenizer_lib
from medjax.models.config import ATTENTION_IMPLS, REMAT_POLICY_NAMES, LoraConfig
from medjax.training import decoupled as decoupled_lib
from medjax.training.optim import FLOAT_DTYPES

CHAT_TEMPLATES = (None, "chatml")
# Folders a run directory uses for itself: a stage cannot be named after one.
RESERVED_NAMES = ("eval", "tokenizer")
# 256 byte symbols and the special tokens: the smallest BPE `train_bpe` can build.
MIN_VOCAB_SIZE = 256 + len(set(tokenizer_lib.SPECIAL_TOKENS))
# How the run is carried out, not what it trains: a rerun may change these.
RUNTIME_FIELDS = frozenset({
    "mesh_shape", "evaluate", "interactive", "max_bad_steps", "operative_config", "remat",
    "attention", "config_text", "save_every", "keep_checkpoints", "heldout_every",
    # Decoupled's endpoint and patience: a restarted process may serve on another port.
    "sub_url", "host", "port", "request_timeout_s", "batch_window_s", "wait_timeout_s",
    "status_every_s", "secret_env",
})  # fmt: skip
# Settings added after runs were first recorded: a run.json without one was started with
# this value (so a run from an earlier medjax still resumes).
ADDED_SETTINGS = {"scan_layers": False, "lora": None, "model.lora": None, "attention": "auto"}
# A stage's `steps` may change while the stage is unfinished (train it longer or shorter).
STEPS = "steps"


class SettingError(ValueError):
    """A setting that cannot run: one line naming the stage (or `train`) and the field."""


# ---------------------------------------------------------------------------------------
# Field checks.


def _or_none(none: bool) -> str:
    return " or None" if none else ""


def integer(where: str, field: str, value, *, minimum: int | None = None, none=False) -> None:
    """An int (not a bool), at least `minimum`; None too when `none`."""
    if value is None and none:
        return
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise SettingError(f"{where}: {field} {value!r} is not an integer{bound}{_or_none(none)}.")
    if minimum is not None and value < minimum:
        raise SettingError(f"{where}: {field} {value!r} is not an integer{bound}{_or_none(none)}.")


def number(where: str, field: str, value, *, minimum: float | None = None, none=False) -> None:
    """A finite real number (not a bool), at least `minimum`."""
    if value is None and none:
        return
    bound = "" if minimum is None else f" >= {minimum}"
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
    ):
        raise SettingError(f"{where}: {field} {value!r} is not a finite number{bound}.")


def flag(where: str, field: str, value, *, none=False) -> None:
    if value is None and none:
        return
    if not isinstance(value, (bool, np.bool_)):
        raise SettingError(f"{where}: {field} {value!r} is not True or False{_or_none(none)}.")


def choice(where: str, field: str, value, choices: Sequence[Any]) -> None:
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise SettingError(f"{where}: {field} {value!r} is not one of {tuple(choices)}.")


def text(where: str, field: str, value, *, none=False) -> None:
    """A non-empty string (or a path object)."""
    if value is None and none:
        return
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise SettingError(f"{where}: {field} {value!r} is not a non-empty string{_or_none(none)}.")


def function(where: str, field: str, value, *, none=False) -> None:
    if value is None and none:
        return
    if not callable(value):
        raise SettingError(f"{where}: {field} {value!r} is not callable{_or_none(none)}.")


def optimizers(where: str, values: Mapping[str, Any]) -> None:
    """Builds the stage's optimizers (`optimizer`, and `sub_optimizer` when set) as the
    stage will, so that a bad option (a schedule, a dtype name) stops the run before
    anything is written. Checked after the fields, which say what is callable."""
    for field in ("optimizer", "sub_optimizer"):
        value = values.get(field)
        if value is None:
            continue
        try:
            value(total_steps=1000)
        except (ValueError, TypeError) as e:
            # Without the "In call to configurable" lines gin adds to a gin-bound optimizer's.
            lines = [ln for ln in str(e).splitlines() if "In call to configurable" not in ln]
            raise SettingError(f"{where}: {field}: {' '.join(' '.join(lines).split())}") from None


def checkpoint_path(where: str, field: str, value, is_checkpoint: Callable[[str], bool]) -> None:
    """None, or a path `is_checkpoint` accepts (a Hugging Face folder or a GGUF file)."""
    text(where, field, value, none=True)
    if value is not None and not is_checkpoint(os.fspath(value)):
        raise SettingError(
            f"{where}: {field} {os.fspath(value)}: not a Hugging Face model folder (no"
            " config.json) nor a .gguf file."
        )


def stage_name(kind: str, name) -> None:
    where = f"{kind} {name!r}"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SettingError(
            f"{where}: name {name!r} is not a folder name (letters, digits, '_', '.', '-')."
        )
    if name in RESERVED_NAMES:
        raise SettingError(f"{where}: name {name!r} is a folder the run uses for itself.")


def _roles(role) -> tuple:
    return tuple(role) if isinstance(role, (tuple, list)) else (role,)


def _common(where: str, values: Mapping[str, Any]) -> None:
    integer(where, "steps", values["steps"], minimum=1)
    integer(where, "num_microbatches", values["num_microbatches"], minimum=1)
    integer(where, "save_every", values["save_every"], minimum=1)
    integer(where, "keep_checkpoints", values["keep_checkpoints"], minimum=1)
    integer(where, "heldout_every", values["heldout_every"], minimum=0)
    function(where, "optimizer", values["optimizer"])


def sft_stage(values: Mapping[str, Any], roles: Sequence[str | None]) -> None:
    """Checks an SFT stage's fields (`dataclasses.asdict`-like, by name)."""
    stage_name("SFTStage", values["name"])
    where = f"SFTStage {values['name']!r}"
    _common(where, values)
    integer(where, "batch_size", values["batch_size"], minimum=1)
    integer(where, "max_length", values["max_length"], minimum=2)
    if values["batch_size"] % values["num_microbatches"]:
        raise SettingError(
            f"{where}: batch_size {values['batch_size']} does not split into num_microbatches"
            f" {values['num_microbatches']}."
        )
    role = values["role"]
    if isinstance(role, (tuple, list)) and not role:
        raise SettingError(f"{where}: role () names no role.")
    for r in _roles(role):
        if r is not None and (not isinstance(r, str) or r not in roles):
            raise SettingError(f"{where}: role {r!r} is not None or one of {tuple(roles)}.")


def rl_stage(values: Mapping[str, Any], algorithm_names: Sequence[str]) -> None:
    """Checks an RL stage's fields (by name) that every algorithm shares; the algorithm
    checks its own (`medjax.training.algorithms`)."""
    stage_name("RLStage", values["name"])
    where = f"RLStage {values['name']!r}"
    algorithm = values["algorithm"]
    if isinstance(algorithm, str) or algorithm is None:
        choice(where, "algorithm", algorithm, tuple(algorithm_names))
    _common(where, values)
    for field in ("prompts_per_step", "num_iterations", "num_minibatches"):
        integer(where, field, values[field], minimum=1)
    # A group-relative baseline needs a group: one episode per question has no advantage.
    integer(where, "num_generations", values["num_generations"], minimum=2)
    function(where, "loss", values["loss"], none=True)
    number(where, "kl_beta", values["kl_beta"], minimum=0.0)
    text(where, "reference", values["reference"], none=True)
    choice(where, "advantage_scale", values["advantage_scale"], grpo_losses.REWARD_SCALES)
    integer(where, "advantage_ddof", values["advantage_ddof"], minimum=0)
    flag(where, "grouped_scoring", values["grouped_scoring"])
    flag(where, "shared_model", values["shared_model"])
    function(where, "sub_optimizer", values["sub_optimizer"], none=True)
    integer(where, "sub_target_count", values["sub_target_count"], minimum=1, none=True)
    flag(where, "sub_alignment", values["sub_alignment"])
    flag(where, "train_sub", values["train_sub"])
    text(where, "sub_init_from", values["sub_init_from"], none=True)
    decoupled = values["decoupled"]
    if decoupled is not None and not isinstance(decoupled, decoupled_lib.Decoupled):
        raise SettingError(f"{where}: decoupled {decoupled!r} is not a Decoupled or None.")
    hops = values["hops"]
    if hops is not None and (
        not isinstance(hops, (tuple, list))
        or len(hops) != 2
        or any(isinstance(h, bool) or not isinstance(h, numbers.Integral) for h in hops)
        or not 0 <= hops[0] <= hops[1]
    ):
        raise SettingError(f"{where}: hops {hops!r} is not (min, max).")


def train_arguments(values: Mapping[str, Any], is_checkpoint: Callable[[str], bool]) -> None:
    """Checks `train()`'s own arguments (the stages are checked on their own)."""
    where = "train"
    text(where, "run_dir", values["run_dir"])
    init_from = values["init_from"]
    checkpoint_path(where, "init_from", init_from, is_checkpoint)
    if init_from is None and values["model"] is None:
        raise SettingError(f"{where}: give model (a ModelConfig) or init_from (a HF folder).")
    if init_from is None:
        integer(where, "tokenizer_vocab_size", values["tokenizer_vocab_size"],
                minimum=MIN_VOCAB_SIZE)  # fmt: skip
    choice(where, "chat_template", values["chat_template"], CHAT_TEMPLATES)
    dtype = values["dtype"]
    try:
        name = jnp.dtype(dtype).name  # jnp, not np: numpy has no bfloat16 of its own.
    except TypeError:
        name = None
    if isinstance(dtype, bool) or name not in FLOAT_DTYPES:
        raise SettingError(f"{where}: dtype {dtype!r} is not one of {FLOAT_DTYPES}.")
    flag(where, "scan_layers", values["scan_layers"])
    if values["lora"] is not None and not isinstance(values["lora"], LoraConfig):
        raise SettingError(
            f"{where}: lora {values['lora']!r} is not a LoraConfig (in gin:"
            " @config.LoraConfig()) or None."
        )
    choice(where, "remat", values["remat"], REMAT_POLICY_NAMES)
    choice(where, "attention", values["attention"], ATTENTION_IMPLS)
    integer(where, "seed", values["seed"], minimum=0)
    shape = values["mesh_shape"]
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 3
        or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in shape)
        or any(s != -1 and s < 1 for s in shape)
        or list(shape).count(-1) > 1
    ):
        raise SettingError(
            f"{where}: mesh_shape {shape!r} is not (data, fsdp, tensor) of integers >= 1, at"
            " most one of them -1."
        )
    flag(where, "evaluate", values["evaluate"])
    integer(where, "max_bad_steps", values["max_bad_steps"], minimum=0)
    flag(where, "interactive", values["interactive"], none=True)
    function(where, "operative_config", values["operative_config"], none=True)


# ---------------------------------------------------------------------------------------
# What the loaded data and tokenizer tell: the chat template and the stages' token budgets.

# The conversation the agent loop and SFT render: a system prompt, a question, a tool call,
# the tool's response (a user turn: medjax sends no "tool" role) and an answer.
PROBE_CHAT: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "You are a careful medical researcher."},
    {"role": "user", "content": "Which gene is linked to Kappa syndrome?"},
    {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "search", "arguments": {"query": "Kappa"}}\n</tool_call>',
    },
    {"role": "user", "content": "<tool_response>\nKappa syndrome: gene KAPPA1.\n</tool_response>"},
    {"role": "assistant", "content": "<answer>KAPPA1</answer>"},
)


def tokenizer_source(run_dir: str, init_from: str | None, chat_template: str | None) -> str:
    """Where the run's chat template comes from, as errors name it: the GGUF file, the
    folder's chat_template.jinja or tokenizer_config.json, or medjax's own ChatML."""
    if chat_template == "chatml":
        return "train: chat_template 'chatml'"
    folder = init_from if init_from is not None else os.path.join(run_dir, "tokenizer")
    if init_from is not None and not os.path.isdir(init_from):
        return f"init_from {init_from}"  # A GGUF file: its tokenizer.chat_template.
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(folder, name)):
            where = "init_from" if init_from is not None else "run_dir"
            return f"{where} {os.path.join(folder, name)}"
    return "the trained tokenizer (medjax's ChatML)"


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def chat_template(tokenizer, source: str) -> None:
    """Renders `PROBE_CHAT` as the agent loop and SFT do (the prompt before each assistant
    turn with the generation prompt, the whole chat without) and checks that every
    message's content is in the text. Raises SettingError naming `source` and
    `tokenizer.chat_template`: a template that does not parse, raises (an unknown role, a
    variable it needs) or drops a message."""
    what = f"{source}: tokenizer.chat_template"
    chat = list(PROBE_CHAT)
    try:
        for i, m in enumerate(chat):
            if m["role"] == "assistant":
                tokenizer_lib.apply_chat_template(tokenizer, chat[:i], add_generation_prompt=True)
        text = tokenizer_lib.apply_chat_template(tokenizer, chat, add_generation_prompt=False)
        # As the policy's ids are made: with content as text (a template that cuts through a
        # special token in content is refused there).
        tokenizer_lib.encode_chat(tokenizer, chat, add_generation_prompt=False)
    except Exception as e:  # jinja2's syntax and undefined errors, the template's own raise.
        raise SettingError(
            f"{what} does not render a conversation of a system prompt, a question, a tool"
            f" call, its response and an answer: {_one_line(e)}"
        ) from None
    if not isinstance(text, str):
        raise SettingError(f"{what} renders {type(text).__name__}, not text.")
    for i, m in enumerate(chat):
        if m["content"] not in text:
            raise SettingError(
                f"{what} leaves message {i} ({m['role']}: {m['content'][:40]!r}) out of the"
                " text it renders; the policy would never see it."
            )


class _ProbeStopError(Exception):
    """Ends a probe rollout once its first turn's prompts are seen."""


class _FirstTurnProbe:
    """A token backend that records the prompts and per-episode budgets of the first turn
    (one call for every live episode) and then ends the rollout."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.seen: list[tuple[int, int]] = []  # (prompt length, new-token budget).

    def generate(self, conversations, params, *, num_samples: int = 1):
        raise _ProbeStopError

    def generate_ids(self, prompts, params, *, num_samples: int = 1, max_new_tokens=None):
        budgets = max_new_tokens or [params.max_new_tokens] * len(prompts)
        self.seen = [(len(p), int(b)) for p, b in zip(prompts, budgets, strict=True)]
        raise _ProbeStopError


# A context and turn budget no prompt reaches: the probe's first-turn budget is then
# this minus the prompt and the loop's reserve (see `_first_turn_needs`).
_UNBOUNDED = 1 << 40


def _first_turn_needs(task, env, tokenizer, records, hierarchy: Mapping[str, Any]) -> list:
    """(prompt tokens, the least `max_context_tokens` whose first turn may generate) of each
    record's episode. The agent loop gives a first turn min(max_new_tokens, context - prompt
    - reserve) new tokens (the reserve: the forced final turn's tokens and the early-stop
    prompt); with both budgets unbounded that is `_UNBOUNDED` - prompt - reserve, so the
    loop itself says how much room each prompt needs."""
    probe = _FirstTurnProbe(tokenizer)
    unbounded = dataclasses.replace(task, max_context_tokens=_UNBOUNDED, max_new_tokens=_UNBOUNDED)
    extra = {"sub_backend": probe, **hierarchy} if hierarchy else {}
    with contextlib.suppress(_ProbeStopError):
        unbounded.rollout(env, probe, list(records), num_generations=1, **extra)
    return [(length, _UNBOUNDED - budget + 1) for length, budget in probe.seen]


def _binding(task, field: str) -> str:
    """The gin binding of a task's field, as a gin file imports the module: rl.ResearchTask."""
    return f"{type(task).__module__.rpartition('.')[2]}.{type(task).__qualname__}.{field}"


def _pool(records: Sequence[Any], hops) -> list:
    """The training records an RL stage draws from (`RLStage.hops`)."""
    if hops is None:
        return list(records)
    return [
        r for r in records if isinstance(r, Mapping) and hops[0] <= r.get("hops", -1) <= hops[1]
    ]


def episode_budgets(task, env, tokenizer, data, stages: Sequence[Any], evaluate: bool) -> None:
    """Every episode the run samples has room for a first turn: the training questions of
    each RL stage and, with `evaluate`, the held-out ones, under the task's
    `max_context_tokens` (None: no limit, nothing to check). Raises SettingError naming the
    binding, the longest prompt and the least budget that fits."""
    limit = getattr(task, "max_context_tokens", None)
    if limit is None or not dataclasses.is_dataclass(task) or not hasattr(task, "max_new_tokens"):
        return  # No limit, or a task whose budgets this probe cannot set.
    rl_stages = [s for s in stages if hasattr(s, "num_generations")]
    modes = sorted({bool(s.method.hierarchical) for s in rl_stages})
    if evaluate and not modes:
        modes = [False]  # The evaluations of an SFT-only run.
    for hierarchical in modes:
        groups = []
        trained = [s for s in rl_stages if bool(s.method.hierarchical) == hierarchical]
        if trained:
            pools = [_pool(data.records, s.hops) for s in trained]
            ids = {id(r) for pool in pools for r in pool}
            groups.append(("training questions", [r for r in data.records if id(r) in ids]))
        if evaluate:
            groups.append(("held-out questions", data.eval_records))
        hierarchy = {"hierarchical": True} if hierarchical else {}
        for what, records in groups:
            needs = _first_turn_needs(task, env, tokenizer, records, hierarchy)
            short = [(p, n) for p, n in needs if n > limit]
            if not short:
                continue
            longest = max(p for p, _ in short)
            least = max(n for _, n in short)
            agent = " (M-GRPO's main agent)" if hierarchical else ""
            raise SettingError(
                f"{_binding(task, 'max_context_tokens')} {limit} leaves no room for the first"
                f" turn of {len(short)} of {len(needs)} {what}{agent}: the longest prompt is"
                f" {longest} tokens, and a turn needs 1 new token and the reserve of the forced"
                f" final turn (final_turn_tokens {task.final_turn_tokens} and the early-stop"
                f" prompt) on top; set it to at least {least}."
            )


def sft_budget(stage, task, env, data, tokenizer, source: str) -> None:
    """Every chat of an SFT stage keeps at least one assistant token within `max_length`
    (a chat cut before its first one trains on nothing; a batch of such chats would train on
    nothing at all). Raises SettingError naming the stage, the field, how many chats are cut
    so, and the least max_length that keeps one of each; or, when the chat template does
    not render an assistant's content verbatim (SFT cannot mask it), naming `source`."""
    from medjax.training import algorithms  # Imports this module: not at the top.

    where = f"SFTStage {stage.name!r}"
    run = types.SimpleNamespace(task=task, env=env, data=data, tokenizer=tokenizer)
    try:
        rows = algorithms.SFT().chats(run, stage)
    except ValueError as e:
        raise SettingError(f"{where}: {source}: tokenizer.chat_template: {_one_line(e)}") from None
    firsts = [next((i for i, m in enumerate(mask) if m), None) for _, mask in rows]
    if any(f is None for f in firsts):
        n = sum(f is None for f in firsts)
        raise SettingError(
            f"{where}: {n} of {len(rows)} chats have no assistant turn to train on (the"
            " expert's chats hold none)."
        )
    cut = [f for f in firsts if f >= stage.max_length]
    if cut:
        # Chats that keep some assistant tokens but lose later ones: said, not refused.
        lengths = [len(ids) for ids, _ in rows]
        partly = sum(f < stage.max_length < n for f, n in zip(firsts, lengths, strict=True))
        raise SettingError(
            f"{where}: max_length {stage.max_length} cuts away every assistant token of"
            f" {len(cut)} of {len(rows)} chats (up to {max(cut)} tokens come before the"
            f" first; {partly} more chats lose their last tokens); set it to at least"
            f" {max(cut) + 1}, or shorten the chats (max_observation_chars)."
        )


def run_inputs(
    tokenizer, source: str, task, env, data, stages: Sequence[Any], evaluate: bool
) -> None:
    """The checks that need the run's tokenizer and data, in the order a run meets them:
    `chat_template`, `episode_budgets`, then each SFT stage's `sft_budget`.

    Args:
      tokenizer: the run's tokenizer (its chat template included).
      source: where its template comes from (`tokenizer_source`), named in errors.
      task: the run's task; `env` its environment, `data` its loaded `TaskData`.
      stages: the run's stages.
      evaluate: whether the run evaluates (held-out episodes need room too).

    Raises:
      SettingError: one line naming the file or the stage (or task binding) and the field.
    """
    chat_template(tokenizer, source)
    # Before SFT's: a task whose expert plays under the same budget (the consultation
    # doctor) has empty chats when the budget cannot hold a prompt.
    episode_budgets(task, env, tokenizer, data, stages, evaluate)
    for stage in stages:
        if hasattr(stage, "max_length"):
            sft_budget(stage, task, env, data, tokenizer, source)


# ---------------------------------------------------------------------------------------
# The record of a run's settings.


def describe(value) -> Any:
    """A JSON value that stands for `value`: equal settings give equal descriptions."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, list)):
        return [describe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__qualname__, **fields}
    if isinstance(value, functools.partial):
        args = ", ".join(
            [repr(describe(a)) for a in value.args]
            + [f"{k}={describe(v)!r}" for k, v in sorted(value.keywords.items())]
        )
        return f"{describe(value.func)}({args})"
    if callable(value):
        # Gin's dynamic registration wraps the function (functools.wraps): name the original.
        inner = getattr(value, "__wrapped__", value)
        name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
        return f"{getattr(inner, '__module__', '?')}.{name}"
    return repr(value)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            if k not in RUNTIME_FIELDS:
                _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def settings(
    train_values: Mapping[str, Any],
    stages: Iterable[Any],
    config_bindings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """{key: JSON value} of what defines a run: `train()`'s arguments (`model.*`, `task.*`
    flattened), each stage's fields under its name (`sft.batch_size`), and the gin
    bindings when given (`gin:` keys: what the values above cannot show, such as an
    optimizer's learning rate bound in gin). Runtime fields are left out."""
    out: dict[str, Any] = {}
    for k, v in train_values.items():
        if k not in RUNTIME_FIELDS and k not in ("run_dir", "stages"):
            _flatten(k, describe(v), out)
    out["stages"] = [s.name for s in stages]
    for stage in stages:
        _flatten(stage.name, {k: v for k, v in describe(stage).items() if k != "name"}, out)
    # Bindings of what the values above already show (train, the stages, the model, the
    # task) would only repeat them; the rest (optimizers, losses, macros) they cannot show.
    shown = {"train"} | {v for k, v in out.items() if k.endswith(".type")}
    for k, v in (config_bindings or {}).items():
        configurable, _, param = k.rpartition(".")
        if configurable.rpartition(".")[2] in shown or param in RUNTIME_FIELDS:
            continue
        out[f"gin:{k}"] = v
    return out


def gin_bindings(config_text: str, skip_macros: Iterable[str] = ()) -> dict[str, str]:
    """{`selector.param` or macro name: value text} of gin's config text
    (`gin.config_str()`): one binding per statement, continuation lines joined."""
    bindings: dict[str, str] = {}
    key = None
    for line in config_text.splitlines():
        if not line.strip() or line.startswith(("#", "from ", "import ")):
            key = None
            continue
        if line[0].isspace() and key is not None:
            part = line.strip().rstrip("\\").strip()
            bindings[key] = f"{bindings[key]} {part}".strip()
            continue
        key, _, value = line.partition(" = ")
        key = key.strip()
        bindings[key] = value.strip().rstrip("\\").strip()
    # The macro that names the run directory (RUN_DIR) may be spelled another way.
    skipped = set(skip_macros)
    skipped |= {v[1:] for k, v in bindings.items() if k.endswith(".run_dir") and v[:1] == "%"}
    return {k: v for k, v in bindings.items() if k not in skipped}


def differences(
    old: Mapping[str, Any], new: Mapping[str, Any], unfinished: Iterable[str] = ()
) -> list[str]:
    """`key: old -> new` for each setting that differs (a key only one side has counts;
    `<stage>.steps` of an unfinished stage does not)."""
    allowed = {f"{name}.{STEPS}" for name in unfinished}
    # A run started with gin and resumed from a notebook (or the other way) has gin
    # bindings on one side only: compare the values then.
    with_gin = all(any(k.startswith("gin:") for k in side) for side in (old, new))
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        if key in allowed or (key.startswith("gin:") and not with_gin):
            continue
        a, b = (side.get(key, ADDED_SETTINGS.get(key, missing)) for side in (old, new))
        if a != b:
            shown = ["(unset)" if v is missing else repr(v) for v in (a, b)]
            out.append(f"{key}: {shown[0]} -> {shown[1]}")
    return out
