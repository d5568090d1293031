"""Runs an evaluation and writes its report.

    python run_eval.py --task dialogue --cases 20 --doctors random,checklist,oracle --out DIR
    python run_eval.py --task dialogue --doctors openai:http://127.0.0.1:8000/v1:my-model
    python run_eval.py --task dialogue --doctors checkpoint:/ckpt/qwen2.5-0.5b-instruct

    python run_eval.py --task dialogue --xlsx MedDialogRubrics.xlsx --doctors openai:URL:M \
        --patient openai:URL:M --judges openai:URL:A,openai:URL:B,openai:URL:C --voting majority

A doctor, patient or judge is an OpenAI-compatible endpoint (`openai:BASE_URL:MODEL`, API
key from $OPENAI_API_KEY) or a local medjax checkpoint (`checkpoint:DIR`, a Hugging Face
folder with its tokenizer); doctors can also be the scripted baselines (random, checklist,
oracle) on synthetic cases. With `--xlsx` (the released MedDialogRubrics file) the patient
answers from each row's record and an LLM judge panel scores the must-ask points.
"""

import argparse
import json
import sys


def make_doctor(spec: str, benchmark, graph):
    from medjax.eval import dialogue

    if spec in dialogue.BASELINES:
        if graph is None:
            raise SystemExit(f"run_eval: the scripted doctor {spec!r} needs synthetic cases.")
        return spec, dialogue.BASELINES[spec](benchmark, graph)
    return make_backend(spec)


def make_backend(spec: str):
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        from medjax.llm import OpenAICompatibleBackend

        base_url, _, model = rest.rpartition(":")
        if not base_url or not model:
            raise SystemExit(f"run_eval: --doctors {spec!r}: expected openai:BASE_URL:MODEL.")
        return f"openai-{model}", OpenAICompatibleBackend(base_url, model)
    if kind == "checkpoint":
        from medjax.llm import JaxPolicyBackend
        from medjax.models import checkpoint, tokenizer

        return "checkpoint", JaxPolicyBackend(
            checkpoint.from_pretrained(rest), tokenizer.load_tokenizer(rest)
        )
    raise SystemExit(
        f"run_eval: unknown backend {spec!r}; use random/checklist/oracle (doctors),"
        " openai:BASE_URL:MODEL or checkpoint:DIR."
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="dialogue", choices=("dialogue",))
    parser.add_argument("--cases", type=int, default=20, help="number of synthetic cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-turns", type=int, default=12)
    parser.add_argument("--doctors", default="random,checklist,oracle")
    parser.add_argument("--out", default="eval_out")
    parser.add_argument("--config", help="cases from the med_dialog_rubrics TFDS config (tiny)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", help="TFDS data dir (built there when missing)")
    parser.add_argument("--xlsx", help="the released MedDialogRubrics .xlsx")
    parser.add_argument("--patient", help="LLM patient for --xlsx (openai:... or checkpoint:...)")
    parser.add_argument("--judges", help="comma-separated LLM judges (a panel)")
    parser.add_argument(
        "--voting", default="majority", choices=("majority", "unanimous", "liberal")
    )
    args = parser.parse_args(argv)

    from medjax.eval import dialogue

    patient = judge = graph = None
    if args.judges:
        judge = dialogue.JudgePanel(
            [make_backend(s.strip())[1] for s in args.judges.split(",")], args.voting
        )
    if args.xlsx:
        from medjax.datasets import meddialog_xlsx

        if not args.patient or judge is None:
            raise SystemExit("run_eval: --xlsx needs --patient and --judges (LLM backends).")
        benchmark = dialogue.cases_from_xlsx(meddialog_xlsx.load_xlsx(args.xlsx))
        patient = dialogue.RecordPatient(make_backend(args.patient)[1], benchmark)
    else:
        from medjax.knowledge import graph as graph_lib
        from medjax.knowledge import hpo

        graph = graph_lib.KnowledgeGraph(hpo.load())
        if args.config:
            from medjax import datasets
            from medjax.datasets import med_dialog_rubrics

            source = datasets.load(
                f"med_dialog_rubrics/{args.config}", split=args.split, data_dir=args.data_dir
            )
            examples = [med_dialog_rubrics.to_case(source[i]) for i in range(len(source))]
            benchmark = dialogue.cases_from_dataset(graph, examples)
        else:
            benchmark = dialogue.build_cases(graph, args.cases, seed=args.seed)
    results = {}
    for spec in args.doctors.split(","):
        name, doctor = make_doctor(spec.strip(), benchmark, graph)
        results[name] = dialogue.run(
            doctor, benchmark, graph, max_turns=args.max_turns, patient=patient, judge=judge
        )
    summary = dialogue.write_report(args.out, results)
    json.dump(summary, sys.stdout, indent=1)
    print(f"\nrun_eval: report in {args.out}/report.md")


if __name__ == "__main__":
    main()
