"""Synthetic patient cases from disease knowledge (MedDialogRubrics' case pipeline, offline).

A pipeline of deterministic agents, each a function of the previous stage and a seed:

  disease_template  phenotypes with frequencies, onset, inheritance, sex-specific rows and
                    pertinent negatives of one disease, from the HPO annotations;
  generate_record   a patient: age consistent with the onset, sex consistent with
                    sex-specific rows and X-linked inheritance, phenotypes drawn with their
                    frequency midpoints (unknown: 0.5), pertinent negatives, family history
                    from the inheritance;
  check_consistency rejects contradictions: a finding both present and negated (also through
                    the ontology: a present descendant of a negated term), an age below the
                    onset, findings of the other sex's anatomy;
  atomic_facts      one self-contained fact per finding, tagged history / exam / test, in lay
                    words where HPO has a layperson synonym;
  chief_complaint   the most salient history facts, in lay words.

`synthesise_case` runs the pipeline and redraws (next seed) until the checker passes. Any
stage's text can be rewritten by an LLM through `rewrite_facts` (a `TextBackend`).
"""

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from medjax.knowledge import hpo
from medjax.knowledge.graph import KnowledgeGraph

ONSET_ROOT = "HP:0003674"
# Onset terms -> the patient's age range at the visit, in years.
ONSET_AGES: dict[str, tuple[float, float]] = {
    "HP:0011461": (0.0, 1.0),  # Fetal onset
    "HP:0030674": (0.0, 1.0),  # Antenatal onset
    "HP:0003577": (0.0, 2.0),  # Congenital onset
    "HP:0003623": (0.0, 1.0),  # Neonatal onset
    "HP:0003593": (0.1, 2.0),  # Infantile onset
    "HP:0011463": (1.0, 6.0),  # Childhood onset
    "HP:0003621": (5.0, 16.0),  # Juvenile onset
    "HP:0003581": (16.0, 60.0),  # Adult onset
    "HP:0011462": (16.0, 40.0),  # Young adult onset
    "HP:0003596": (40.0, 60.0),  # Middle age onset
    "HP:0003584": (60.0, 80.0),  # Late onset
}
DEFAULT_AGES = (1.0, 60.0)
X_LINKED = ("HP:0001417", "HP:0001419", "HP:0001423")  # X-linked (recessive, dominant).
AUTOSOMAL_DOMINANT, AUTOSOMAL_RECESSIVE = "HP:0000006", "HP:0000007"
# Anatomy of one sex: a finding under these roots cannot occur in the other sex.
MALE_ONLY_ROOTS = ("HP:0000032", "HP:0000036")  # Abnormal male genitalia / penis.
FEMALE_ONLY_ROOTS = ("HP:0010460", "HP:0000130")  # Abnormal female genitalia / uterus.
# Findings a doctor learns from tests (by subtree), and words that mark lab or imaging terms.
TEST_ROOTS = ("HP:0001939", "HP:0001871", "HP:0003110", "HP:0001877")
TEST_WORDS = (
    "level",
    "concentration",
    "count",
    "activity",
    "interval",
    "imaging",
    "on mri",
    "eeg",
    "ecg",
)
EXAM_WORDS = ("morphology", "shaped", "hypertelorism", "palpebral", "philtrum", "malformation")
UNKNOWN_FREQUENCY = 0.5
MIN_FINDINGS = 3


@dataclasses.dataclass(frozen=True)
class DiseaseTemplate:
    disease: str
    name: str
    phenotypes: tuple[tuple[str, float, str], ...]  # (HP id, frequency, sex "" / MALE / FEMALE)
    negatives: tuple[str, ...]
    inheritance: tuple[str, ...]
    onsets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AtomicFact:
    """One self-contained fact the patient can state.

    Attributes:
      id: "f0", "f1", ... within the case.
      concept: an HPO id, or "family_history" / "onset".
      present: False for a pertinent negative.
      category: "history" (the patient can tell), "exam" or "test".
      text: the fact in the patient's words.
    """

    id: str
    concept: str
    present: bool
    category: str
    text: str


@dataclasses.dataclass
class PatientCase:
    case_id: str
    disease: dict[str, Any]  # {"id", "name"}
    age: float
    sex: str
    onset: str | None
    present: list[str]
    absent: list[str]
    family_history: str
    facts: list[AtomicFact] = dataclasses.field(default_factory=list)
    chief_complaint: str = ""
    seed: int = 0
    redraws: int = 0


def _ancestors_or_self(graph: KnowledgeGraph, term: str) -> set[str]:
    return {term} | graph.ancestors(term)


def disease_template(graph: KnowledgeGraph, disease: str) -> DiseaseTemplate:
    """Everything the annotation file says about one disease."""
    data = graph.data
    d = data.disease_ids.index(disease)
    a = data.annotations
    rows = (a.disease == d).nonzero()[0]
    phenotypes, negatives, onsets = {}, [], []
    aspect_p = hpo.ASPECTS.index("P")
    for r in rows.tolist():
        term = data.term_ids[a.term[r]]
        if a.onset[r] >= 0:
            onsets.append(data.term_ids[a.onset[r]])
        if graph.is_under(term, ONSET_ROOT):
            onsets.append(term)
            continue
        if a.aspect[r] != aspect_p:
            continue
        if a.negated[r]:
            negatives.append(term)
        elif term not in phenotypes:
            freq = float(a.frequency[r])
            freq = UNKNOWN_FREQUENCY if freq != freq else freq
            phenotypes[term] = (term, freq, hpo.SEXES[a.sex[r]])
    return DiseaseTemplate(
        disease, graph.name(disease), tuple(phenotypes.values()), tuple(negatives),
        tuple(graph.neighbours(disease, "inheritance")), tuple(dict.fromkeys(onsets)),
    )  # fmt: skip


def generate_record(
    graph: KnowledgeGraph, template: DiseaseTemplate, rng: random.Random, case_id: str
) -> PatientCase:
    onset = rng.choice(template.onsets) if template.onsets else None
    low, high = ONSET_AGES.get(onset, DEFAULT_AGES) if onset else DEFAULT_AGES
    age = round(rng.uniform(low, high), 1)
    sexes = {s for _, _, s in template.phenotypes if s}
    if len(sexes) == 1:
        sex = sexes.pop().lower()
    elif any(m in template.inheritance for m in X_LINKED):
        sex = "male" if rng.random() < 0.8 else "female"
    else:
        sex = rng.choice(["male", "female"])
    present = [
        p for p, f, s in template.phenotypes if (not s or s.lower() == sex) and rng.random() < f
    ]
    by_frequency = sorted(template.phenotypes, key=lambda x: -x[1])
    for p, _, s in by_frequency:  # Enough findings to interview about.
        if len(present) >= MIN_FINDINGS:
            break
        if p not in present and (not s or s.lower() == sex):
            present.append(p)
    if AUTOSOMAL_DOMINANT in template.inheritance and rng.random() < 0.5:
        family = "One of my parents has had similar problems."
    elif AUTOSOMAL_RECESSIVE in template.inheritance and rng.random() < 0.2:
        family = "My parents are cousins; nobody else in the family has this."
    elif any(m in template.inheritance for m in X_LINKED) and rng.random() < 0.5:
        family = "An uncle on my mother's side had something similar."
    else:
        family = "Nobody in my family has had anything like this."
    return PatientCase(
        case_id, {"id": template.disease, "name": template.name}, age, sex, onset,
        sorted(present), sorted(template.negatives), family,
    )  # fmt: skip


def check_consistency(graph: KnowledgeGraph, case: PatientCase) -> list[str]:
    """Contradictions in a record (empty when it is consistent)."""
    problems = []
    negated = set(case.absent)
    for p in case.present:
        clash = _ancestors_or_self(graph, p) & negated
        if clash:
            problems.append(f"{p} is present but {sorted(clash)[0]} is negated")
    if case.onset in ONSET_AGES and case.age < ONSET_AGES[case.onset][0]:
        problems.append(f"age {case.age} is below the onset {graph.name(case.onset)}")
    other = MALE_ONLY_ROOTS if case.sex == "female" else FEMALE_ONLY_ROOTS
    for p in case.present:
        if any(graph.is_under(p, root) for root in other):
            problems.append(f"{p} cannot occur in a {case.sex} patient")
    return problems


def category(graph: KnowledgeGraph, term: str) -> str:
    """history / exam / test, by subtree and name (a documented heuristic)."""
    name = graph.name(term).lower()
    if any(graph.is_under(term, root) for root in TEST_ROOTS) or any(w in name for w in TEST_WORDS):
        return "test"
    if any(w in name for w in EXAM_WORDS):
        return "exam"
    return "history"


def lay_name(graph: KnowledgeGraph, term: str) -> str:
    lay = graph.data.terms[term].lay_synonyms
    return (lay[0] if lay else graph.name(term)).lower()


def atomic_facts(graph: KnowledgeGraph, case: PatientCase) -> list[AtomicFact]:
    facts = []

    def add(concept, present, cat, text):
        facts.append(AtomicFact(f"f{len(facts)}", concept, present, cat, text))

    for p in case.present:
        cat = category(graph, p)
        words = lay_name(graph, p)
        text = {
            "history": f"I have {words}.",
            "exam": f"The doctor who examined me noted {words}.",
            "test": f"My tests showed {graph.name(p).lower()}.",
        }[cat]
        add(p, True, cat, text)
    for p in case.absent:
        add(p, False, category(graph, p), f"I do not have {lay_name(graph, p)}.")
    if case.onset:
        add("onset", True, "history", f"It started: {graph.name(case.onset).lower()}.")
    add("family_history", True, "history", case.family_history)
    return facts


def chief_complaint(graph: KnowledgeGraph, case: PatientCase, template: DiseaseTemplate) -> str:
    """The two most frequent present history findings, in lay words."""
    freq = {p: f for p, f, _ in template.phenotypes}
    history = [f for f in case.facts if f.present and f.category == "history" and f.concept in freq]
    history.sort(key=lambda f: (-freq[f.concept], f.concept))
    words = [lay_name(graph, f.concept) for f in history[:2]]
    if not words:
        return "I came because something is not right with my health."
    return "I came because of " + " and ".join(words) + "."


def synthesise_case(
    graph: KnowledgeGraph, disease: str, *, seed: int = 0, max_redraws: int = 20
) -> PatientCase:
    """One consistent case of `disease` (deterministic for a seed)."""
    template = disease_template(graph, disease)
    if not template.phenotypes:
        raise ValueError(f"synthesise_case: {disease} has no phenotype annotations.")
    for redraw in range(max_redraws):
        rng = random.Random(f"{disease}/{seed}/{redraw}")
        case = generate_record(graph, template, rng, f"{disease}#{seed}")
        if not check_consistency(graph, case):
            case.seed, case.redraws = seed, redraw
            case.facts = atomic_facts(graph, case)
            case.chief_complaint = chief_complaint(graph, case, template)
            return case
    raise ValueError(f"synthesise_case: no consistent record of {disease} in {max_redraws} draws.")


REWRITE_PROMPT = (
    "Rewrite each numbered statement as a patient would say it, in plain words. Keep its"
    " meaning exactly; add no symptom. Reply with the same numbering, one per line."
)


def rewrite_facts(case: PatientCase, backend, params=None) -> PatientCase:
    """Lay rewording of every fact by an LLM; a line that fails to parse keeps the template."""
    from medjax.sampling import SamplingParams

    params = params or SamplingParams(max_new_tokens=1024, temperature=0.7)
    listing = "\n".join(f"{i + 1}. {f.text}" for i, f in enumerate(case.facts))
    chat = [{"role": "system", "content": REWRITE_PROMPT}, {"role": "user", "content": listing}]
    reply = backend.generate([chat], params)[0].text
    lines = {}
    for line in reply.splitlines():
        head, _, rest = line.partition(". ")
        if head.strip().isdigit() and rest.strip():
            lines[int(head) - 1] = rest.strip()
    facts = [dataclasses.replace(f, text=lines.get(i, f.text)) for i, f in enumerate(case.facts)]
    return dataclasses.replace(case, facts=facts)


def synthesise_cases(
    graph: KnowledgeGraph, diseases: Sequence[str], *, seed: int = 0
) -> list[PatientCase]:
    """One case per disease, leaving out diseases whose annotations admit no consistent
    record (e.g. an obligate finding whose ancestor is annotated NOT)."""
    out = []
    for d in diseases:
        try:
            out.append(synthesise_case(graph, d, seed=seed))
        except ValueError:
            continue
    return out
