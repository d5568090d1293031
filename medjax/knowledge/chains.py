"""Longest uniquely-identifiable chains around rare entities (MedResearcher-R1's max_chain).

A chain is a simple path anchor -> e1 -> ... -> en through the typed graph, walking

  Gene -associated_with-> Disease,  Disease -associated_with^-1-> Gene,
  Disease -has_phenotype-> Phenotype,  Phenotype -has_phenotype^-1-> Disease,

with hub phenotypes (direct df above the hub threshold) and inheritance terms left out, and
every disease in the namespace of the first one (OMIM and ORPHA duplicate each other). Each
hop carries a clue set: properties of the next entity (a disease's inheritance or another of
its phenotypes, a phenotype's parent class or frequency band, a gene's disease count) chosen
greedily until exactly one entity reached by that relation from the previous one fits them.
`resolve` replays a chain's hops against the graph and is how uniqueness is checked.

The sampler follows the released max_chain: depth-first search from the seed with a node
budget and a depth cap, several randomised restarts, keep the longest path; then pad with
distractor neighbours.
"""

import dataclasses
import math
import random
from collections.abc import Sequence

from medjax.knowledge.graph import MODE_OF_INHERITANCE, KnowledgeGraph, kind, namespace

# Frequency bands of HPO, by midpoint (hpo.FREQUENCY_TERMS): how questions describe them.
BANDS = ((0.99, "obligate"), (0.8, "very frequent"), (0.3, "frequent"), (0.05, "occasional"))


def band(frequency: float) -> str | None:
    """The HPO band of a frequency, or None when unknown."""
    if math.isnan(frequency):
        return None
    for low, label in BANDS:
        if frequency >= low:
            return label
    return "very rare"


@dataclasses.dataclass(frozen=True)
class Hop:
    """One step of a chain: `relation` from the previous entity (reversed when `reverse`),
    to `target`, identified among its siblings by `clues`.

    Clues are (kind, value) pairs: ("inheritance", HP id), ("phenotype", HP id),
    ("is_a", HP id), ("band", label), ("disease_count", n).
    """

    relation: str
    reverse: bool
    target: str
    clues: tuple[tuple[str, str | int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Chain:
    anchor: str
    hops: tuple[Hop, ...]
    distractors: tuple[str, ...] = ()

    @property
    def entities(self) -> tuple[str, ...]:
        return (self.anchor, *(h.target for h in self.hops))

    @property
    def answer(self) -> str:
        return self.hops[-1].target if self.hops else self.anchor


class ChainSampler:
    """Samples chains from a graph.

    Args:
      graph: the KnowledgeGraph.
      hub_percentile: phenotypes with a direct df above this percentile are hubs.
      max_clues: the most clues a hop may need.
    """

    def __init__(self, graph: KnowledgeGraph, *, hub_percentile: float = 95.0, max_clues: int = 3):
        self.graph = graph
        self.max_clues = max_clues
        self.hub_df = graph.hub_threshold(hub_percentile)
        self._usable: dict[str, bool] = {}

    # -- the walk ---------------------------------------------------------------------------

    def usable_phenotype(self, p: str) -> bool:
        if p not in self._usable:
            g = self.graph
            self._usable[p] = 0 < g.direct_df(p) <= self.hub_df and not g.is_under(
                p, MODE_OF_INHERITANCE
            )
        return self._usable[p]

    def steps(self, entity: str, ns: str | None) -> list[tuple[str, bool, str]]:
        """(relation, reverse, next) moves out of `entity`."""
        g, k = self.graph, kind(entity)
        if k == "gene":
            return [
                ("associated_with", False, d)
                for d in g.neighbours(entity, "associated_with")
                if ns is None or namespace(d) == ns
            ]
        if k == "disease":
            moves = [
                ("associated_with", True, x)
                for x in g.neighbours(entity, "associated_with", reverse=True)
            ]
            moves += [
                ("has_phenotype", False, p)
                for p in g.neighbours(entity, "has_phenotype")
                if self.usable_phenotype(p)
            ]
            return moves
        return [
            ("has_phenotype", True, d)
            for d in g.neighbours(entity, "has_phenotype", reverse=True)
            if ns is None or namespace(d) == ns
        ]

    # -- clues ------------------------------------------------------------------------------

    def properties(self, entity: str, previous: str, relation: str) -> list[tuple[str, str | int]]:
        """What can be said of `entity` without naming it (most specific first)."""
        g, k = self.graph, kind(entity)
        if k == "disease":
            props: list[tuple[str, str | int]] = [
                ("inheritance", m) for m in sorted(g.neighbours(entity, "inheritance"))
            ]
            phenos = [p for p in g.neighbours(entity, "has_phenotype") if p != previous]
            phenos.sort(key=lambda p: (g.direct_df(p), p))  # Rarest first: most telling.
            props += [("phenotype", p) for p in phenos[:12]]
            return props
        if k == "gene":
            return [("disease_count", len(g.neighbours(entity, "associated_with")))]
        props = [("is_a", parent) for parent in sorted(g.neighbours(entity, "is_a"))]
        if kind(previous) == "disease" and relation == "has_phenotype":
            label = band(g.frequency(previous, entity))
            if label:
                props.append(("band", label))
        return props

    def satisfies(self, entity: str, previous: str, clue: tuple[str, str | int]) -> bool:
        g, (what, value) = self.graph, clue
        if what == "inheritance":
            return value in g.neighbours(entity, "inheritance")
        if what == "phenotype":
            return value in g.neighbours(entity, "has_phenotype")
        if what == "is_a":
            return value in g.neighbours(entity, "is_a")
        if what == "band":
            return band(g.frequency(previous, entity)) == value
        if what == "disease_count":
            return len(g.neighbours(entity, "associated_with")) == value
        raise ValueError(f"unknown clue kind {what!r}.")

    def candidates(
        self, previous: str, relation: str, reverse: bool, clues, exclude: Sequence[str], ns
    ) -> list[str]:
        """Entities reached from `previous` by the relation that fit every clue. All of the
        relation's neighbours count, hubs included (a reader cannot know which the walk
        skips); only diseases outside the chain's namespace and entities already on the
        chain are left out, as the question says."""
        out = []
        for x in self.graph.neighbours(previous, relation, reverse=reverse):
            if x in exclude or (ns is not None and kind(x) == "disease" and namespace(x) != ns):
                continue
            if all(self.satisfies(x, previous, c) for c in clues):
                out.append(x)
        return out

    def identify(self, previous, relation, reverse, target, exclude, ns):
        """The fewest clues (greedy, at most `max_clues`) that single out `target`, or None."""
        pool = self.candidates(previous, relation, reverse, (), exclude, ns)
        clues: list[tuple[str, str | int]] = []
        props = self.properties(target, previous, relation)
        while len(pool) > 1 and len(clues) < self.max_clues:
            best, best_pool = None, pool
            for prop in props:
                if prop in clues:
                    continue
                rest = [x for x in pool if self.satisfies(x, previous, prop)]
                if len(rest) < len(best_pool):
                    best, best_pool = prop, rest
            if best is None:
                return None
            clues.append(best)
            pool = best_pool
        return tuple(clues) if pool == [target] else None

    # -- sampling ---------------------------------------------------------------------------

    def longest_chain(
        self,
        seed: str,
        rng: random.Random,
        *,
        max_hops: int = 6,
        restarts: int = 5,
        node_budget: int = 400,
    ) -> Chain:
        """The longest chain from `seed` found by `restarts` randomised bounded DFS runs."""
        best: list[Hop] = []
        for _ in range(restarts):
            path = self._dfs(seed, rng, max_hops, node_budget)
            if len(path) > len(best):
                best = path
            if len(best) == max_hops:
                break
        return Chain(seed, tuple(best))

    def _dfs(self, seed, rng, max_hops, node_budget) -> list[Hop]:
        best: list[Hop] = []
        budget = [node_budget]

        def visit(entity: str, path: list[Hop], used: list[str], ns):
            nonlocal best
            if len(path) > len(best):
                best = list(path)
            if len(path) == max_hops or budget[0] <= 0:
                return
            moves = self.steps(entity, ns)
            rng.shuffle(moves)
            for relation, reverse, nxt in moves:
                if nxt in used or budget[0] <= 0:
                    continue
                budget[0] -= 1
                next_ns = ns or (namespace(nxt) if kind(nxt) == "disease" else None)
                clues = self.identify(entity, relation, reverse, nxt, used, next_ns)
                if clues is None:
                    continue
                path.append(Hop(relation, reverse, nxt, clues))
                used.append(nxt)
                visit(nxt, path, used, next_ns)
                path.pop()
                used.pop()
                if len(best) == max_hops:
                    return

        ns = namespace(seed) if kind(seed) == "disease" else None
        visit(seed, [], [seed], ns)
        return best

    def pad(self, chain: Chain, rng: random.Random, per_node: int = 2) -> Chain:
        """Adds up to `per_node` off-chain neighbours of every chain entity as distractors."""
        on_chain, extra = set(chain.entities), []
        ns = next((namespace(e) for e in chain.entities if kind(e) == "disease"), None)
        for entity in chain.entities:
            options = [x for _, _, x in self.steps(entity, ns) if x not in on_chain]
            rng.shuffle(options)
            for x in options[:per_node]:
                on_chain.add(x)
                extra.append(x)
        return dataclasses.replace(chain, distractors=tuple(extra))

    def resolve(self, chain: Chain) -> list[list[str]]:
        """Replays the chain's hops from its anchor: the candidate set of every hop. A chain is
        uniquely identifiable when each set is exactly [that hop's target]."""
        ns = namespace(chain.anchor) if kind(chain.anchor) == "disease" else None
        used, previous, sets = [chain.anchor], chain.anchor, []
        for hop in chain.hops:
            if ns is None and kind(hop.target) == "disease":
                ns = namespace(hop.target)
            found = self.candidates(previous, hop.relation, hop.reverse, hop.clues, used, ns)
            sets.append(found)
            used.append(hop.target)
            previous = hop.target
        return sets

    def is_unique(self, chain: Chain) -> bool:
        return all(s == [h.target] for s, h in zip(self.resolve(chain), chain.hops, strict=True))
