"""Phenotype-profile similarity between diseases, and propagated frequencies f(p|D).

A disease D's profile is the ancestor-propagated set of its positive phenotypes, restricted
to phenotypic abnormalities (strict descendants of HP:0000118):

    A(D) = union over p ∈ P(D) of ({p} + ancestors(p)), ∩ desc(HP:0000118)

and its vector has one entry per term, v_D[t] = IC(t) for t ∈ A(D), 0 elsewhere, with the
graph's information content IC(t) = -log(df(t) / N) (df(t): diseases annotated with t or a
descendant, N: all diseases). Two diseases compare by IC-weighted cosine:

    sim(D, D') = Σ_{t ∈ A(D) ∩ A(D')} IC(t)² / sqrt(Σ_{t ∈ A(D)} IC(t)² · Σ_{t ∈ A(D')} IC(t)²)

so shared specific terms count and shared hubs ("Abnormality of the nervous system",
IC near 0) barely do. `SimilarityIndex` builds the [diseases, terms] sparse matrix once
(a few seconds on the full release) and answers a differential with one sparse
matrix-vector product (milliseconds); `differential` caches one index per graph.

`frequency_of(graph, D, p)` is the frequency midpoint f(p|D) that rubric scores use
(medical_notes.md 3.6 item 2):

    f(p|D) = 0                              if D lists p, or an ancestor of p, as NOT
           = freq(D, p)                     if p is annotated to D
           = max_{q annotated, q ≤ p} freq(D, q)   else (ancestor propagation: a disease
                                            with "Focal-onset seizure" has "Seizure")
           = 0                              if neither

where an unknown frequency (NaN, 24% of annotations) takes the prior `UNKNOWN_FREQUENCY`
= 0.5, the midpoint of "somewhere between never and always".
"""

import math
import weakref
from collections.abc import Sequence

import numpy as np
import scipy.sparse  # A dependency of jax, which medjax already requires.

from medjax.knowledge.graph import PHENOTYPIC_ABNORMALITY, KnowledgeGraph, namespace

UNKNOWN_FREQUENCY = 0.5


class _Ancestors:
    """Memoised ancestor closure of HPO terms (graph.ancestors walks the edges every call)."""

    def __init__(self, graph: KnowledgeGraph):
        self.graph = graph
        self._memo: dict[str, frozenset[str]] = {}

    def __call__(self, term: str) -> frozenset[str]:
        got = self._memo.get(term)
        if got is None:
            out: set[str] = set()
            for parent in self.graph.neighbours(term, "is_a"):
                out.add(parent)
                out |= self(parent)
            got = self._memo[term] = frozenset(out)
        return got


_ANCESTORS: "weakref.WeakKeyDictionary[KnowledgeGraph, _Ancestors]" = weakref.WeakKeyDictionary()
_INDEXES: "weakref.WeakKeyDictionary[KnowledgeGraph, SimilarityIndex]" = weakref.WeakKeyDictionary()


def ancestors(graph: KnowledgeGraph, term: str) -> frozenset[str]:
    """The strict ancestors of `term`, memoised per graph."""
    if graph not in _ANCESTORS:
        _ANCESTORS[graph] = _Ancestors(graph)
    return _ANCESTORS[graph](term)


def _known(frequency: float) -> float:
    return UNKNOWN_FREQUENCY if math.isnan(frequency) else frequency


def is_negated(graph: KnowledgeGraph, disease: str, phenotype: str) -> bool:
    """Whether `disease` lists `phenotype`, or one of its ancestors, as NOT (absent)."""
    lacks = graph.neighbours(disease, "lacks_phenotype")
    if not lacks:
        return False
    above = ancestors(graph, phenotype)
    return any(n == phenotype or n in above for n in lacks)


def frequency_profile(
    graph: KnowledgeGraph, disease: str, *, propagate: bool = True
) -> dict[str, float]:
    """f(p|D) for every phenotype p with f > 0 (see the module docstring).

    Args:
      graph: the knowledge graph.
      disease: a disease id.
      propagate: also give every ancestor of an annotated term the max frequency below it.

    Returns:
      phenotype id -> frequency midpoint in (0, 1]; absent phenotypes are left out (f = 0).
      NOT-listed phenotypes (and their descendants) are never in it.
    """
    out: dict[str, float] = {}
    edges = graph.edges(disease, "has_phenotype")
    if propagate:
        for edge in edges:
            for t in ancestors(graph, edge.target):
                out[t] = max(out.get(t, 0.0), _known(edge.frequency))
    out.update({e.target: _known(e.frequency) for e in edges})  # Direct annotations win.
    return {t: f for t, f in out.items() if f > 0 and not is_negated(graph, disease, t)}


def frequency_of(
    graph: KnowledgeGraph, disease: str, phenotype: str, *, propagate: bool = True
) -> float:
    """f(p|D): the frequency midpoint of `phenotype` in `disease` (module docstring).

    Args:
      graph: the knowledge graph.
      disease: a disease id.
      phenotype: an HP id.
      propagate: if p is not annotated, take the max over annotated descendants.

    Returns:
      A float in [0, 1]: the annotated midpoint (unknown -> 0.5), the max over annotated
      descendants, or 0 when neither or when D lists p (or an ancestor of p) as NOT.
    """
    if is_negated(graph, disease, phenotype):
        return 0.0
    best = 0.0
    for edge in graph.edges(disease, "has_phenotype"):
        if edge.target == phenotype:
            return _known(edge.frequency)
        if propagate and phenotype in ancestors(graph, edge.target):
            best = max(best, _known(edge.frequency))
    return best


class SimilarityIndex:
    """The IC-weighted, ancestor-propagated phenotype profiles of every disease.

    Attributes:
      graph: the knowledge graph.
      diseases: the disease ids, row order of `matrix`.
      terms: the term ids, column order of `matrix`.
      matrix: [diseases, terms] scipy CSR float64, v_D[t] = IC(t) on A(D).
      norms: [diseases] float64 Euclidean norms of the rows (0 for diseases without
        phenotypes).
    """

    def __init__(self, graph: KnowledgeGraph):
        self.graph = graph
        self.diseases = graph.diseases()
        self._row = {d: i for i, d in enumerate(self.diseases)}
        column: dict[str, int] = {}
        rows, cols = [], []
        for i, d in enumerate(self.diseases):
            profile: set[str] = set()
            for p in graph.neighbours(d, "has_phenotype"):
                above = ancestors(graph, p)
                if PHENOTYPIC_ABNORMALITY in above:
                    profile.add(p)
                    profile.update(
                        a for a in above if PHENOTYPIC_ABNORMALITY in ancestors(graph, a)
                    )
            for t in profile:
                rows.append(i)
                cols.append(column.setdefault(t, len(column)))
        self.terms = list(column)
        n = len(self.diseases)
        binary = scipy.sparse.csr_matrix(
            (np.ones(len(rows)), (np.asarray(rows, np.int64), np.asarray(cols, np.int64))),
            shape=(n, len(self.terms)),
        )
        # df(t) is the column count of the propagated binary matrix (= graph.df(t)).
        self.df = np.asarray(binary.sum(axis=0)).ravel()
        self.information_content = -np.log(self.df / max(n, 1))
        self.matrix = (binary @ scipy.sparse.diags(self.information_content)).tocsr()
        self.norms = np.sqrt(np.asarray(self.matrix.multiply(self.matrix).sum(axis=1)).ravel())
        self._namespaces = np.asarray([namespace(d) for d in self.diseases])

    def similarities(self, disease: str) -> np.ndarray:
        """[diseases] float64 sim(disease, ·), 0 where either profile is empty."""
        if disease not in self._row:
            raise KeyError(f"SimilarityIndex: no disease {disease!r}.")
        i = self._row[disease]
        dots = (self.matrix @ self.matrix[i].T).toarray().ravel()
        denominator = self.norms * self.norms[i]
        return np.divide(dots, denominator, out=np.zeros_like(dots), where=denominator > 0)

    def differential(
        self, disease: str, k: int = 5, *, same_namespace: bool = True
    ) -> list[tuple[str, float]]:
        """The k most similar other diseases, most similar first (ties by disease order).

        Args:
          disease: the target disease id.
          k: how many to return (fewer if fewer have a positive similarity).
          same_namespace: keep only diseases of the target's namespace (OMIM/ORPHA/...).

        Returns:
          [(disease id, similarity in (0, 1])], length <= k.
        """
        sims = self.similarities(disease)
        return self._top(self._row[disease], sims, k, same_namespace)

    def _top(
        self, i: int, sims: np.ndarray, k: int, same_namespace: bool
    ) -> list[tuple[str, float]]:
        keep = sims > 0
        keep[i] = False
        if same_namespace:
            keep &= self._namespaces == self._namespaces[i]
        candidates = np.flatnonzero(keep)
        if len(candidates) > k:
            # Everything tied with the k-th best stays in, so ties break by disease order.
            kth = np.partition(sims[candidates], len(candidates) - k)[len(candidates) - k]
            candidates = candidates[sims[candidates] >= kth]
        order = candidates[np.lexsort((candidates, -sims[candidates]))][:k]
        return [(self.diseases[j], float(sims[j])) for j in order]

    def differentials(
        self,
        diseases: Sequence[str] | None = None,
        k: int = 5,
        *,
        same_namespace: bool = True,
        block: int = 512,
    ) -> dict[str, list[tuple[str, float]]]:
        """`differential` of many diseases at once, `block` rows per sparse product.

        A full pass over the 12,687 diseases of the release takes about ten seconds
        (one query at a time takes about a minute).

        Args:
          diseases: the targets; all diseases when None.
          k: differential size.
          same_namespace: as in `differential`.
          block: rows per [block, diseases] product (memory: block x diseases float64).

        Returns:
          disease id -> its differential.
        """
        targets = self.diseases if diseases is None else list(diseases)
        rows = np.asarray([self._row[d] for d in targets], np.int64)
        transposed = self.matrix.T.tocsr()
        out = {}
        for start in range(0, len(rows), block):
            chunk = rows[start : start + block]
            dots = (self.matrix[chunk] @ transposed).toarray()
            denominator = self.norms[chunk, None] * self.norms[None, :]
            sims = np.divide(dots, denominator, out=np.zeros_like(dots), where=denominator > 0)
            for i, row in zip(chunk.tolist(), sims, strict=True):
                out[self.diseases[i]] = self._top(i, row, k, same_namespace)
        return out


def index_for(graph: KnowledgeGraph) -> SimilarityIndex:
    """The graph's `SimilarityIndex`, built on first use and cached (weakly) per graph."""
    if graph not in _INDEXES:
        _INDEXES[graph] = SimilarityIndex(graph)
    return _INDEXES[graph]


def differential(
    graph: KnowledgeGraph, disease: str, k: int = 5, *, same_namespace: bool = True
) -> list[tuple[str, float]]:
    """The k diseases most similar to `disease` by IC-weighted cosine (module docstring).

    Args:
      graph: the knowledge graph; its index is built once and cached.
      disease: the target disease id.
      k: how many to return.
      same_namespace: restrict to the target's namespace (OMIM and ORPHA duplicate diseases).

    Returns:
      [(disease id, similarity in (0, 1])], most similar first, the target excluded.
    """
    return index_for(graph).differential(disease, k, same_namespace=same_namespace)


def differential_ids(pairs: Sequence[tuple[str, float]] | Sequence[str]) -> list[str]:
    """Disease ids from a differential given as ids or (id, similarity) pairs."""
    return [p if isinstance(p, str) else p[0] for p in pairs]
