"""Runs an evaluation: flags -> gin -> `medjax.eval_lib.evaluate()`, which writes the report.

    python run_eval.py --gin_file=gin/eval/research_tiny.gin \
        --gin_bindings="eval_lib.evaluate.checkpoint = '/ckpt/qwen2.5-0.5b-instruct'"
    python run_eval.py --task research --checkpoint /ckpt/qwen2.5-0.5b-instruct --num-questions 50
    python run_eval.py --task dialogue --cases 20 --doctors random,checklist,oracle --out DIR
    python run_eval.py --task dialogue --doctors openai:http://127.0.0.1:8000/v1:my-model

    python run_eval.py --task dialogue --xlsx MedDialogRubrics.xlsx --doctors openai:URL:M \
        --patient openai:URL:M --judges openai:URL:A,openai:URL:B,openai:URL:C --voting majority

Every option is an argument of `eval_lib.evaluate` (its docstring lists them and their
defaults): bind them in gin files (`eval_lib.evaluate.<name>`), or give the flags below,
which override the gin bindings. A flag left out keeps the gin binding or the default; the
default task is research. Gin flags (`--gin_file`, `--gin_bindings`, `--gin_search_paths`)
work as in run_train.py. A backend spec is `openai:BASE_URL:MODEL` (API key from
$OPENAI_API_KEY) or `checkpoint:DIR` (a Hugging Face folder with its tokenizer).
"""

import argparse
import json
import os
import sys

import gin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_train  # gin_flags and configure, shared with training.


def flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`evaluate`'s keyword flags; a flag not given is not passed (gin or the default wins)."""
    add = parser.add_argument
    add("--task", choices=("research", "dialogue"))
    add("--out", dest="out_dir", help="report folder")
    add("--seed", type=int)
    add("--max-turns", dest="max_turns", type=int)
    add("--split")
    add("--data-dir", dest="data_dir", help="TFDS data dir (built there when missing)")
    add("--checkpoint", help="research: the policy, a Hugging Face folder")
    add("--dataset", help="research: a med_kg_qa config, e.g. med_kg_qa/tiny")
    add("--num-questions", dest="num_questions", type=int, help="research: first N questions")
    add("--cases", type=int, help="dialogue: number of synthetic cases")
    add("--doctors", help="dialogue: comma-separated doctors")
    add("--config", help="dialogue: cases from the med_dialog_rubrics TFDS config (tiny)")
    add("--xlsx", help="dialogue: the released MedDialogRubrics .xlsx")
    add("--patient", help="dialogue: LLM patient for --xlsx (openai:... or checkpoint:...)")
    add("--judges", help="dialogue: comma-separated LLM judges (a panel)")
    add("--voting", choices=("majority", "unanimous", "liberal"))
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS
    )
    parser = flags(run_train.gin_flags(parser))
    args = parser.parse_args(argv)
    gin_args = {"gin_file", "gin_bindings", "gin_search_paths"}
    overrides = {k: v for k, v in vars(args).items() if k not in gin_args}

    from medjax import eval_lib

    evaluate = gin.configurable(eval_lib.evaluate, module="medjax.eval_lib")
    if args.gin_file or args.gin_bindings:
        run_train.configure(args, "run_eval")
        overrides["operative_config"] = gin.operative_config_str
    try:
        summary = evaluate(**overrides)
    except (eval_lib.EvalError, eval_lib.CheckpointError) as e:
        # gin appends "In call to configurable ..." lines: the message is the first line.
        raise SystemExit(f"run_eval: error: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        # gin raises ValueError for a required argument or macro left unset.
        if "gin" in str(e).lower() or "REQUIRED" in str(e):
            raise SystemExit(f"run_eval: error: bad gin configuration: {e}") from None
        raise
    json.dump(summary, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
