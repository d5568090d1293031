"""Trains a policy: flags -> gin -> `medjax.train_lib.train()`.

    python run_train.py --gin_file=gin/experiments/quickstart_cpu.gin
    python run_train.py --gin_file=gin/experiments/grpo_research_qwen2.5_1.5b.gin \
        --gin_bindings="train_lib.train.run_dir = '/ckpt/run1'" \
        --gin_bindings="train_lib.train.init_from = '/models/Qwen2.5-1.5B-Instruct'"

`--gin_file` and `--gin_bindings` repeat; later ones override earlier ones. Includes inside
gin files resolve against `--gin_search_paths` (default: this folder and the installed
package, so `include 'gin/models/tiny.gin'` works from a clone and from an installed wheel).
On a multi-host TPU/GPU slice pass `--multihost` (every host runs the same command).
"""

import argparse
import os
import pathlib
import sys

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


def configure(args: argparse.Namespace, prog: str) -> None:
    """Parses the gin files and bindings; a bad one exits with a one-line message."""
    if not args.gin_file:
        raise SystemExit(f"{prog}: error: give at least one --gin_file.")
    for path in args.gin_search_paths or default_search_paths():
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin_bindings)
    except (OSError, ValueError, KeyError, SyntaxError, ImportError) as e:
        raise SystemExit(f"{prog}: error: bad gin configuration: {type(e).__name__}: {e}") from None


def _without_gin_context(error: Exception) -> str:
    """The message without the "In call to configurable ..." lines gin appends."""
    lines = str(error).splitlines()
    return "\n".join(line for line in lines if "In call to configurable" not in line)


def main(argv: list[str] | None = None) -> None:
    parser = gin_flags(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--multihost", action="store_true", help="jax.distributed.initialize()")
    args = parser.parse_args(argv)
    configure(args, "run_train")
    if args.multihost:
        from medjax import partitioning

        os.environ.setdefault("MEDJAX_DISTRIBUTED", "1")
        partitioning.maybe_initialize_distributed()

    from medjax import train_lib

    try:
        # Dynamic registration leaves the module attribute alone: call the configured one.
        gin.get_configurable(train_lib.train)(operative_config=gin.operative_config_str)
    except train_lib.TrainError as e:
        raise SystemExit(f"run_train: error: {_without_gin_context(e)}") from None
    except ValueError as e:
        # gin raises ValueError for a required argument or macro left unset.
        if "gin" in str(e).lower() or "REQUIRED" in str(e):
            message = _without_gin_context(e)
            raise SystemExit(f"run_train: error: bad gin configuration: {message}") from None
        raise


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
