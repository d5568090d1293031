"""TFDS builder of synthetic rare-disease consultation cases with must-ask rubrics.

The offline counterpart of MedDialogRubrics' benchmark: each example is one patient case
(`medjax.synthesis.cases`) of an OMIM disease with the rubric of that disease
(`medjax.synthesis.rubrics.reject_sample`), the material a simulated-patient dialogue is
run and scored on. Written as array_record, read without TensorFlow through
`as_data_source()`; configs `tiny` (40 cases, for tests; builds in a few seconds) and
`default` (5,200 cases, the paper's size).

Design choices:
- Diseases: the OMIM diseases of the bundled HPO release, sorted then shuffled with
  `random.Random(config.seed)`, taken in that order. `cases.synthesise_cases` skips a disease
  with no consistent record. When one pass over the diseases gives too few cases, round r
  draws each disease again with case seed `config.seed + r` (case ids `<disease>#<seed>` stay
  unique); the 8,359 OMIM diseases cover `default` in one round.
- One rubric per disease, `reject_sample(graph, disease, seed=config.seed)`: a rubric
  depends only on the disease and its differential, so cases of one disease share it.
- Splits by disease: `med_kg_qa.split_of(disease id)` (sha256 bucket mod 100: < 80 train,
  < 90 validation, else test), so no disease, hence no rubric, is in two splits, and a
  case's split depends only on its disease (sizes are about, not exactly, 80/10/10).
- Structured fields are JSON text (facts, rubrics, differential), as in `med_kg_qa`;
  `to_case` turns a read example back into plain Python for the evaluation code.

    from medjax import datasets
    from medjax.datasets import med_dialog_rubrics
    src = datasets.load("med_dialog_rubrics/tiny", split="test", data_dir="/tmp/tfds")
    case = med_dialog_rubrics.to_case(src[0])   # facts and rubrics parsed
"""

import dataclasses
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from medjax.datasets import med_kg_qa
from medjax.knowledge import graph as graph_lib
from medjax.synthesis import cases as cases_lib
from medjax.synthesis import rubrics as rubrics_lib

SPLITS = med_kg_qa.SPLITS
split_of = med_kg_qa.split_of
knowledge_graph = med_kg_qa.knowledge_graph
CITATION = """\
@article{meddialogrubrics2025,
  title={MedDialogRubrics: A Comprehensive Benchmark and Evaluation Framework for
         Multi-turn Medical Consultations in Large Language Models},
  year={2025}
}"""


@dataclasses.dataclass(eq=False)
class CasesConfig(tfds.core.BuilderConfig):
    """What a build contains.

    Attributes:
      num_cases: cases in all splits together.
      seed: shuffles the disease order, seeds round 0's cases and every rubric.
      k_items: `reject_sample`'s items per drawn set.
      num_samples: `reject_sample`'s drawn sets.
    """

    num_cases: int = 0
    seed: int = 0
    k_items: int = 8
    num_samples: int = 16


def _configs() -> list[CasesConfig]:
    return [
        CasesConfig(name="tiny", description="40 cases (seed 0), for tests.", num_cases=40),
        CasesConfig(
            name="default",
            description="5,200 cases (seed 0), the size of MedDialogRubrics.",
            num_cases=5_200,
        ),
    ]


def disease_order(graph: graph_lib.KnowledgeGraph, seed: int) -> list[str]:
    """The OMIM diseases, sorted then shuffled with `random.Random(seed)`."""
    diseases = sorted(d for d in graph.diseases() if d.startswith("OMIM:"))
    random.Random(seed).shuffle(diseases)
    return diseases


def synthesise(
    config: CasesConfig, graph: graph_lib.KnowledgeGraph | None = None
) -> list[tuple[cases_lib.PatientCase, rubrics_lib.RubricSet]]:
    """The (case, rubric) pairs of a config, in synthesis order (deterministic).

    Raises:
      RuntimeError: a whole round over the diseases gave no case.
    """
    graph = knowledge_graph() if graph is None else graph
    diseases = disease_order(graph, config.seed)
    out: list[tuple[cases_lib.PatientCase, rubrics_lib.RubricSet]] = []
    rubric_of: dict[str, rubrics_lib.RubricSet] = {}
    round_ = 0
    while len(out) < config.num_cases:
        before = len(out)
        for disease in diseases:
            # One disease at a time: a small config touches only the first few diseases.
            for case in cases_lib.synthesise_cases(graph, [disease], seed=config.seed + round_):
                if disease not in rubric_of:
                    rubric_of[disease] = rubrics_lib.reject_sample(
                        graph,
                        disease,
                        k_items=config.k_items,
                        num_samples=config.num_samples,
                        seed=config.seed,
                    )
                out.append((case, rubric_of[disease]))
            if len(out) == config.num_cases:
                break
        if len(out) == before:
            raise RuntimeError(
                f"med_dialog_rubrics/{config.name}: round {round_} gave no case"
                f" ({len(out)} of {config.num_cases} made)."
            )
        round_ += 1
    return out


def rubric_items(rubric: rubrics_lib.RubricSet) -> list[dict[str, Any]]:
    """The chosen items of a rubric as JSON-ready dicts (tuples as lists)."""
    return [json.loads(json.dumps(dataclasses.asdict(it))) for it in rubric.items]


def to_example(
    case: cases_lib.PatientCase,
    rubric: rubrics_lib.RubricSet,
    graph: graph_lib.KnowledgeGraph | None = None,
) -> dict[str, Any]:
    """A `med_dialog_rubrics` example (the builder's features) of a case and its rubric."""
    graph = knowledge_graph() if graph is None else graph
    differential = [
        {"id": d, "name": graph.name(d), "similarity": s} for d, s in rubric.differential
    ]
    return {
        "case_id": case.case_id,
        "disease_id": case.disease["id"],
        "disease_name": case.disease["name"],
        "age": np.float32(case.age),
        "sex": case.sex,
        "onset": case.onset or "",
        "chief_complaint": case.chief_complaint,
        "family_history": case.family_history,
        "facts": json.dumps([dataclasses.asdict(f) for f in case.facts], ensure_ascii=False),
        "rubrics": json.dumps(rubric_items(rubric), ensure_ascii=False),
        "differential": json.dumps(differential, ensure_ascii=False),
        "seed": case.seed,
        "rubric_seed": rubric.seed,
    }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def to_case(example: Mapping[str, Any]) -> dict[str, Any]:
    """A read example as plain Python for the evaluation code.

    Returns:
      A dict with case_id, disease {id, name}, age (float, the stored float32's shortest
      decimal, i.e. the synthesised age), sex, onset (HP id or None), chief_complaint,
      family_history, facts (list of `AtomicFact` dicts), rubrics (list of `RubricItem`
      dicts, priority in {1, 2, 3}), differential (list of {id, name, similarity}), seed,
      rubric_seed.
    """
    onset = _text(example["onset"])
    return {
        "case_id": _text(example["case_id"]),
        "disease": {"id": _text(example["disease_id"]), "name": _text(example["disease_name"])},
        "age": float(str(np.float32(example["age"]))),
        "sex": _text(example["sex"]),
        "onset": onset or None,
        "chief_complaint": _text(example["chief_complaint"]),
        "family_history": _text(example["family_history"]),
        "facts": json.loads(_text(example["facts"])),
        "rubrics": json.loads(_text(example["rubrics"])),
        "differential": json.loads(_text(example["differential"])),
        "seed": int(example["seed"]),
        "rubric_seed": int(example["rubric_seed"]),
    }


def split_examples(examples: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Examples grouped by `split_of` their disease, each group in synthesis order."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for example in examples:
        out[split_of(example["disease_id"])].append(example)
    return out


class MedDialogRubrics(med_kg_qa._OfflineBuilder):
    """Synthetic patient cases of OMIM diseases with must-ask rubrics."""

    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: configs tiny (40) and default (5,200); train, validation"
        " and test split by disease (sha256 buckets 80/10/10).",
    }
    BUILDER_CONFIGS = _configs()

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Synthetic rare-disease patients (HPO annotations of OMIM diseases) for"
                " simulated consultations, each with the must-ask rubric of its disease"
                " (reject sampling over discriminative phenotypes against the differential)."
                " facts, rubrics and differential are JSON."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "case_id": text(),
                    "disease_id": text(),
                    "disease_name": text(),
                    "age": tfds.features.Scalar(dtype=np.float32),
                    "sex": text(),
                    "onset": text(),
                    "chief_complaint": text(),
                    "family_history": text(),
                    "facts": text(),
                    "rubrics": text(),
                    "differential": text(),
                    "seed": tfds.features.Scalar(dtype=np.int32),
                    "rubric_seed": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            homepage=med_kg_qa.HOMEPAGE,
            citation=CITATION + "\n" + med_kg_qa.CITATION,
            license=med_kg_qa.LICENSE,
        )

    def _generate_examples(self, examples: Sequence[dict[str, Any]]) -> Iterator:
        for example in examples:
            yield example["case_id"], example

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Built from the bundled HPO release; nothing to download.
        graph = knowledge_graph()
        pairs = synthesise(self.builder_config, graph)
        groups = split_examples([to_example(c, r, graph) for c, r in pairs])
        return {split: self._generate_examples(group) for split, group in groups.items()}
