"""The MedDialogRubrics benchmark: a doctor interviews the patient agent, then diagnoses.

Each case is a synthetic patient (`synthesis.cases`) with a must-ask rubric
(`synthesis.rubrics`, weights 3/2/1). The doctor, any `TextBackend` (a medjax checkpoint, an
OpenAI-compatible endpoint, a scripted baseline), sees the chief complaint, asks up to
`max_turns` questions, may stop with "End Inquiry", and then gives a diagnosis in
`<answer>...</answer>`; all cases run batched through the agent loop, the patient as its
responder.

Scores (deterministic concept matching by default):
- rubric coverage: sum of the weights of met items over the total (HealthBench-style); an
  item is met when a doctor turn mentions one of its concepts (HPO names and synonyms, also
  through ancestors or descendants) or, for the generic history items, its keywords;
- precision: share of the doctor's questions that meet at least one item; recall: share of
  items met; F1;
- diagnosis accuracy: exact match of the normalised answer with the disease's name or
  aliases (`envs.research.exact_match`), or a judge backend;
- turns used, and weighted coverage after each turn (the paper's temporal curve).

Scripted baselines bracket the scale: `RandomDoctor` (questions about random findings),
`ChecklistDoctor` (a generic history checklist) and `OracleDoctor` (asks the rubric items by
priority and names the disease: the upper bound).
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from medjax import agents
from medjax.envs.patient import ConceptMatcher, KnowledgePatient
from medjax.envs.research import exact_match
from medjax.knowledge.graph import KnowledgeGraph
from medjax.llm.base import Generation
from medjax.sampling import SamplingParams
from medjax.synthesis import cases as cases_lib
from medjax.synthesis import qa, rubrics

END = "End Inquiry"
SYSTEM_PROMPT = (
    "You are a doctor taking a patient's history. Ask one question per turn. When you have"
    f" enough information, say '{END}'; you will then be asked for your diagnosis."
)
DIAGNOSIS_PROMPT = "Give your most likely diagnosis now, inside <answer></answer>."
GENERIC_KEYWORDS = {
    "generic:onset": ("when did", "start", "began", "begin", "how long", "since when", "onset"),
    "generic:family_history": ("family", "relatives", "parents", "siblings"),
    "generic:consanguinity": ("related to each other", "cousins", "consanguin", "blood relat"),
    "generic:development": ("develop", "milestone", "growth", "grow"),
}
CHECKLIST = (
    "When did your problems start?",
    "Does anyone in your family have similar problems?",
    "Are your parents related to each other, for example cousins?",
    "How has your development and growth been?",
    "Do you have a fever?",
    "Do you have any pain?",
    "Do you have seizures?",
    "Do you feel tired or weak?",
    "Have you lost weight?",
    "Do you have any breathing problems?",
)


@dataclasses.dataclass
class BenchmarkCase:
    """One interview: the patient case, its rubric, accepted diagnoses, and for cases from
    the released file (`cases_from_xlsx`) the free-text medical record the patient uses."""

    case: cases_lib.PatientCase
    rubric: list[rubrics.RubricItem]
    aliases: list[str]
    record: str = ""


def build_cases(graph: KnowledgeGraph, num_cases: int, *, seed: int = 0) -> list[BenchmarkCase]:
    """Synthesises `num_cases` cases of distinct OMIM diseases, with their rubrics."""
    diseases = sorted(d for d in graph.diseases() if d.startswith("OMIM:"))
    random.Random(seed).shuffle(diseases)
    out = []
    for disease in diseases:
        if len(out) == num_cases:
            break
        made = cases_lib.synthesise_cases(graph, [disease], seed=seed)
        if not made:
            continue
        rubric = rubrics.reject_sample(graph, disease, seed=seed).items
        out.append(BenchmarkCase(made[0], list(rubric), qa.aliases(graph, disease)))
    return out


class RubricJudge:
    """Deterministic judge: which rubric items a doctor's question meets."""

    def __init__(self, graph: KnowledgeGraph, matcher: ConceptMatcher):
        self.graph, self.matcher = graph, matcher

    def met(self, question: str, rubric: Sequence[rubrics.RubricItem]) -> set[str]:
        mentioned = {t for t, _ in self.matcher.find(question)}
        related = set(mentioned)
        for t in mentioned:
            related |= self.graph.ancestors(t)
        lowered = question.lower()
        hits = set()
        for item in rubric:
            if item.id in GENERIC_KEYWORDS:
                if any(k in lowered for k in GENERIC_KEYWORDS[item.id]):
                    hits.add(item.id)
                continue
            for concept in item.concepts:
                if concept in related or any(
                    concept in self.graph.ancestors(m) or m in self.graph.ancestors(concept)
                    for m in mentioned
                ):
                    hits.add(item.id)
                    break
            else:
                if any(s and s in lowered for s in item.synonyms):
                    hits.add(item.id)
        return hits


def score_case(
    judge: RubricJudge, bench: BenchmarkCase, trajectory: agents.Trajectory, max_turns: int
) -> dict[str, Any]:
    questions = [t.reply for t in trajectory.turns if not t.forced_final and END not in t.reply]
    weights = {i.id: i.priority for i in bench.rubric}
    total = sum(weights.values()) or 1
    met: set[str] = set()
    curve, useful = [], 0
    for q in questions:
        hits = judge.met(q, bench.rubric)
        useful += bool(hits)
        met |= hits
        curve.append(sum(weights[i] for i in met) / total)
    curve += [curve[-1] if curve else 0.0] * (max_turns - len(curve))
    precision = useful / len(questions) if questions else 0.0
    recall = len(met) / len(weights) if weights else 0.0
    return {
        "case_id": bench.case.case_id,
        "disease": bench.case.disease,
        "coverage": curve[-1] if curve else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "diagnosis_correct": exact_match(trajectory.answer, bench.aliases)
        or (
            trajectory.answer is not None
            and hasattr(judge, "same_diagnosis")
            and judge.same_diagnosis(trajectory.answer, bench.aliases[0])
        ),
        "answer": trajectory.answer,
        "turns": len(questions),
        "coverage_by_turn": curve[:max_turns],
        "met": sorted(met),
    }


def doctor_agent(
    doctor,
    benchmark: Sequence[BenchmarkCase],
    patient,
    *,
    max_turns: int = 12,
    sampling: SamplingParams | None = None,
    **agent_kwargs,
) -> agents.AgentSpec:
    """The doctor as the agent loop runs it: the patient answers every question that is
    neither "End Inquiry" nor an answer, and "End Inquiry" asks for the diagnosis.

    Args:
      doctor: the doctor's TextBackend (a TokenBackend keeps exact ids for training).
      benchmark: every case the doctor may meet (the patient finds a case by query id).
      patient: anything with `reply(case, question)`.
      sampling: per-turn sampling (default 128 new tokens at temperature 0.7).
      agent_kwargs: other `AgentSpec` fields (`max_context_tokens`, `final_turn_tokens`).
    """
    by_id = {b.case.case_id: b for b in benchmark}

    def respond(trajectories):
        return [
            patient.reply(by_id[t.query_id].case, t.messages[-1]["content"]) for t in trajectories
        ]

    return agents.AgentSpec(
        "doctor", doctor, system_prompt=SYSTEM_PROMPT, responder=respond,
        end_phrases=(END,), answer_after_end=True, max_turns=max_turns,
        early_stop_prompt=DIAGNOSIS_PROMPT,
        sampling=sampling or SamplingParams(max_new_tokens=128, temperature=0.7), **agent_kwargs,
    )  # fmt: skip


def queries(benchmark: Sequence[BenchmarkCase]) -> list[agents.Query]:
    """One interview per case: the case's opening line (age, sex, chief complaint)."""
    return [
        agents.Query(b.case.case_id, _prompt(b), {"disease": b.case.disease}) for b in benchmark
    ]


def run(
    doctor,
    benchmark: Sequence[BenchmarkCase],
    graph: KnowledgeGraph | None,
    *,
    max_turns: int = 12,
    patient=None,
    judge=None,
) -> tuple[list[agents.Trajectory], list[dict[str, Any]]]:
    """Interviews every case (batched) and scores it.

    Args:
      patient: anything with `reply(case, question)`; default the `KnowledgePatient`.
      judge: anything with `met(question, rubric) -> item ids`; default `RubricJudge`
        (concept matching; needs `graph`), or a `JudgePanel` of LLM judges.
    """
    matcher = ConceptMatcher(graph) if graph is not None else None
    if (patient is None or judge is None) and graph is None:
        raise ValueError("dialogue.run: the default patient and judge need the graph.")
    patient = patient or KnowledgePatient(graph, matcher)
    judge = judge or RubricJudge(graph, matcher)
    agent = doctor_agent(doctor, benchmark, patient, max_turns=max_turns)
    trajectories = agents.run_episodes(agent, queries(benchmark))
    scores = [
        score_case(judge, b, t, max_turns) for b, t in zip(benchmark, trajectories, strict=True)
    ]
    return trajectories, scores


# -- LLM judges and the released file -------------------------------------------------------

JUDGE_PROMPT = (
    "You check a doctor's history taking. For each numbered must-ask item, answer whether"
    " the doctor's question asks about it. Reply with one line per item: '<number>: yes' or"
    " '<number>: no'."
)
VOTING = ("majority", "unanimous", "liberal")


class JudgePanel:
    """LLM judges voting on which rubric items a question meets.

    Args:
      backends: one TextBackend per judge; each call sends every item at once.
      voting: "majority" (more than half say yes), "unanimous" or "liberal" (any says yes).
    """

    def __init__(self, backends: Sequence, voting: str = "majority"):
        if voting not in VOTING:
            raise ValueError(f"JudgePanel: voting must be one of {VOTING}, got {voting!r}.")
        if not backends:
            raise ValueError("JudgePanel: give at least one judge backend.")
        self.backends, self.voting = list(backends), voting

    def met(self, question: str, rubric: Sequence[rubrics.RubricItem]) -> set[str]:
        listing = "\n".join(f"{i + 1}. {item.text}" for i, item in enumerate(rubric))
        chat = [
            {"role": "system", "content": JUDGE_PROMPT},
            {"role": "user", "content": f"Items:\n{listing}\n\nDoctor's question: {question}"},
        ]
        params = SamplingParams(max_new_tokens=16 * len(rubric) + 16, greedy=True)
        votes = [0] * len(rubric)
        for backend in self.backends:
            text = backend.generate([chat], params)[0].text
            for match in re.finditer(r"(\d+)\s*[:.)-]\s*(yes|no)", text.lower()):
                k = int(match.group(1)) - 1
                if 0 <= k < len(rubric) and match.group(2) == "yes":
                    votes[k] += 1
        return {item.id for item, v in zip(rubric, votes, strict=True) if self._passes(v)}

    def _passes(self, votes: int) -> bool:
        n = len(self.backends)
        return votes >= {"majority": n // 2 + 1, "unanimous": n, "liberal": 1}[self.voting]

    def same_diagnosis(self, answer: str, truth: str) -> bool:
        """Whether the panel (same voting) accepts `answer` as the diagnosis `truth`."""
        chat = [
            {"role": "system", "content": DIAGNOSIS_JUDGE_PROMPT},
            {
                "role": "user",
                "content": f"Correct diagnosis: {truth}\nDoctor's diagnosis: {answer}",
            },
        ]
        params = SamplingParams(max_new_tokens=8, greedy=True)
        votes = sum(
            b.generate([chat], params)[0].text.strip().lower().startswith("correct")
            for b in self.backends
        )
        return self._passes(votes)


DIAGNOSIS_JUDGE_PROMPT = (
    "Judge whether the doctor's diagnosis names the same disease as the correct diagnosis."
    " Reply with exactly one word: Correct or Incorrect."
)
RECORD_PATIENT_PROMPT = (
    "You are the patient described by this medical record. Answer the doctor's question in"
    " plain words, only from the record; if it does not say, answer that you are not sure."
    "\nRecord:\n{record}"
)


class RecordPatient:
    """An LLM patient for cases from the released file: answers from each case's free-text
    record (`BenchmarkCase.record`), with the same `reply(case, question)` as the others."""

    def __init__(
        self, backend, benchmark: Sequence[BenchmarkCase], params: SamplingParams | None = None
    ):
        self.backend = backend
        self.records = {b.case.case_id: b.record for b in benchmark}
        self.params = params or SamplingParams(max_new_tokens=256, temperature=0.7)

    def reply(self, case: cases_lib.PatientCase, question: str) -> str:
        record = self.records[case.case_id]
        chat = [
            {"role": "system", "content": RECORD_PATIENT_PROMPT.format(record=record)},
            {"role": "user", "content": question},
        ]
        return self.backend.generate([chat], self.params)[0].text.strip()


def cases_from_dataset(
    graph: KnowledgeGraph, examples: Sequence[Mapping[str, Any]]
) -> list[BenchmarkCase]:
    """Benchmark cases from `med_dialog_rubrics` examples (`med_dialog_rubrics.to_case`)."""
    out = []
    for c in examples:
        present = sorted(
            f["concept"] for f in c["facts"] if f["present"] and f["concept"].startswith("HP:")
        )
        absent = sorted(f["concept"] for f in c["facts"] if not f["present"])
        case = cases_lib.PatientCase(
            c["case_id"], c["disease"], c["age"], c["sex"], c["onset"], present, absent,
            c["family_history"], [cases_lib.AtomicFact(**f) for f in c["facts"]],
            c["chief_complaint"], c["seed"],
        )  # fmt: skip
        items = [rubrics.RubricItem(**{k: _tuples(v) for k, v in i.items()}) for i in c["rubrics"]]
        out.append(BenchmarkCase(case, items, qa.aliases(graph, c["disease"]["id"])))
    return out


def _tuples(value):
    """JSON lists back to the tuples the dataclasses hold (nested for `evidence`)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def cases_from_xlsx(records: Sequence[Mapping[str, Any]]) -> list[BenchmarkCase]:
    """Benchmark cases from `datasets.meddialog_xlsx.load_xlsx` rows: the must-ask points
    become equal-weight rubric items (judged by a `JudgePanel`), the diagnosis the answer."""
    out = []
    for r in records:
        case = cases_lib.PatientCase(
            f"xlsx-{r['row']}", {"id": None, "name": r["diagnosis"]}, 0.0, "", None, [], [],
            "", chief_complaint=r["chief_complaint"],
        )  # fmt: skip
        rubric = [
            rubrics.RubricItem(f"item{i}", text, "xlsx", (), (), "unknown", 0.0, 1)
            for i, text in enumerate(r["must_ask"])
        ]
        out.append(BenchmarkCase(case, rubric, [r["diagnosis"]], r["record"]))
    return out


def case_label(case_id: str) -> str:
    """The name the doctor knows the patient by: a digest of the case id, which for
    synthetic cases is "<OMIM id>#<seed>" and would give the diagnosis away."""
    return hashlib.sha256(case_id.encode("utf-8")).hexdigest()[:8]


def _prompt(bench: BenchmarkCase) -> str:
    c = bench.case
    if bench.record:  # The released file gives no demographics apart from the record.
        return f"Patient {case_label(c.case_id)}: {c.chief_complaint}"
    return f"Patient {case_label(c.case_id)}, {c.age:g} years old, {c.sex}: {c.chief_complaint}"


def summarise(scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = max(len(scores), 1)
    mean = lambda k: sum(float(s[k]) for s in scores) / n  # noqa: E731
    turns = len(scores[0]["coverage_by_turn"]) if scores else 0
    return {
        "cases": len(scores),
        "coverage": mean("coverage"),
        "precision": mean("precision"),
        "recall": mean("recall"),
        "f1": mean("f1"),
        "diagnosis_accuracy": mean("diagnosis_correct"),
        "turns": mean("turns"),
        "coverage_by_turn": [
            sum(s["coverage_by_turn"][t] for s in scores) / n for t in range(turns)
        ],
    }


# -- scripted doctors ---------------------------------------------------------------------


class _ScriptedDoctor:
    """A doctor that writes its turn from the case (found by the first user message)."""

    def __init__(self, benchmark: Sequence[BenchmarkCase], graph: KnowledgeGraph, seed: int = 0):
        self.cases = {_prompt(b): b for b in benchmark}
        self.graph, self.seed = graph, seed

    def generate(self, conversations, params, *, num_samples=1):
        out = []
        for chat in conversations:
            bench = self.cases[next(m["content"] for m in chat if m["role"] == "user")]
            asked = sum(m["role"] == "assistant" for m in chat)
            if chat[-1]["content"].endswith(DIAGNOSIS_PROMPT):
                text = f"<answer>{self.diagnose(bench)}</answer>"
            else:
                text = self.question(bench, asked) or END
            out.extend(Generation(text) for _ in range(num_samples))
        return out

    def diagnose(self, bench: BenchmarkCase) -> str:
        return "unknown"


class RandomDoctor(_ScriptedDoctor):
    """Asks about random phenotypes (seeded per case), 8 questions, then guesses."""

    def question(self, bench, asked):
        if asked >= 8:
            return None
        if not hasattr(self, "_phenotypes"):
            self._phenotypes = sorted(self.graph.phenotypes())
        rng = random.Random(f"{self.seed}/{bench.case.case_id}/{asked}")
        return f"Do you have {self.graph.name(rng.choice(self._phenotypes)).lower()}?"


class ChecklistDoctor(_ScriptedDoctor):
    """Goes through a generic history checklist."""

    def question(self, bench, asked):
        return CHECKLIST[asked] if asked < len(CHECKLIST) else None


class OracleDoctor(_ScriptedDoctor):
    """Asks the rubric items by priority and names the disease: the upper bound."""

    def question(self, bench, asked):
        items = sorted(bench.rubric, key=lambda i: (-i.priority, i.id))
        if asked >= len(items):
            return None
        item = items[asked]
        if item.id in GENERIC_KEYWORDS:
            return {
                "generic:onset": "When did your problems start?",
                "generic:family_history": "Does anyone in your family have similar problems?",
                "generic:consanguinity": "Are your parents related to each other, cousins maybe?",
                "generic:development": "How has your development and growth been?",
            }[item.id]
        concept = item.concepts[0] if item.concepts else None
        name = self.graph.name(concept).lower() if concept else item.text
        return f"Do you have {name}?"

    def diagnose(self, bench):
        return bench.case.disease["name"]


BASELINES = {"random": RandomDoctor, "checklist": ChecklistDoctor, "oracle": OracleDoctor}


# -- reports ------------------------------------------------------------------------------


def write_report(
    out_dir: str | os.PathLike, results: Mapping[str, tuple[list, list[dict[str, Any]]]]
) -> dict[str, Any]:
    """Per-doctor JSONL transcripts with scores, summary.json, report.md and PNG plots."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, (trajectories, scores) in results.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for t, s in zip(trajectories, scores, strict=True):
                record = {"scores": s, "transcript": t.messages, "turns": len(t.turns)}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        summary[name] = summarise(scores)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# MedDialogRubrics report",
        "",
        "| doctor | cases | coverage | precision | recall | F1 | diagnosis | turns |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['cases']} | {s['coverage']:.3f} | {s['precision']:.3f} |"
            f" {s['recall']:.3f} | {s['f1']:.3f} | {s['diagnosis_accuracy']:.3f} |"
            f" {s['turns']:.1f} |"
        )
    lines += ["", "![coverage by turn](coverage_by_turn.png)", "", "![scores](scores.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plots(out, summary)
    return summary


def _plots(out: pathlib.Path, summary: Mapping[str, Mapping[str, Any]]) -> None:
    # Figures of their own, not pyplot's: no global backend switched under a notebook.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, s in summary.items():
        curve = s["coverage_by_turn"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set_xlabel("turn")
    ax.set_ylabel("weighted rubric coverage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "coverage_by_turn.png", dpi=100)
    dims = ("coverage", "precision", "recall", "f1", "diagnosis_accuracy")
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    width = 0.8 / max(len(summary), 1)
    for k, (name, s) in enumerate(summary.items()):
        ax.bar([d + k * width for d in range(len(dims))], [s[d] for d in dims], width, label=name)
    ax.set_xticks([d + 0.4 - width / 2 for d in range(len(dims))], dims)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=100)
