"""A typed medical knowledge graph over the HPO release, with graph rarity.

Nodes are ids with a type prefix: diseases "OMIM:..."/"ORPHA:..."/"DECIPHER:...", phenotypes
"HP:...", genes "NCBIGene:...", inheritance modes (HPO terms under HP:0000005). Edges:

  Disease -has_phenotype(frequency)-> Phenotype   (aspect P, qualifier not NOT)
  Disease -lacks_phenotype-> Phenotype            (NOT rows: pertinent negatives)
  Gene -associated_with-> Disease                 (from genes_to_phenotype.txt)
  Disease -inheritance-> Mode                     (aspect I)
  Phenotype -is_a-> Phenotype                     (hp.obo)

Every relation is also walkable backwards (`neighbours(x, "has_phenotype", reverse=True)`).

Rarity is graph rarity, as medical_notes.md 3.7 argues (every HPOA disease is clinically
rare): a phenotype's `df` is the number of diseases annotated with it or a descendant and its
information content is -log(df / N); hubs (df above a percentile) are excluded from chains.
OMIM and ORPHA often describe the same disease and the files carry no mapping between them,
so a chain stays inside one namespace (`namespace(x)`).
"""

import collections
import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from medjax.knowledge import hpo

RELATIONS = ("has_phenotype", "lacks_phenotype", "associated_with", "inheritance", "is_a")
MODE_OF_INHERITANCE = "HP:0000005"
PHENOTYPIC_ABNORMALITY = "HP:0000118"


def kind(entity: str) -> str:
    """ "disease", "phenotype" or "gene" from the id's prefix."""
    prefix = entity.split(":", 1)[0]
    if prefix == "HP":
        return "phenotype"
    if prefix == "NCBIGene":
        return "gene"
    if prefix in ("OMIM", "ORPHA", "DECIPHER"):
        return "disease"
    raise ValueError(f"kind: unknown entity id {entity!r}.")


def namespace(entity: str) -> str:
    return entity.split(":", 1)[0]


class Edge(NamedTuple):
    """One edge seen from one end (a NamedTuple: the graph holds ~600,000 of them, and a
    frozen dataclass made building it twice as slow)."""

    relation: str
    target: str
    frequency: float = float("nan")  # has_phenotype only; NaN where unknown.


class KnowledgeGraph:
    """The typed graph; build with `KnowledgeGraph.from_hpo(hpo.load())`.

    The edges are held as integer columns (about 600,000 edge ends); an entity's list of
    `Edge`s is built the first time it is asked for. A run that walks a few entities (the
    research tools) skips building the rest, which took seconds per process.

    Attributes:
      data: the parsed release.
      num_diseases: N, for information content.
    """

    def __init__(self, data: hpo.HpoData):
        self.data = data
        a = data.annotations
        n_diseases, n_terms = len(data.disease_ids), len(data.term_ids)
        # One table of entity names: diseases, then terms, then genes.
        self._names: list[str] = [*data.disease_ids, *data.term_ids, *data.gene_ids]
        term_base, gene_base = n_diseases, n_diseases + n_terms
        has, lacks, inherits, assoc, is_a = (RELATIONS.index(r) for r in (
            "has_phenotype", "lacks_phenotype", "inheritance", "associated_with", "is_a"
        ))  # fmt: skip
        aspect = np.asarray(a.aspect)
        negated = np.asarray(a.negated, bool)
        relation = np.full(len(aspect), -1, np.int64)
        on_p = aspect == hpo.ASPECTS.index("P")
        relation[on_p & negated] = lacks
        relation[on_p & ~negated] = has
        relation[(aspect == hpo.ASPECTS.index("I")) & ~negated] = inherits
        rows = np.flatnonzero(relation >= 0)
        disease = np.asarray(a.disease, np.int64)[rows]
        term = np.asarray(a.term, np.int64)[rows]
        relation = relation[rows]
        # OMIM and ORPHA rows may repeat a (disease, relation, term): keep the first.
        key = (disease * len(RELATIONS) + relation) * n_terms + term
        first = np.sort(np.unique(key, return_index=True)[1])
        gene_disease = np.asarray(data.gene_disease, np.int64).reshape(-1, 2)
        parents = [(t.id, p) for t in data.terms.values() if not t.obsolete for p in t.parents]
        self._index = {name: i for i, name in enumerate(self._names)}
        # Terms outside term_ids (none in a release) get a name too.
        for name in (*data.terms, *(p for _, p in parents)):
            if name not in self._index:
                self._index[name] = len(self._names)
                self._names.append(name)
        # Edges in the order they were always added: annotations, genes, is_a.
        self._source = np.concatenate([
            disease[first],
            gene_base + gene_disease[:, 0],
            np.array([self._index[c] for c, _ in parents], np.int64),
        ])  # fmt: skip
        self._target = np.concatenate([
            term_base + term[first],
            gene_disease[:, 1],
            np.array([self._index[p] for _, p in parents], np.int64),
        ])  # fmt: skip
        self._relation = np.concatenate([
            relation[first],
            np.full(len(gene_disease), assoc, np.int64),
            np.full(len(parents), is_a, np.int64),
        ])  # fmt: skip
        self._frequency = np.concatenate([
            np.asarray(a.frequency, np.float64)[rows][first],
            np.full(len(gene_disease) + len(parents), math.nan),
        ])  # fmt: skip
        self._out_rows = _group(self._source, len(self._names))
        self._in_rows = _group(self._target, len(self._names))
        self._out: dict[str, list[Edge]] = {}
        self._in: dict[str, list[Edge]] = {}
        self.num_diseases = n_diseases
        self._df: dict[str, int] | None = None

    @classmethod
    def from_hpo(cls, data: hpo.HpoData | None = None) -> "KnowledgeGraph":
        return cls(hpo.load() if data is None else data)

    def _edges(self, entity: str, reverse: bool) -> list[Edge]:
        """Every edge out of (or into) `entity`, built on first use."""
        cache = self._in if reverse else self._out
        edges = cache.get(entity)
        if edges is None:
            i = self._index.get(entity)
            if i is None:
                return []
            order, starts = self._in_rows if reverse else self._out_rows
            rows = order[starts[i] : starts[i + 1]]
            ends = (self._source if reverse else self._target)[rows].tolist()
            edges = [
                Edge(RELATIONS[r], self._names[e], f)
                for r, e, f in zip(
                    self._relation[rows].tolist(), ends, self._frequency[rows].tolist(), strict=True
                )
            ]
            cache[entity] = edges
        return edges

    # -- look-ups ---------------------------------------------------------------------------

    def name(self, entity: str) -> str:
        k = kind(entity)
        if k == "phenotype":
            term = self.data.terms.get(entity)
            if term is None:
                raise KeyError(f"KnowledgeGraph: no HPO term {entity!r}.")
            return term.name
        table = self.data.disease_names if k == "disease" else self.data.gene_symbols
        if entity not in table:
            raise KeyError(f"KnowledgeGraph: no {k} {entity!r}.")
        return table[entity]

    def edges(self, entity: str, relation: str, *, reverse: bool = False) -> list[Edge]:
        """Edges of one relation out of `entity` (into it with `reverse=True`)."""
        if relation not in RELATIONS:
            raise ValueError(f"KnowledgeGraph: unknown relation {relation!r}; one of {RELATIONS}.")
        return [e for e in self._edges(entity, reverse) if e.relation == relation]

    def neighbours(self, entity: str, relation: str, *, reverse: bool = False) -> list[str]:
        return [e.target for e in self.edges(entity, relation, reverse=reverse)]

    def frequency(self, disease: str, phenotype: str) -> float:
        for e in self.edges(disease, "has_phenotype"):
            if e.target == phenotype:
                return e.frequency
        raise KeyError(f"KnowledgeGraph: {disease} has no phenotype {phenotype}.")

    def diseases(self) -> list[str]:
        return list(self.data.disease_ids)

    def genes(self) -> list[str]:
        return [g for g in self.data.gene_ids if self._edges(g, reverse=False)]

    def phenotypes(self) -> list[str]:
        """Phenotypes annotated (positively) to at least one disease."""
        return [t for t in self.data.term_ids if self.neighbours(t, "has_phenotype", reverse=True)]

    def ancestors(self, term: str) -> set[str]:
        out, stack = set(), [term]
        while stack:
            for parent in self.neighbours(stack.pop(), "is_a"):
                if parent not in out:
                    out.add(parent)
                    stack.append(parent)
        return out

    def is_under(self, term: str, root: str) -> bool:
        return term == root or root in self.ancestors(term)

    # -- rarity -----------------------------------------------------------------------------

    def df(self, phenotype: str) -> int:
        """Number of diseases annotated with `phenotype` or one of its descendants."""
        if self._df is None:
            counts: dict[str, set[int]] = collections.defaultdict(set)
            index = {d: i for i, d in enumerate(self.data.disease_ids)}
            for d in self.data.disease_ids:
                i = index[d]
                for p in self.neighbours(d, "has_phenotype"):
                    counts[p].add(i)
                    for a in self.ancestors(p):
                        counts[a].add(i)
            self._df = {p: len(s) for p, s in counts.items()}
        return self._df.get(phenotype, 0)

    def information_content(self, phenotype: str) -> float:
        df = self.df(phenotype)
        return math.inf if df == 0 else -math.log(df / self.num_diseases)

    def direct_df(self, phenotype: str) -> int:
        """Number of diseases annotated with exactly this term."""
        return len(self.neighbours(phenotype, "has_phenotype", reverse=True))

    def hub_threshold(self, percentile: float = 95.0) -> int:
        """Direct-df above which a phenotype is a hub (excluded from chains)."""
        dfs = [self.direct_df(p) for p in self.phenotypes()]
        return int(np.percentile(dfs, percentile))

    def rare_phenotypes(self, max_direct_df: int = 3) -> list[str]:
        """Phenotypic abnormalities annotated to 1..max_direct_df diseases directly."""
        return [
            p
            for p in self.phenotypes()
            if 0 < self.direct_df(p) <= max_direct_df and not self.is_under(p, MODE_OF_INHERITANCE)
        ]

    def rare_diseases(self) -> list[str]:
        """Low degree in every relation: at most one gene and at most the median number of
        phenotypes (medical_notes.md 3.7)."""
        counts = {d: len(self.neighbours(d, "has_phenotype")) for d in self.data.disease_ids}
        median = float(np.median([c for c in counts.values() if c]))
        return [
            d
            for d, c in counts.items()
            if 0 < c <= median and len(self.neighbours(d, "associated_with", reverse=True)) <= 1
        ]

    def rare_genes(self) -> list[str]:
        """Genes associated with exactly one disease."""
        return [g for g in self.genes() if len(self.neighbours(g, "associated_with")) == 1]

    def degree_summary(self) -> dict[str, float]:
        ph = [len(self.neighbours(d, "has_phenotype")) for d in self.data.disease_ids]
        dd = [self.direct_df(p) for p in self.phenotypes()]
        return {
            "diseases": len(ph),
            "phenotypes_used": len(dd),
            "genes": len(self.genes()),
            "has_phenotype_edges": sum(ph),
            "phenotypes_per_disease_median": float(np.median(ph)),
            "diseases_per_phenotype_median": float(np.median(dd)),
            "phenotypes_with_one_disease": sum(1 for x in dd if x == 1),
        }


def _group(ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): the rows whose id is i are order[starts[i]:starts[i + 1]], in their
    original order (a stable sort)."""
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], np.arange(size + 1))
    return order, starts


def names_of(graph: KnowledgeGraph, entities: Iterable[str]) -> list[str]:
    return [graph.name(e) for e in entities]
