"""Must-ask rubrics for a rare-disease consultation, by reject sampling (MedDialogRubrics).

MedDialogRubrics (papers.md 1) has an LLM draft must-ask items from guidelines, keeps the
best by reject sampling, merges overlapping items and prioritises them. Here the evidence
is the HPO graph (medical_notes.md 3.6 item 2). For a target disease D and its differential
S (`similarity.differential`), each phenotype p of D or of S scores its discriminative power

    score(p) = f(p|D) - max_{D' ∈ S} f(p|D')

with f the propagated frequency midpoint (`similarity.frequency_of`; NOT rows give 0).
score > 0: D has p more often than any rival ("phenotype" item); score < 0: a rival has it
and D has it less, lacks it or lists it NOT ("negative" item, a pertinent negative).
An "inheritance" item scores the share of annotated rivals whose mode set differs from D's,
when any does; four "generic" history items (onset, family history, consanguinity,
development/growth) score 0 and always get priority 1.

The verifier scores a rubric set R against the candidates C (sorted by |score|, top N):

    coverage    = Σ_{c ∈ top_N(C), c covered by R} |score_c| / Σ_{c ∈ top_N(C)} |score_c|
    redundancy  = #{pairs of R whose concepts are equal or ancestor/descendant} / #pairs
    askability  = share of R that a patient can report in a history (`askable`)
    total       = coverage + ASKABILITY_WEIGHT·askability - REDUNDANCY_WEIGHT·redundancy

(generic items are left out of all three). `reject_sample` draws `num_samples` sets, from
the deterministic scorer (k items without replacement, probability ∝ |score|) or from an
LLM `writer` whose JSON items are mapped to HPO terms by exact name/synonym match, merges
overlapping items, and keeps the set with the best total. Priorities are score terciles by
rank: with n scored items and r the number of items with a strictly larger |score|,
priority = 3 - floor(3r / n) (3 most important; weights for a HealthBench-style coverage).
"""

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from medjax.knowledge import similarity
from medjax.knowledge.graph import PHENOTYPIC_ABNORMALITY, KnowledgeGraph

if TYPE_CHECKING:
    from medjax.llm.base import TextBackend

KINDS = ("phenotype", "negative", "inheritance", "generic")
ASKABILITY_WEIGHT = 0.25
REDUNDANCY_WEIGHT = 0.5
# The askability heuristic: terms a patient cannot report from their history, found by
# subtree (metabolic/laboratory and cellular findings) or by words of test results.
UNASKABLE_ROOTS = (
    "HP:0001939",  # Abnormality of metabolism/homeostasis
    "HP:0025354",  # Abnormal cellular phenotype
)
UNASKABLE_WORDS = (
    "level",
    "concentration",
    "imaging",
    "serum",
    "plasma",
    "mri",
    "electroencephalogra",
    "eeg",
    "histolog",
    "biopsy",
    "activity",
)
# (id, text, concepts): the fixed low-weight history checklist (medical_notes.md 3.6).
GENERIC_ITEMS = (
    ("generic:onset", "Asks when the problems began (age of onset)", ("HP:0003674",)),
    ("generic:family_history", "Asks about a family history of similar problems", ("HP:0032316",)),
    ("generic:consanguinity", "Asks whether the parents are related (consanguinity)", ()),
    (
        "generic:development",
        "Asks about development and growth",
        ("HP:0001263", "HP:0001507"),
    ),
)


@dataclasses.dataclass(frozen=True)
class RubricItem:
    """One must-ask item.

    Attributes:
      id: the HP id for phenotype/negative items, "inheritance", or "generic:<name>".
      text: the item as the judge reads it, e.g. "Asks about seizure".
      kind: one of KINDS.
      concepts: HP ids the item is about (the merged ones too; modes for inheritance).
      synonyms: lowercased names and synonyms of `concepts`, to match a dialogue later.
      expected: the true disease's answer: "present" (f(p|D) >= 0.5), "absent" (NOT row,
        or f(p|D) = 0 under the closed-world reading of the annotations) or "unknown".
      score: score(p) (signed), the inheritance share, or 0 for generic items.
      priority: 3/2/1 (0 until `assign_priorities`).
      covers: ids of the candidates this item stands for (itself and those merged in).
      evidence: (disease id, f(p|disease)) for D then S; empty for generic items.
    """

    id: str
    text: str
    kind: str
    concepts: tuple[str, ...]
    synonyms: tuple[str, ...]
    expected: str
    score: float
    priority: int = 0
    covers: tuple[str, ...] = ()
    evidence: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass
class RubricSet:
    """The outcome of `reject_sample`, everything kept for inspection.

    Attributes:
      disease: the target disease id.
      differential: [(disease id, similarity)] used as S.
      items: the chosen items, merged and prioritised, in decreasing |score| then generic.
      candidates: every scored candidate item (the evidence), decreasing |score|.
      samples: per sampled set, its item ids (after merging) and its verifier dict.
      best: index into `samples` of the kept set.
      source: "scorer" or "writer".
      seed: the sampling seed.
    """

    disease: str
    differential: list[tuple[str, float]]
    items: list[RubricItem]
    candidates: list[RubricItem]
    samples: list[tuple[tuple[str, ...], dict[str, float]]]
    best: int
    source: str
    seed: int


def _synonyms(graph: KnowledgeGraph, concepts: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for c in concepts:
        term = graph.data.terms.get(c)
        if term is not None:
            out += [term.name.lower(), *(s.lower() for s in term.synonyms)]
    return tuple(dict.fromkeys(out))


def _expected(f: float, negated: bool) -> str:
    if negated or f == 0:
        return "absent"
    return "present" if f >= 0.5 else "unknown"


def phenotype_item(
    graph: KnowledgeGraph, disease: str, differential: Sequence[str], phenotype: str
) -> RubricItem:
    """The item of one phenotype, scored by score(p) = f(p|D) - max_{D'∈S} f(p|D')."""
    f_d = similarity.frequency_of(graph, disease, phenotype)
    rivals = [(d, similarity.frequency_of(graph, d, phenotype)) for d in differential]
    score = f_d - max((f for _, f in rivals), default=0.0)
    return RubricItem(
        id=phenotype,
        text=f"Asks about {graph.name(phenotype).lower()}",
        kind="negative" if score < 0 else "phenotype",
        concepts=(phenotype,),
        synonyms=_synonyms(graph, (phenotype,)),
        expected=_expected(f_d, similarity.is_negated(graph, disease, phenotype)),
        score=float(score),
        covers=(phenotype,),
        evidence=((disease, f_d), *rivals),
    )


def generic_items(graph: KnowledgeGraph) -> list[RubricItem]:
    """The fixed history checklist, score 0, priority 1."""
    return [
        RubricItem(
            id=i,
            text=text,
            kind="generic",
            concepts=tuple(c for c in concepts if c in graph.data.terms),
            synonyms=_synonyms(graph, concepts),
            expected="unknown",
            score=0.0,
            priority=1,
            covers=(i,),
        )
        for i, text, concepts in GENERIC_ITEMS
    ]


def candidate_items(
    graph: KnowledgeGraph,
    disease: str,
    differential: Sequence[str] | Sequence[tuple[str, float]],
    *,
    generic: bool = True,
) -> list[RubricItem]:
    """Every discriminating item for `disease` against `differential` (module docstring).

    Args:
      graph: the knowledge graph.
      disease: the target D.
      differential: S, as disease ids or (id, similarity) pairs.
      generic: append the generic checklist.

    Returns:
      Items with score != 0 in decreasing |score| (ties by id), then the generic ones.
    """
    rivals = similarity.differential_ids(differential)
    phenotypes: dict[str, None] = {}
    for d in (disease, *rivals):
        for p in graph.neighbours(d, "has_phenotype"):
            phenotypes[p] = None
    for p in graph.neighbours(disease, "lacks_phenotype"):
        phenotypes[p] = None
    items = []
    for p in phenotypes:
        if PHENOTYPIC_ABNORMALITY not in similarity.ancestors(graph, p):
            continue
        item = phenotype_item(graph, disease, rivals, p)
        if item.score != 0:
            items.append(item)
    modes = frozenset(graph.neighbours(disease, "inheritance"))
    rival_modes = [frozenset(graph.neighbours(d, "inheritance")) for d in rivals]
    rival_modes = [m for m in rival_modes if m]
    differing = sum(m != modes for m in rival_modes)
    if modes and differing:
        names = "; ".join(sorted(graph.name(m).lower() for m in modes))
        items.append(
            RubricItem(
                id="inheritance",
                text=f"Asks about the family history and inheritance pattern ({names})",
                kind="inheritance",
                concepts=tuple(sorted(modes)),
                synonyms=_synonyms(graph, sorted(modes)),
                expected="present",
                score=differing / len(rival_modes),
                covers=("inheritance",),
            )
        )
    items.sort(key=lambda it: (-abs(it.score), it.id))
    return items + (generic_items(graph) if generic else [])


def askable(graph: KnowledgeGraph, item: RubricItem) -> bool:
    """Whether a patient could answer the item from their history (a simple heuristic).

    Inheritance and generic items are askable; a phenotype is not when any concept lies
    under `UNASKABLE_ROOTS` (metabolic/laboratory, cellular) or its name contains one of
    `UNASKABLE_WORDS` (levels, concentrations, imaging, EEG, biopsy, ...).
    """
    if item.kind in ("inheritance", "generic"):
        return True
    for c in item.concepts:
        above = similarity.ancestors(graph, c)
        if c in UNASKABLE_ROOTS or any(r in above for r in UNASKABLE_ROOTS):
            return False
        words = re.findall(r"[a-z]+", graph.name(c).lower())
        if any(w.startswith(u) for w in words for u in UNASKABLE_WORDS):
            return False
    return True


def _related(graph: KnowledgeGraph, a: str, b: str) -> bool:
    return a == b or a in similarity.ancestors(graph, b) or b in similarity.ancestors(graph, a)


def verify(
    items: Sequence[RubricItem],
    graph: KnowledgeGraph,
    candidates: Sequence[RubricItem],
    *,
    top_n: int = 8,
) -> dict[str, float]:
    """Scores a rubric set (module docstring).

    Args:
      items: the rubric set; generic items are ignored.
      graph: the knowledge graph (ancestry and askability).
      candidates: the scored candidates; the top `top_n` by |score| are the evidence.
      top_n: N.

    Returns:
      {"coverage", "redundancy", "askability", "total", "num_items"}; coverage, redundancy
      and askability in [0, 1] (0 for an empty set; redundancy 0 with fewer than two items).
    """
    scored = [it for it in items if it.kind != "generic"]
    top = sorted(
        (c for c in candidates if c.kind != "generic"), key=lambda c: (-abs(c.score), c.id)
    )[:top_n]
    covered = {i for it in scored for i in it.covers}
    total = sum(abs(c.score) for c in top)
    coverage = sum(abs(c.score) for c in top if c.id in covered) / total if total else 0.0
    hp = [it for it in scored if it.kind in ("phenotype", "negative")]
    pairs = len(scored) * (len(scored) - 1) // 2
    redundant = sum(
        any(_related(graph, a, b) for a in x.concepts for b in y.concepts)
        for i, x in enumerate(hp)
        for y in hp[i + 1 :]
    )
    redundancy = redundant / pairs if pairs else 0.0
    ask = sum(askable(graph, it) for it in scored) / len(scored) if scored else 0.0
    return {
        "coverage": float(coverage),
        "redundancy": float(redundancy),
        "askability": float(ask),
        "total": float(coverage + ASKABILITY_WEIGHT * ask - REDUNDANCY_WEIGHT * redundancy),
        "num_items": float(len(scored)),
    }


def merge(items: Sequence[RubricItem], graph: KnowledgeGraph) -> list[RubricItem]:
    """Merges items of one kind whose concepts are ancestor/descendant into the more
    specific one: it keeps its id, text and expected answer, takes the union of concepts,
    synonyms and covers, and the larger |score| (with its own sign). Order is kept (the
    merged item takes the place of the first of the pair)."""
    out: list[RubricItem] = []
    for item in items:
        for j, kept in enumerate(out):
            if (
                item.kind == kept.kind
                and item.kind in ("phenotype", "negative")
                and _related(graph, item.concepts[0], kept.concepts[0])
            ):
                # The more specific one has the other among its ancestors.
                specific, general = (
                    (item, kept)
                    if kept.concepts[0] in similarity.ancestors(graph, item.concepts[0])
                    else (kept, item)
                )
                sign = 1.0 if specific.score >= 0 else -1.0
                out[j] = dataclasses.replace(
                    specific,
                    concepts=tuple(dict.fromkeys(specific.concepts + general.concepts)),
                    synonyms=tuple(dict.fromkeys(specific.synonyms + general.synonyms)),
                    covers=tuple(dict.fromkeys(specific.covers + general.covers)),
                    score=sign * max(abs(specific.score), abs(general.score)),
                    evidence=specific.evidence,
                )
                break
        else:
            out.append(item)
    return out


def assign_priorities(items: Sequence[RubricItem]) -> list[RubricItem]:
    """Priority 3 - floor(3r/n) by |score| rank (r: items with a strictly larger |score|,
    n: scored items); generic items get 1."""
    scored = [abs(it.score) for it in items if it.kind != "generic"]
    n = len(scored)
    out = []
    for it in items:
        if it.kind == "generic":
            out.append(dataclasses.replace(it, priority=1))
        else:
            r = sum(s > abs(it.score) for s in scored)
            out.append(dataclasses.replace(it, priority=3 - (3 * r) // n))
    return out


def _writer_prompt(graph: KnowledgeGraph, disease: str, rivals: Sequence[str], k: int) -> str:
    from medjax.knowledge.corpus import disease_document

    rival_names = "; ".join(f"{graph.name(d)} ({d})" for d in rivals)
    return (
        f"{disease_document(graph, disease).text}\n\nDifferential diagnoses: {rival_names}.\n\n"
        f"List the {k} findings a doctor must ask about to tell this disorder from its "
        "differential, including pertinent negatives. Answer with a JSON list of exact HPO "
        'term names, e.g. ["Seizure", "Hearing impairment"].'
    )


def parse_writer_items(
    text: str, graph: KnowledgeGraph, disease: str, rivals: Sequence[str]
) -> list[RubricItem]:
    """Maps a writer's JSON list to items: each entry (a string, or an object with "name",
    "phenotype" or "text") is matched to an HPO term by exact lowercased name or synonym;
    unmappable entries, and anything if the text holds no JSON list, are dropped."""
    match = re.search(r"\[.*\]", text, re.DOTALL)
    if not match:
        return []
    try:
        entries = json.loads(match.group(0))
    except json.JSONDecodeError:
        return []
    lookup = _name_index(graph)
    out: dict[str, RubricItem] = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict):
            entry = entry.get("name") or entry.get("phenotype") or entry.get("text")
        if not isinstance(entry, str):
            continue
        term = lookup.get(entry.strip().lower())
        if term is not None and term not in out:
            out[term] = phenotype_item(graph, disease, rivals, term)
    return list(out.values())


_NAME_INDEXES: dict[int, tuple[KnowledgeGraph, dict[str, str]]] = {}


def _name_index(graph: KnowledgeGraph) -> dict[str, str]:
    """Lowercased name/synonym -> HP id over non-obsolete phenotypic abnormalities (names
    win over synonyms)."""
    held = _NAME_INDEXES.get(id(graph))
    if held is not None and held[0] is graph:
        return held[1]
    names: dict[str, str] = {}
    synonyms: dict[str, str] = {}
    for term in graph.data.terms.values():
        if term.obsolete or PHENOTYPIC_ABNORMALITY not in similarity.ancestors(graph, term.id):
            continue
        names.setdefault(term.name.lower(), term.id)
        for s in term.synonyms:
            synonyms.setdefault(s.lower(), term.id)
    lookup = {**synonyms, **names}
    _NAME_INDEXES.clear()  # One graph at a time; keeps no stale graph alive.
    _NAME_INDEXES[id(graph)] = (graph, lookup)
    return lookup


def reject_sample(
    graph: KnowledgeGraph,
    disease: str,
    *,
    k_items: int = 8,
    num_samples: int = 16,
    seed: int = 0,
    writer: "TextBackend | None" = None,
    differential: Sequence[tuple[str, float]] | Sequence[str] | None = None,
    differential_k: int = 5,
) -> RubricSet:
    """Samples rubric sets and keeps the verifier's best (module docstring).

    Args:
      graph: the knowledge graph.
      disease: the target disease id.
      k_items: items drawn per set (before merging), and the verifier's top-N.
      num_samples: sets drawn.
      seed: seeds numpy's Generator (scorer) or nothing (the writer's own sampling).
      writer: an LLM TextBackend drafting JSON lists of HPO names; None uses the scorer.
      differential: S as (id, similarity) pairs or ids (similarity NaN);
        `similarity.differential` when None.
      differential_k: |S| when computed here.

    Returns:
      The RubricSet, items prioritised, generic items last.
    """
    if differential is None:
        differential = similarity.differential(graph, disease, differential_k)
    rivals = similarity.differential_ids(differential)
    candidates = candidate_items(graph, disease, rivals)
    scored = [c for c in candidates if c.kind != "generic"]
    generic = [c for c in candidates if c.kind == "generic"]
    drafts: list[list[RubricItem]] = []
    if writer is None:
        rng = np.random.default_rng(seed)
        weights = np.asarray([abs(c.score) for c in scored], np.float64)
        size = min(k_items, len(scored))
        for _ in range(num_samples):
            picked = (
                sorted(rng.choice(len(scored), size, replace=False, p=weights / weights.sum()))
                if size
                else []
            )
            drafts.append([scored[i] for i in picked])
    else:
        from medjax.sampling import SamplingParams  # Imports jax: only on this path.

        prompt = [{"role": "user", "content": _writer_prompt(graph, disease, rivals, k_items)}]
        replies = writer.generate(
            [prompt], SamplingParams(max_new_tokens=512), num_samples=num_samples
        )
        drafts = [parse_writer_items(r.text, graph, disease, rivals) for r in replies]
    samples = []
    sets = []
    for draft in drafts:
        draft = sorted(draft, key=lambda c: (-abs(c.score), c.id))
        merged = merge(draft, graph)
        sets.append(merged)
        samples.append(
            (tuple(it.id for it in merged), verify(merged, graph, candidates, top_n=k_items))
        )
    best = int(np.argmax([s["total"] for _, s in samples])) if samples else 0
    chosen = sets[best] if sets else []
    return RubricSet(
        disease=disease,
        differential=[
            (d, math.nan) if isinstance(d, str) else (d[0], float(d[1])) for d in differential
        ],
        items=assign_priorities([*chosen, *generic]),
        candidates=candidates,
        samples=samples,
        best=best,
        source="scorer" if writer is None else "writer",
        seed=seed,
    )
