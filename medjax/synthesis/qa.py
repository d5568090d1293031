"""Multi-hop medical questions from knowledge-graph chains (MedResearcher-R1's KG -> QA).

Each question starts from a rare anchor entity, named, and walks a chain whose intermediate
entities are never named: each is described by the relation that reaches it and by the clue
set that singles it out (`medjax.knowledge.chains`). The answer is the last entity. Records
keep the parameterised reasoning path (Entity_A, Entity_B, ... with their clues) and the
entity mapping, as the released pipeline does, plus hop count and a difficulty.

The writer is template-based and deterministic given its seed; several phrasings per
relation keep questions from all looking alike. Filters: the chain must resolve uniquely
against the graph, neither the answer (nor its aliases) nor any intermediate entity may
appear in the question, the hop count must be in range, and questions are deduplicated.

    python -m medjax.synthesis.qa --out DIR --num 1000 --seed 0
"""

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import string
import sys
from collections.abc import Iterator

from medjax.knowledge import chains as chains_lib
from medjax.knowledge import graph as graph_lib

CATALOGUES = {"OMIM": "OMIM", "ORPHA": "Orphanet", "DECIPHER": "DECIPHER"}
KIND_WORDS = {"disease": "disorder", "gene": "gene", "phenotype": "clinical feature"}

# How a hop introduces its entity: (relation, reverse) -> phrasings of "{ref}".
HOP_TEMPLATES: dict[tuple[str, bool], tuple[str, ...]] = {
    ("associated_with", False): (
        "a disorder associated with {ref}",
        "a condition linked to variants in {ref}",
        "a disease in which {ref} is implicated",
    ),
    ("associated_with", True): (
        "the gene associated with {ref}",
        "the gene implicated in {ref}",
        "the gene whose variants cause {ref}",
    ),
    ("has_phenotype", False): (
        "a clinical feature of {ref}",
        "a phenotype annotated to {ref}",
        "a sign seen in {ref}",
    ),
    ("has_phenotype", True): (
        "another disorder that also presents with {ref}",
        "a different disease annotated with {ref}",
        "another condition in which {ref} is reported",
    ),
}
# From the anchor itself nothing came before it: no "another".
FIRST_HOP_TEMPLATES: dict[tuple[str, bool], tuple[str, ...]] = {
    ("has_phenotype", True): (
        "a disorder that presents with {ref}",
        "a disease annotated with {ref}",
        "a condition in which {ref} is reported",
    ),
}
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "disease": ("Which disorder is {desc}?", "Name {desc}.", "What is {desc}?"),
    "gene": ("Which gene is {desc}?", "Name {desc}.", "What is {desc}?"),
    "phenotype": ("Which clinical feature is {desc}?", "Name {desc}.", "What is {desc}?"),
}


@dataclasses.dataclass(frozen=True)
class QARecord:
    """One synthesised question (the JSONL schema of `medjax.synthesis.qa`)."""

    id: str
    question: str
    answer: dict  # {"id", "name", "aliases", "kind"}
    hops: int
    reasoning_path: list[dict]  # [{"step", "from", "relation", "to", "clues"}], placeholders
    entity_mapping: dict[str, dict]  # placeholder -> {"id", "name", "kind"}
    difficulty: str  # "easy" (<= 2 hops), "medium" (3), "hard" (>= 4)
    anchor: str
    distractors: list[str]
    seed: int


def aliases(graph: graph_lib.KnowledgeGraph, entity: str) -> list[str]:
    """Accepted spellings of an entity's name: the name, its `;`-separated parts (OMIM
    titles), the HPO synonyms of a phenotype, a gene's NCBI id."""
    name = graph.name(entity)
    out = [name]
    out += [part.strip() for part in name.split(";") if part.strip()]
    k = graph_lib.kind(entity)
    if k == "phenotype":
        out += list(graph.data.terms[entity].synonyms)
    out.append(entity)
    return list(dict.fromkeys(out))


def clue_text(graph, clue) -> str:
    """How a question states a clue, e.g. ("inheritance", HP:0000007) -> "with autosomal
    recessive inheritance"; the expert and the recall queries use the same words."""
    what, value = clue
    if what == "inheritance":
        return f"with {graph.name(value).lower()}"
    if what == "phenotype":
        return f"whose features include {graph.name(value).lower()}"
    if what == "is_a":
        return f"a kind of {graph.name(value).lower()}"
    if what == "band":
        return f"{value} in it"
    if what == "disease_count":
        return f"linked to {value} disorder{'s' if value != 1 else ''} in total"
    raise ValueError(f"unknown clue kind {what!r}.")


def hop_query(graph, previous_name: str, clues) -> str:
    """What a researcher who knows the previous entity searches for the next one: its name
    and the hop's clues (the expert's fallback search and the recall@k queries)."""
    return " ".join([previous_name, *(clue_text(graph, c) for c in clues)])


def _placeholder(i: int) -> str:
    return f"Entity_{string.ascii_uppercase[i]}"


def write_question(graph, chain: chains_lib.Chain, rng: random.Random) -> tuple[str, list]:
    """The question text and the parameterised reasoning path of a chain."""
    anchor_kind = graph_lib.kind(chain.anchor)
    sentences = [f"Start from the {KIND_WORDS[anchor_kind]} {graph.name(chain.anchor)}."]
    catalogue = next(
        (graph_lib.namespace(e) for e in chain.entities if graph_lib.kind(e) == "disease"), None
    )
    if catalogue is not None:
        sentences.append(f"Every disorder below is an {CATALOGUES[catalogue]} entry.")
    path, ref = [], f"this {KIND_WORDS[anchor_kind]}"
    previous = "Anchor"
    for i, hop in enumerate(chain.hops):
        templates = HOP_TEMPLATES[(hop.relation, hop.reverse)]
        if i == 0:
            templates = FIRST_HOP_TEMPLATES.get((hop.relation, hop.reverse), templates)
        phrase = rng.choice(templates).format(ref=ref)
        clues = [clue_text(graph, c) for c in hop.clues]
        desc = phrase + ("" if not clues else ", " + ", ".join(clues))
        name = _placeholder(i)
        path.append(
            {
                "step": i + 1,
                "from": previous,
                "relation": hop.relation,
                "reverse": hop.reverse,
                "to": name,
                "clues": [list(c) for c in hop.clues],
            }
        )
        if i == len(chain.hops) - 1:
            k = graph_lib.kind(hop.target)
            sentences.append(rng.choice(QUESTION_TEMPLATES[k]).format(desc=desc))
        else:
            sentences.append(f"Call {name} {desc}.")
        ref, previous = name, name
    return " ".join(sentences), path


def leaks(graph, question: str, chain: chains_lib.Chain) -> list[str]:
    """Names of the answer (with aliases) or of intermediate entities found in the question."""
    text = question.lower()
    found = []
    for entity in chain.entities[1:]:
        names = aliases(graph, entity) if entity == chain.answer else [graph.name(entity)]
        for n in names:
            n = n.lower().strip()
            if len(n) >= 3 and re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text):
                found.append(n)
    return found


def difficulty(hops: int) -> str:
    return "easy" if hops <= 2 else "medium" if hops == 3 else "hard"


def synthesise(
    graph: graph_lib.KnowledgeGraph,
    num: int,
    *,
    seed: int = 0,
    min_hops: int = 2,
    max_hops: int = 6,
    seeds: str = "genes",
    sampler: chains_lib.ChainSampler | None = None,
    max_tries: int | None = None,
) -> Iterator[QARecord]:
    """Yields up to `num` filtered questions, deterministically for a seed.

    Args:
      seeds: where anchors come from: "genes" (rare genes), "diseases" (rare diseases),
        "phenotypes" (rare phenotypes) or "mixed".
      min_hops, max_hops: the hop range; each chain's length is drawn uniformly in it and
        the longest chain found is cut to that length, so every length appears.
    """
    if not 1 <= min_hops <= max_hops:
        raise ValueError(f"synthesise: need 1 <= min_hops <= max_hops, got {min_hops}, {max_hops}.")
    rng = random.Random(seed)
    sampler = sampler or chains_lib.ChainSampler(graph)
    pools = {
        "genes": sorted(graph.rare_genes()),
        "diseases": sorted(graph.rare_diseases()),
        "phenotypes": sorted(sampler_phenotypes(graph, sampler)),
    }
    if seeds == "mixed":
        anchors = pools["genes"] + pools["diseases"] + pools["phenotypes"]
    elif seeds in pools:
        anchors = pools[seeds]
    else:
        raise ValueError(
            f"synthesise: seeds must be genes/diseases/phenotypes/mixed, got {seeds!r}."
        )
    rng.shuffle(anchors)
    seen_questions, made = set(), 0
    for tries, anchor in enumerate(anchors):
        if made >= num or (max_tries is not None and tries >= max_tries):
            return
        want = rng.randint(min_hops, max_hops)
        chain = sampler.longest_chain(anchor, rng, max_hops=want)
        if len(chain.hops) < want:
            continue
        if not sampler.is_unique(chain):  # Never expected: identify() built the clues.
            continue
        chain = sampler.pad(chain, rng)
        question, path = write_question(graph, chain, rng)
        if question in seen_questions or leaks(graph, question, chain):
            continue
        seen_questions.add(question)
        answer = chain.answer
        mapping = {
            _placeholder(i): {"id": e, "name": graph.name(e), "kind": graph_lib.kind(e)}
            for i, e in enumerate(chain.entities[1:])
        }
        mapping["Anchor"] = {
            "id": anchor,
            "name": graph.name(anchor),
            "kind": graph_lib.kind(anchor),
        }
        yield QARecord(
            id=f"kgqa-{seed}-{made:06d}",
            question=question,
            answer={
                "id": answer,
                "name": graph.name(answer),
                "aliases": aliases(graph, answer),
                "kind": graph_lib.kind(answer),
            },
            hops=len(chain.hops),
            reasoning_path=path,
            entity_mapping=mapping,
            difficulty=difficulty(len(chain.hops)),
            anchor=anchor,
            distractors=list(chain.distractors),
            seed=seed,
        )
        made += 1


# One-hop questions whose answer is an entity's only neighbour by one relation: the lookup
# tool's relation -> (graph relation, reverse, anchor pool, phrasings of "{name}").
LOOKUP_FAMILIES: dict[str, tuple[str, bool, str, tuple[str, ...]]] = {
    "genes": ("associated_with", True, "diseases", (
        "Which gene is associated with the disorder {name}?",
        "Name the gene whose variants cause {name}.",
        "What is the gene implicated in the disorder {name}?",
    )),
    "diseases": ("associated_with", False, "genes", (
        "Which disorder is associated with the gene {name}?",
        "Name the disease linked to variants in the gene {name}.",
        "What disorder is the gene {name} implicated in?",
    )),
    "parents": ("is_a", False, "phenotypes", (
        "In the Human Phenotype Ontology, the clinical feature {name} is a kind of what?",
        "What is the parent term of the clinical feature {name}?",
        "Name the broader clinical feature that {name} falls under.",
    )),
}  # fmt: skip


def synthesise_lookups(graph: graph_lib.KnowledgeGraph, num: int, *, seed: int = 0):
    """Yields up to `num` one-hop lookup questions, deterministically for a seed.

    Each names an entity and asks for its only neighbour by one relation (the gene of a
    disorder with one gene, the disorder of a gene with one disorder, the parent of a
    clinical feature with one parent): one `kg_lookup` answers it, which puts it within reach
    of a small policy (the quickstart's questions). The record schema is `synthesise`'s, the
    path's one step also naming the lookup relation (`"lookup"`). Kept only when the anchor's
    name resolves to it alone and the answer's names do not appear in the question.
    """
    from medjax.knowledge.corpus import resolve_entity

    rng = random.Random(seed)
    pools = {
        "diseases": sorted(graph.diseases()),
        "genes": sorted(graph.genes()),
        "phenotypes": sorted(graph.phenotypes()),
    }
    candidates = [(family, e) for family, spec in LOOKUP_FAMILIES.items() for e in pools[spec[2]]]
    rng.shuffle(candidates)
    made = 0
    for family, anchor in candidates:
        if made >= num:
            return
        relation, reverse, _, templates = LOOKUP_FAMILIES[family]
        targets = graph.neighbours(anchor, relation, reverse=reverse)
        if len(targets) != 1:
            continue
        name, answer = graph.name(anchor), targets[0]
        try:
            if resolve_entity(graph, name) != anchor:
                continue
        except KeyError:
            continue
        question = rng.choice(templates).format(name=name)
        names = aliases(graph, answer)
        if any(a.lower() in question.lower() for a in names):
            continue
        target = {"id": answer, "name": graph.name(answer), "kind": graph_lib.kind(answer)}
        step = {
            "step": 1, "from": "Anchor", "relation": relation, "reverse": reverse,
            "to": "Entity_A", "clues": [], "lookup": family,
        }  # fmt: skip
        yield QARecord(
            id=f"lookup-{seed}-{made:06d}",
            question=question,
            answer={**target, "aliases": names},
            hops=1,
            reasoning_path=[step],
            entity_mapping={
                "Anchor": {"id": anchor, "name": name, "kind": graph_lib.kind(anchor)},
                "Entity_A": target,
            },
            difficulty="lookup",
            anchor=anchor,
            distractors=[],
            seed=seed,
        )
        made += 1


def sampler_phenotypes(graph, sampler) -> list[str]:
    return [p for p in graph.rare_phenotypes() if sampler.usable_phenotype(p)]


def record_chain(record: dict) -> chains_lib.Chain:
    """The chain a record was written from (from its reasoning path and entity mapping)."""
    mapping = record["entity_mapping"]
    hops = tuple(
        chains_lib.Hop(
            step["relation"],
            step["reverse"],
            mapping[step["to"]]["id"],
            tuple((c[0], c[1]) for c in step["clues"]),
        )
        for step in record["reasoning_path"]
    )
    return chains_lib.Chain(record["anchor"], hops)


REWRITE_PROMPT = (
    "Rewrite the question below so that it reads naturally. Keep every fact, every clue and"
    " every placeholder name (Entity_A, Entity_B, ...) exactly; add nothing, name nothing"
    " new. Reply with the rewritten question only."
)


def rewrite(graph, records: list[dict], backend, params=None) -> list[dict]:
    """Paraphrases questions with an LLM (any `TextBackend`), batched in one call.

    A rewrite is kept only when it still names the anchor, keeps every placeholder and
    passes the leak filter; otherwise the template question stays. Each record gets
    `rewritten: bool`.
    """
    from medjax.sampling import SamplingParams

    params = params or SamplingParams(max_new_tokens=512, temperature=0.9, top_p=0.85)
    chats = [
        [{"role": "system", "content": REWRITE_PROMPT}, {"role": "user", "content": r["question"]}]
        for r in records
    ]
    out = []
    for record, generation in zip(records, backend.generate(chats, params), strict=True):
        text = generation.text.strip()
        chain = record_chain(record)
        placeholders = set(re.findall(r"Entity_[A-Z]", record["question"]))
        keep = (
            bool(text)
            and graph.name(record["anchor"]) in text
            and placeholders <= set(re.findall(r"Entity_[A-Z]", text))
            and not leaks(graph, text, chain)
        )
        out.append({**record, "question": text if keep else record["question"], "rewritten": keep})
    return out


def curriculum(records: list[dict]) -> dict[str, list[dict]]:
    """M-GRPO's two stages: "easy" (2 hops, format learning) and "hard" (4-6 hops, RL)."""
    return {
        "easy": [r for r in records if r["hops"] <= 2],
        "hard": [r for r in records if 4 <= r["hops"] <= 6],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (questions.jsonl)")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-hops", type=int, default=2)
    parser.add_argument("--max-hops", type=int, default=6)
    parser.add_argument(
        "--seeds", default="genes", choices=("genes", "diseases", "phenotypes", "mixed")
    )
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from medjax.knowledge import hpo

    graph = graph_lib.KnowledgeGraph(hpo.load())
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "questions.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f, tqdm(total=args.num, file=sys.stderr) as bar:
        for record in synthesise(
            graph,
            args.num,
            seed=args.seed,
            min_hops=args.min_hops,
            max_hops=args.max_hops,
            seeds=args.seeds,
        ):
            f.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")
            bar.update(1)
    os.replace(tmp, path)
    print(f"medjax.synthesis.qa: wrote {path}")


if __name__ == "__main__":
    main()
