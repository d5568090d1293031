"""The documents of the private retrieval engine, generated from the knowledge graph, and
`kg_lookup` (the tool around it, `kg_lookup_tool`, moved to `medjax.envs.tools`, so that this
package imports nothing from the agent loop).

HPO ships no disease descriptions, so each disease's document is written from its
annotations (medical_notes.md 3.6): inheritance, features grouped by frequency band,
pertinent negatives and genes, each with its id. Phenotype documents hold the term's name,
definition, synonyms and parent classes, and the diseases it is reported in (up to
`MAX_LISTED_DISEASES`, above the chains' hub threshold);
gene documents list the gene's disorders. A chain's hops can thus be followed with `search`
and `read` alone, which is what MedResearcher-style questions need.
"""

import collections
import math
from typing import Any

from medjax.knowledge.chains import band
from medjax.knowledge.graph import KnowledgeGraph, kind
from medjax.knowledge.retrieval import Document

BAND_ORDER = ("obligate", "very frequent", "frequent", "occasional", "very rare", None)
# Phenotype documents list the diseases of a term reported in at most this many (above the
# hub threshold of chains, ~96, so every chain hop can be followed by reading).
MAX_LISTED_DISEASES = 150


def _label(graph: KnowledgeGraph, entity: str) -> str:
    return f"{graph.name(entity)} ({entity})"


def disease_document(graph: KnowledgeGraph, disease: str) -> Document:
    sentences = [
        f"{graph.name(disease)} ({disease}) is a disorder catalogued in {disease.split(':')[0]}."
    ]
    modes = graph.neighbours(disease, "inheritance")
    if modes:
        sentences.append("Inheritance: " + "; ".join(graph.name(m).lower() for m in modes) + ".")
    bands = collections.defaultdict(list)
    for edge in graph.edges(disease, "has_phenotype"):
        bands[band(edge.frequency)].append(_label(graph, edge.target))
    for label in BAND_ORDER:
        if bands.get(label):
            head = (
                "Features of unknown frequency"
                if label is None
                else f"{label.capitalize()} features"
            )
            sentences.append(f"{head}: " + "; ".join(sorted(bands[label])) + ".")
    negatives = graph.neighbours(disease, "lacks_phenotype")
    if negatives:
        sentences.append("Absent features: " + "; ".join(_label(graph, p) for p in negatives) + ".")
    genes = graph.neighbours(disease, "associated_with", reverse=True)
    if genes:
        sentences.append("Associated genes: " + "; ".join(_label(graph, g) for g in genes) + ".")
    return Document(disease, graph.name(disease), " ".join(sentences), "disease")


def phenotype_document(graph: KnowledgeGraph, term_id: str) -> Document:
    term = graph.data.terms[term_id]
    sentences = [f"{term.name} ({term.id}) is a clinical feature in the Human Phenotype Ontology."]
    if term.definition:
        sentences.append(term.definition)
    if term.synonyms:
        sentences.append("Synonyms: " + "; ".join(term.synonyms) + ".")
    parents = graph.neighbours(term_id, "is_a")
    if parents:
        sentences.append("A kind of: " + "; ".join(graph.name(p) for p in parents) + ".")
    diseases = graph.neighbours(term_id, "has_phenotype", reverse=True)
    if 0 < len(diseases) <= MAX_LISTED_DISEASES:
        sentences.append("Reported in: " + "; ".join(_label(graph, d) for d in diseases) + ".")
    elif diseases:
        sentences.append(f"Reported in {len(diseases)} disorders.")
    return Document(
        term_id, term.name, " ".join(sentences), "phenotype", {"synonyms": list(term.synonyms)}
    )


def gene_document(graph: KnowledgeGraph, gene: str) -> Document:
    diseases = graph.neighbours(gene, "associated_with")
    text = f"{graph.name(gene)} ({gene}) is a human gene."
    if diseases:
        text += " Associated disorders: " + "; ".join(_label(graph, d) for d in diseases) + "."
    return Document(gene, graph.name(gene), text, "gene")


def build_corpus(graph: KnowledgeGraph) -> list[Document]:
    """One document per non-obsolete phenotype term, per disease and per gene."""
    docs = [phenotype_document(graph, t.id) for t in graph.data.terms.values() if not t.obsolete]
    docs += [disease_document(graph, d) for d in graph.diseases()]
    docs += [gene_document(graph, g) for g in graph.genes()]
    return docs


LOOKUP_RELATIONS = {
    "phenotypes": ("has_phenotype", False),
    "absent_phenotypes": ("lacks_phenotype", False),
    "diseases": (None, None),  # Of a gene or of a phenotype: depends on the entity's kind.
    "genes": ("associated_with", True),
    "inheritance": ("inheritance", False),
    "parents": ("is_a", False),
    "children": ("is_a", True),
}


def kg_lookup(graph: KnowledgeGraph, entity: str, relation: str) -> dict[str, Any]:
    """The neighbours of an entity (an id, or an exact name) by one relation."""
    if relation not in LOOKUP_RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; one of {sorted(LOOKUP_RELATIONS)}.")
    entity = resolve_entity(graph, entity)
    rel, reverse = LOOKUP_RELATIONS[relation]
    if relation == "diseases":
        k = kind(entity)
        rel, reverse = ("associated_with", False) if k == "gene" else ("has_phenotype", True)
    out = []
    for edge in graph.edges(entity, rel, reverse=reverse):
        item = {"id": edge.target, "name": graph.name(edge.target)}
        if rel == "has_phenotype" and not math.isnan(edge.frequency):
            item["frequency"] = band(edge.frequency)
        out.append(item)
    return {"entity": entity, "name": graph.name(entity), "relation": relation, "results": out}


def resolve_entity(graph: KnowledgeGraph, entity: str) -> str:
    """An id as given, or the id of the entity with exactly this name (case-insensitive)."""
    try:
        graph.name(entity)
        return entity
    except (KeyError, ValueError):
        pass
    index = getattr(graph, "_name_index", None)
    if index is None:
        index = collections.defaultdict(list)
        for d in graph.diseases():
            index[graph.name(d).lower()].append(d)
        for g in graph.genes():
            index[graph.name(g).lower()].append(g)
        for t in graph.data.terms.values():
            if not t.obsolete:
                index[t.name.lower()].append(t.id)
        graph._name_index = index
    matches = index.get(entity.strip().lower(), [])
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KeyError(f"{entity!r} names several entities ({', '.join(matches)}); use an id.")
    raise KeyError(f"no entity with id or name {entity!r}; find ids with the search tool.")
