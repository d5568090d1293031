"""Trains a policy: flags -> gin -> `medjax.train_lib.train()`.

    python run_train.py --gin_file=gin/experiments/quickstart_cpu.gin
    python run_train.py --gin_file=gin/experiments/grpo_research_qwen2.5_1.5b.gin \
        --gin_bindings="train_lib.train.run_dir = '/ckpt/run1'" \
        --gin_bindings="train_lib.train.init_from = '/models/Qwen2.5-1.5B-Instruct'"

`--gin_file` and `--gin_bindings` repeat; later ones override earlier ones. Includes inside
gin files resolve against `--gin_search_paths` (default: this folder and the installed
package, so `include 'gin/models/tiny.gin'` works from a clone and from an installed wheel).
On a multi-host TPU/GPU slice pass `--multihost` (every host runs the same command; elsewhere
--coordinator_address, --num_processes and --process_id or jax's environment variables).
Two local processes: `python -m medjax.launch_local --num_processes 2 -- run_train.py ...`.

Before renting a slice, compile every program of the run for it here, on a CPU, with the
TPU compiler (`pip install -e ".[tpu]"`; no weights are read, no data is built):

    python run_train.py --gin_file=... --compile_only --topology=v5e-8 \
        [--model_shape=qwen2_5_7b]

prints per-chip HBM and FLOPs of each program, writes `run_dir/compile_only.json` and
exits 1 when a program does not fit. `--model_shape` takes the shapes of a gin/models
file instead of the run's checkpoint (bind a required checkpoint macro to None:
`--gin_bindings="CHECKPOINT=None"`); without it, only the checkpoint's config.json or GGUF
metadata is read.
"""

import argparse
import errno
import logging
import os
import pathlib
import sys
import tokenize

import gin

ROOT = pathlib.Path(__file__).resolve().parent


def default_search_paths() -> list[str]:
    """The repo root and the folder holding the installed `medjax/gin`, deduplicated."""
    paths = [str(ROOT)]
    try:
        import medjax

        installed = pathlib.Path(medjax.__file__).resolve().parent
        if (installed / "gin").is_dir() and str(installed) not in paths:
            paths.append(str(installed))
    except ImportError:
        pass
    return paths


def gin_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--gin_file", action="append", default=[], help="repeatable")
    parser.add_argument("--gin_bindings", action="append", default=[], help="repeatable")
    parser.add_argument(
        "--gin_search_paths", action="append", default=None,
        help="repeatable; default: the repo root and the installed package",
    )  # fmt: skip
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _gin_error(error: Exception, source: str) -> str:
    """Where a gin parse failed (file and line) and why, in one line. `source` is the
    --gin_file or --gin_bindings being parsed; an error in a file it includes names that
    file (the innermost gin.parse_config_file frame)."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "parse_config_file":
            local = tb.tb_frame.f_locals
            source = local.get("config_file_with_prefix") or local.get("config_file") or source
        tb = tb.tb_next
    line = None
    if isinstance(error, SyntaxError):
        source, line, why = error.filename or source, error.lineno, error.msg
    elif isinstance(error, tokenize.TokenError):  # Found at the end of the text.
        why = f"{error.args[0]} (a bracket or string left open)"
        position = error.args[1] if len(error.args) > 1 else None
        line = position[0] if isinstance(position, tuple) else None
    else:
        why = f"{type(error).__name__}: {error}"
    single = source.startswith("--gin_bindings")  # One binding: its line says nothing.
    where = source if line is None or single else f"{source}, line {line}"
    return f"bad gin configuration: {where}: {_one_line(why)}"


# What gin raises for a bad file or binding (NameError: a binding names a module the file does
# not import under dynamic registration).
_PARSE_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    NameError,
    SyntaxError,
    ImportError,
    tokenize.TokenError,
)


def configure(args: argparse.Namespace, prog: str) -> None:
    """Parses the gin files and bindings; a bad one exits with one line naming the file (or
    the binding) and the line."""
    if not args.gin_file:
        raise SystemExit(f"{prog}: error: give at least one --gin_file.")
    for path in args.gin_search_paths or default_search_paths():
        gin.add_config_file_search_path(path)
    sources = [(path, gin.parse_config_file) for path in args.gin_file]
    sources += [(binding, gin.parse_config) for binding in args.gin_bindings]
    for source, parse in sources:
        try:
            parse(source)
        except _PARSE_ERRORS as e:
            where = source if parse is gin.parse_config_file else f"--gin_bindings={source!r}"
            raise SystemExit(f"{prog}: error: {_gin_error(e, where)}") from None
    try:
        gin.finalize()
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{prog}: error: bad gin configuration: {_one_line(e)}") from None


def _without_gin_context(error: Exception) -> str:
    """The message without the "In call to configurable ..." lines gin appends."""
    lines = str(error).splitlines()
    return "\n".join(line for line in lines if "In call to configurable" not in line)


def show_progress() -> None:
    """The agent loop's line per turn of every evaluation and rollout batch (the
    `medjax.agents` logger) on stderr, from the process that writes the run (process 0)."""
    import jax

    if jax.process_index() != 0:
        return
    log = logging.getLogger("medjax.agents")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(getattr(h, "medjax_progress", False) for h in log.handlers):  # main() reruns.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        handler.medjax_progress = True
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> None:
    parser = gin_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--multihost", action="store_true", help="jax.distributed.initialize()")
    multihost_flags(parser)
    parser.add_argument(
        "--compile_only", action="store_true",
        help="compile every program for --topology ahead of time instead of training",
    )  # fmt: skip
    parser.add_argument("--topology", help="a Cloud TPU slice (v5e-8, v5p-8, ...) or v5e:2x4")
    parser.add_argument(
        "--model_shape", help="with --compile_only: a gin/models name (qwen2_5_7b) to size"
    )  # fmt: skip
    args = parser.parse_args(argv)
    overrides = {}
    if args.compile_only:
        overrides = compile_only_setup(args, parser)
        if _PROGRESS not in os.environ:
            raise SystemExit(
                supervise_compile(args.topology, sys.argv[1:] if argv is None else argv)
            )
    elif args.topology or args.model_shape:
        parser.error("--topology and --model_shape go with --compile_only.")
    if args.multihost and not args.compile_only and os.environ.get(_CHILD) != "1":
        raise SystemExit(supervise_multihost(args, sys.argv[1:] if argv is None else argv))
    configure(args, "run_train")
    if args.compile_only:
        overrides.update(compile_only_model(args))
    if args.multihost:
        from medjax import distributed, partitioning

        os.environ.setdefault("MEDJAX_DISTRIBUTED", "1")
        partitioning.maybe_initialize_distributed(
            **distributed.settings(args), heartbeat_timeout=args.heartbeat_timeout,
            init_timeout=args.init_timeout,
        )  # fmt: skip

    from medjax import train_lib

    show_progress()
    try:
        # Dynamic registration leaves the module attribute alone: call the configured one.
        gin.get_configurable(train_lib.train)(
            operative_config=gin.operative_config_str, config_text=gin.config_str, **overrides
        )
    except train_lib.TrainError as e:
        raise SystemExit(f"run_train: error: {_one_line(_without_gin_context(e))}") from None
    except ValueError as e:
        # gin raises ValueError for a required argument or macro left unset.
        if "gin" in str(e).lower() or "REQUIRED" in str(e):
            message = _one_line(_without_gin_context(e))
            raise SystemExit(f"run_train: error: bad gin configuration: {message}") from None
        raise
    except OSError as e:
        # Out of space where train_lib does not write itself (a library's own thread).
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = e.filename or "the run directory"
            raise SystemExit(f"run_train: error: {where}: no space left ({e.strerror})") from None
        raise


_CHILD = "MEDJAX_MULTIHOST_CHILD"  # medjax.distributed.CHILD, without importing it early.


def multihost_flags(parser: argparse.ArgumentParser) -> None:
    """--multihost's settings; each falls back to the environment variable jax reads."""
    parser.add_argument("--coordinator_address", help="host:port of process 0 (or env "
                        "JAX_COORDINATOR_ADDRESS; a Cloud TPU slice finds it itself)")  # fmt: skip
    parser.add_argument("--num_processes", type=int, help="or env JAX_NUM_PROCESSES")
    parser.add_argument("--process_id", type=int, help="or env JAX_PROCESS_ID")
    parser.add_argument(
        "--heartbeat_timeout", type=int, default=30,
        help="seconds without a heartbeat before a process counts as lost (default 30)",
    )  # fmt: skip
    parser.add_argument(
        "--init_timeout", type=int, default=300,
        help="seconds to wait for the coordinator and every process to join (default 300)",
    )  # fmt: skip


def supervise_multihost(args: argparse.Namespace, argv: list[str]) -> int:
    """--multihost: runs this command again as a child process that trains and watches it,
    so that a lost process or an unreachable coordinator ends in one line, not jax's abort
    and stack traces (`medjax.distributed.supervise`)."""
    from medjax import distributed

    return distributed.supervise(
        [sys.executable, str(ROOT / "run_train.py"), *argv],
        heartbeat_timeout=args.heartbeat_timeout, init_timeout=args.init_timeout,
        **distributed.settings(args),
    )  # fmt: skip


# A compiling child process's progress file and the programs to skip (supervise_compile).
_PROGRESS, _SKIP = "MEDJAX_COMPILE_ONLY_PROGRESS", "MEDJAX_COMPILE_ONLY_SKIP"


def supervise_compile(topology_name: str, argv: list[str]) -> int:
    """--compile_only: runs this command again in a child process that compiles the programs
    and appends each result to a progress file. A child the compiler crashes (a signal, no
    Python exception) leaves the program it was compiling without a result: it is recorded as
    crashed and a new child goes on from the next. Then the table is printed and written to
    run_dir/compile_only.json. Returns the exit code: 1 when a program does not fit or
    crashed, the child's code when it stopped on an error (already printed)."""
    import subprocess
    import tempfile

    from medjax import topologies
    from medjax.training import aot

    topology = topologies.resolve(topology_name)
    with tempfile.TemporaryDirectory(prefix="medjax_compile_only_") as tmp:
        progress = os.path.join(tmp, "progress.jsonl")
        open(progress, "w").close()
        skip = 0
        while True:
            env = dict(os.environ, **{_PROGRESS: progress, _SKIP: str(skip)})
            code = subprocess.run([sys.executable, str(ROOT / "run_train.py"), *argv], env=env)
            code = code.returncode
            if code >= 0:
                break
            crashed = aot.Progress.resume_at(progress) - 1
            total = aot.Progress.count(progress)
            if crashed < skip:  # It died before compiling anything: nothing to resume.
                print(f"run_train: error: --compile_only: the process died (signal {-code}).")
                return 1
            aot.Progress(progress).write(crashed=crashed, signal=-code)
            skip = crashed + 1
            if skip == total:
                code = 0
                break
        if code != 0:
            return code
        report, run_dir = aot.Progress.report(progress, topology)
    aot.publish(report, run_dir)
    return 0 if report.fits else 1


def compile_only_setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Checks the --compile_only flags before anything is parsed or imported: the topology
    and libtpu (one line saying how to install it). JAX runs on this host's CPU; the TPU
    compiler is libtpu's."""
    if not args.topology:
        parser.error("--compile_only needs --topology (v5e-8, v5p-8, v6e-8, v5e:2x4, ...).")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from medjax import topologies

    try:
        topologies.resolve(args.topology)
        topologies.require_libtpu()
    except (topologies.TopologyError, topologies.MissingLibtpuError) as e:
        raise SystemExit(f"run_train: error: --compile_only: {e}") from None
    if args.model_shape:
        name = args.model_shape.removesuffix(".gin")
        args.gin_file.append(f"gin/models/{name}.gin")
    if _PROGRESS not in os.environ:
        return {}
    from medjax.training import aot

    target = aot.CompileOnly(args.topology, os.environ[_PROGRESS], int(os.environ[_SKIP]))
    return {"compile_only": target}


def compile_only_model(args: argparse.Namespace) -> dict:
    """With --model_shape: the configured ModelConfig of its gin/models file replaces the
    run's checkpoint (whose shapes would be read from it), its vocabulary included."""
    if not args.model_shape:
        return {}
    from medjax.models import config

    try:  # The dtype the run would load its checkpoint at.
        dtype = gin.query_parameter("train_lib.train.dtype")
    except ValueError:
        dtype = "float32"
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype)
    model = gin.get_configurable(config.ModelConfig)().replace(dtype=dtype, param_dtype=dtype)
    return {"model": model, "init_from": None, "tokenizer_vocab_size": model.vocab_size}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
