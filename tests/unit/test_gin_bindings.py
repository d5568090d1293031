"""Every binding in gin/ takes effect.

The gin files use dynamic registration (`from __gin__ import dynamic_registration`), which
leaves the Python functions alone: a binding `X.param = v` reaches `X` only when gin calls
`X`, that is when `X` is the entry point run_train.py / run_eval.py calls through gin
(`train_lib.train`, `eval_lib.evaluate`), or when some binding that gin applies passes `@X`
or `@X()` (maybe scoped: `@sft/optim.make_optimizer`). A function the code calls directly
never sees its bindings: they parse, they show in config.gin, and they change nothing.

So each configuration is parsed (in a clean gin state, nothing is built or run) and walked
from its entry point like gin would call it: a call in scope S applies the bindings of
every prefix of S (the innermost wins, parameter by parameter), a reference `@s/X` calls
`X` in scope `s`, an unscoped one in the caller's scope, and `%NAME` reads the macro
`NAME`. A binding (or macro) that the walk never applies is dead.

Configurations are the files run_train.py and run_eval.py are given (gin/experiments,
gin/testing, gin/eval) plus, for the files meant to be included that none of those
includes, an explicit pairing with a base that makes them reachable (EXTRA_CASES). A
binding written in a shared file (testing/base.gin binds both stages; each testing file
runs one or both) is dead only if no configuration that includes the file applies it.
Every file under gin/ must be parsed by at least one configuration.
"""

import contextlib
import dataclasses
import functools
import os
import pathlib
import sys
import textwrap
from collections.abc import Callable, Sequence
from unittest import mock

import gin
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GIN = ROOT / "gin"

# Included files that no file of gin/experiments, gin/testing or gin/eval includes: each
# paired with the smallest configuration its header comment says it is used with.
EXTRA_CASES = [
    # "Include from an experiment and pass `@losses.grpo_loss` as the loss."
    ("gin/testing/grpo.gin", "gin/losses/dapo.gin"),
    # A GRPO-family loss variant, like dapo.gin.
    ("gin/testing/grpo.gin", "gin/losses/dr_grpo.gin"),
    # "architecture only": the model a run trains from scratch (`train_lib.train.model`).
    *(("gin/testing/sft.gin", f"gin/models/{p.name}") for p in sorted(GIN.glob("models/*.gin"))),
    # The reward weights. No configuration includes it; on the bases (which leave
    # `rl.ResearchTask.reward` at its default, a plain RewardConfig()) it never applies.
    ("gin/testing/sft.gin", "gin/envs/research.gin"),
]


def _entry_train():
    from medjax import train_lib

    return train_lib.train


def _entry_evaluate():
    from medjax import eval_lib

    return eval_lib.evaluate


@dataclasses.dataclass(frozen=True)
class Case:
    files: tuple[str, ...]  # Relative to ROOT, parsed in this order.
    entry: Callable[[], Callable]  # Returns the function the runner calls through gin.

    @property
    def id(self) -> str:
        return "+".join(f.removeprefix("gin/") for f in self.files)


def _cases() -> list[Case]:
    cases = []
    for folder in ("experiments", "testing", "eval"):
        entry = _entry_evaluate if folder == "eval" else _entry_train
        for path in sorted(GIN.glob(f"{folder}/*.gin")):
            cases.append(Case((path.relative_to(ROOT).as_posix(),), entry))
    cases += [Case(files, _entry_train) for files in EXTRA_CASES]
    return cases


CASES = _cases()


@dataclasses.dataclass(frozen=True)
class Binding:
    """One binding as a gin file writes it."""

    file: str  # Relative to ROOT when under it.
    text: str  # `scope/selector.param` as written, or a macro's name.

    def __str__(self) -> str:
        return f"{self.file}: {self.text}"


@dataclasses.dataclass(frozen=True)
class Result:
    files: frozenset[str]  # Every file parsed (the case's files and their includes).
    live: frozenset[Binding]
    dead: frozenset[Binding]


def _display(path: str) -> str:
    p = pathlib.Path(path)
    for prefix in gin.config._LOCATION_PREFIXES:
        candidate = pathlib.Path(prefix, path)
        if not p.is_absolute() and candidate.exists():
            p = candidate
            break
    p = p.resolve()
    return p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else str(p)


@contextlib.contextmanager
def _recording():
    """Records, while gin parses, which file writes each binding: yields
    {((scope, complete selector), param): [Binding, ...]} and the list of files parsed."""
    origins: dict[tuple, list[Binding]] = {}
    parsed: list[str] = []
    stack: list[str] = []
    parse_file, bind = gin.config.parse_config_file, gin.config.bind_parameter

    def parse_config_file(config_file, *args, **kwargs):
        stack.append(_display(config_file))
        parsed.append(stack[-1])
        try:
            return parse_file(config_file, *args, **kwargs)
        finally:
            stack.pop()

    def bind_parameter(binding_key, value):
        bind(binding_key, value)
        key = gin.config.ParsedBindingKey.parse(binding_key)
        if key.complete_selector == "gin.macro":
            text = key.scope
        else:
            text = f"{key.scope + '/' if key.scope else ''}{key.given_selector}.{key.arg_name}"
        where = stack[-1] if stack else "<string>"
        origins.setdefault((key.config_key, key.arg_name), []).append(Binding(where, text))

    with (
        mock.patch.object(gin.config, "parse_config_file", parse_config_file),
        mock.patch.object(gin.config, "bind_parameter", bind_parameter),
    ):
        yield origins, parsed


def _references(value):
    for item in gin.config._iterate_flattened_values(value):
        if isinstance(item, gin.config.ConfigurableReference):
            yield item


def applied(entry_selector: str) -> set[tuple]:
    """The ((scope, selector), param) bindings of gin's current config that a call of
    `entry_selector` in the root scope applies, directly or through references."""
    config = gin.config._CONFIG
    live, seen = set(), set()
    todo = [((), entry_selector)]
    while todo:
        scope, selector = todo.pop()
        if (scope, selector) in seen:
            continue
        seen.add((scope, selector))
        effective = {}  # As gin's _get_bindings: outer scopes first, the innermost wins.
        for i in range(len(scope) + 1):
            key = ("/".join(scope[:i]), selector)
            for param, value in config.get(key, {}).items():
                effective[param] = (key, value)
        for param, (key, value) in effective.items():
            live.add((key, param))
            for ref in _references(value):
                # `@s/X` runs X in exactly scope s; `@X` (and `%M`'s scope M) as called.
                todo.append((tuple(ref.scopes) or scope, ref.configurable.selector))
    return live


def check(files: Sequence[str | os.PathLike], entry: Callable) -> Result:
    """Parses `files` in a clean gin state and splits their bindings into those a call of
    `entry` through gin applies and the dead ones."""
    if str(ROOT) not in gin.config._LOCATION_PREFIXES:
        gin.add_config_file_search_path(str(ROOT))  # `include 'gin/...'` from anywhere.
    gin.clear_config()
    try:
        with _recording() as (origins, parsed):
            for path in files:
                path = pathlib.Path(path)
                # gin.config's, which _recording patches (gin.parse_config_file is a copy).
                gin.config.parse_config_file(str(path if path.is_absolute() else ROOT / path))
        configurable = gin.config._inverse_lookup(entry)
        assert configurable is not None, f"{entry} is not configured by {list(files)}"
        live_keys = applied(configurable.selector)
    finally:
        gin.clear_config()
    live = {b for k, bs in origins.items() if k in live_keys for b in bs}
    dead = {b for k, bs in origins.items() if k not in live_keys for b in bs}
    return Result(frozenset(parsed), frozenset(live), frozenset(dead))


@functools.cache
def _results() -> dict[Case, Result]:
    return {case: check(case.files, case.entry()) for case in CASES}


@functools.cache
def _live_somewhere() -> frozenset[Binding]:
    return frozenset().union(*(r.live for r in _results().values()))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_binding_takes_effect(case):
    # A binding of a shared file only needs to take effect in one configuration using it.
    dead = sorted(_results()[case].dead - _live_somewhere(), key=str)
    assert not dead, (
        f"{len(dead)} gin binding(s) in {' + '.join(case.files)} never take effect: gin"
        " never calls the function in that scope (reference it with @ from a binding gin"
        " applies, or remove the binding), or a more specific scope overrides them:\n"
        + "\n".join(f"  {b}" for b in dead)
    )


def test_every_gin_file_is_checked():
    parsed = set().union(*(r.files for r in _results().values()))
    every = {p.relative_to(ROOT).as_posix() for p in GIN.rglob("*.gin")}
    missing = sorted(every - parsed)
    assert not missing, f"gin files no case parses (add them to EXTRA_CASES): {missing}"


# The checker itself, on a module of its own.
PROBE = """
CALLS = []

def entry(a=None, b=None, c=None):
    a()
    CALLS.append(("entry", c))

def used(x=0):
    CALLS.append(("used", x))

def unused(y=0):
    CALLS.append(("unused", y))

class Thing:
    def __init__(self, z=0, w=0):
        CALLS.append(("Thing", z, w))
"""

PROBE_GIN = """
from __gin__ import dynamic_registration
import {module} as probe

USED = 1
UNUSED = 2

probe.entry:
  a = @probe.used
  b = [@s/probe.Thing()]
  c = {{'k': %USED}}
probe.used.x = 3
probe.unused.y = 4
probe.Thing.z = 5      # Shadowed: Thing is only called in scope s, which binds z too.
probe.Thing.w = 6
s/probe.Thing.z = 7
t/probe.Thing.z = 8    # No call in scope t.
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A module of functions to configure, and a gin file binding them. One per test module:
    gin registers `probe.used` once for good, and a second module by that name would clash."""
    folder = tmp_path_factory.mktemp("probe")
    module = f"gin_bindings_probe_{os.getpid()}"
    (folder / f"{module}.py").write_text(textwrap.dedent(PROBE))
    sys.path.insert(0, str(folder))
    try:
        __import__(module)
    finally:
        sys.path.remove(str(folder))
    config = folder / "probe.gin"
    config.write_text(PROBE_GIN.format(module=module))
    return config, sys.modules[module]


def test_checker_finds_unreferenced_and_shadowed_bindings(probe):
    config, module = probe
    result = check([config], module.entry)
    dead, live = ({b.text for b in bindings} for bindings in (result.dead, result.live))
    assert dead == {"probe.unused.y", "UNUSED", "probe.Thing.z", "t/probe.Thing.z"}
    assert live == {
        "probe.entry.a",
        "probe.entry.b",
        "probe.entry.c",
        "probe.used.x",
        "USED",
        "probe.Thing.w",
        "s/probe.Thing.z",
    }
    assert {b.file for b in result.dead | result.live} == {str(config.resolve())}


def test_checker_matches_what_gin_applies(probe):
    # The ground truth for the test above: call the entry through gin.
    config, module = probe
    gin.clear_config()
    try:
        gin.parse_config_file(str(config))
        module.CALLS.clear()
        gin.get_configurable(module.entry)()
    finally:
        gin.clear_config()
    assert sorted(module.CALLS, key=repr) == [
        ("Thing", 7, 6),  # s/probe.Thing.z, probe.Thing.w; not probe.Thing.z nor t/...
        ("entry", {"k": 1}),  # USED
        ("used", 3),
    ]


def test_checker_follows_includes(probe):
    config, module = probe
    outer = config.parent / "outer.gin"
    outer.write_text(f"include '{config}'\nUNUSED = 3\n")
    result = check([outer], module.entry)
    assert result.files == {str(outer.resolve()), str(config.resolve())}
    dead = {(pathlib.Path(b.file).name, b.text) for b in result.dead}
    assert ("probe.gin", "probe.unused.y") in dead
    assert {("probe.gin", "UNUSED"), ("outer.gin", "UNUSED")} <= dead
