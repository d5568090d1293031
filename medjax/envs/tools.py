"""The research environment's tools over the offline knowledge modules: `search` and `read`
over an index (`medjax.knowledge.retrieval`), `kg_lookup` over the graph
(`medjax.knowledge.corpus`).

    index = retrieval.BM25Index.cached(documents, cache_dir)
    tools = [search_tool(index), read_tool(index), kg_lookup_tool(graph)]

The tools keep the released MedResearcher-R1 tools' shape: `search` takes a list of queries
and joins the per-query blocks with `\\n=======\\n`; `read` takes a document id and an
optional goal, like `visit`'s url and goal, but its focus is plain term overlap, not an LLM.

Moved here from `medjax.knowledge.retrieval` (`search_tool`, `read_tool`) and
`medjax.knowledge.corpus` (`kg_lookup_tool`), so that the knowledge package sits below
`medjax.agents` and imports nothing from it.
"""

from collections.abc import Sequence

from medjax.agents.tools import Tool
from medjax.knowledge.corpus import LOOKUP_RELATIONS, kg_lookup
from medjax.knowledge.graph import KnowledgeGraph
from medjax.knowledge.retrieval import Hit, Readable, Searchable, format_document

RESULT_SEPARATOR = "\n=======\n"


def _format_results(query: str, hits: Sequence[Hit]) -> str:
    lines = [f"## Results for: {query}"]
    if not hits:
        lines.append("No results. Try synonyms, or fewer and more specific words.")
    lines += [f"{h.rank}. [{h.doc_id}] {h.title}: {h.snippet}" for h in hits]
    return "\n".join(lines)


def search_tool(
    index: Searchable,
    *,
    max_queries: int = 10,
    default_k: int = 5,
    max_k: int = 20,
    name: str = "search",
) -> Tool:
    """MedResearcher-R1's `search` over a local index: `{"query": [str, ...], "k": int}`.

    Args:
      index: anything with `search(queries, k) -> list[list[Hit]]`.
      max_queries: most queries per call (the paper's 10).
      default_k: results per query when `k` is not given.
      max_k: largest `k` allowed.
      name: the tool's name.

    Returns:
      A Tool whose output has one block per query ("## Results for: <query>" then lines
      "<rank>. [doc_id] Title: snippet"), blocks joined by "\\n=======\\n".
    """
    parameters = {
        "type": "object",
        "properties": {
            "query": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": max_queries,
                "description": f"1 to {max_queries} search queries, run together.",
            },
            "k": {
                "type": "integer",
                "minimum": 1,
                "maximum": max_k,
                "description": f"Results per query (default {default_k}, at most {max_k}).",
            },
        },
        "required": ["query"],
    }

    def search(query: list[str], k: int = default_k) -> str:
        if not 1 <= len(query) <= max_queries:
            raise ValueError(f"give 1 to {max_queries} queries, got {len(query)}")
        if not all(isinstance(q, str) and q.strip() for q in query):
            raise ValueError("every query must be a non-empty string")
        if not 1 <= k <= max_k:
            raise ValueError(f"k must be between 1 and {max_k}, got {k}")
        results = index.search(list(query), k)
        return RESULT_SEPARATOR.join(
            _format_results(q, h) for q, h in zip(query, results, strict=True)
        )

    return Tool(
        name=name,
        description=(
            "Search the offline medical knowledge base (phenotypes, diseases, genes) with one or"
            " more queries at once. Each result line is [doc_id] Title: snippet; read a doc_id"
            " for the full entry."
        ),
        parameters=parameters,
        fn=search,
    )


def read_tool(index: Readable, *, max_focus: int = 3, name: str = "read") -> Tool:
    """Reads one document by id: `{"doc_id": str, "goal": str}` (goal optional).

    With a goal, the document's sentences sharing the most words with it (after stopword
    removal, no stemming) are listed first under "Relevant to the goal:", then the full text:
    a cheap, deterministic stand-in for `visit`'s LLM extractor. An unknown id raises
    `DocumentNotFoundError` (a KeyError), which the loop shows the model as an error.

    Args:
      index: anything with `get(doc_id) -> Document`.
      max_focus: at most this many goal sentences.
      name: the tool's name.

    Returns:
      The Tool.
    """
    parameters = {
        "type": "object",
        "properties": {
            "doc_id": {"type": "string", "description": "A document id from search results."},
            "goal": {"type": "string", "description": "What you want to learn from it."},
        },
        "required": ["doc_id"],
    }

    def read(doc_id: str, goal: str | None = None) -> str:
        key = doc_id.strip()
        try:
            doc = index.get(key)
        except KeyError:
            if not (key.startswith("[") and key.endswith("]")):
                raise
            doc = index.get(key[1:-1])  # The id as the search output shows it, brackets included.
        return format_document(doc, goal=goal, max_focus=max_focus)

    return Tool(
        name=name,
        description=(
            "Read one knowledge-base entry in full by its doc_id; with a goal, the most relevant"
            " sentences come first."
        ),
        parameters=parameters,
        fn=read,
    )


def kg_lookup_tool(graph: KnowledgeGraph) -> Tool:
    return Tool(
        name="kg_lookup",
        description=(
            "Looks up an entity of the medical knowledge graph (an id such as OMIM:243400,"
            " HP:0001250, NCBIGene:10, or an exact name) and returns its neighbours by one"
            " relation."
        ),
        parameters={
            "type": "object",
            "properties": {
                "entity": {"type": "string"},
                "relation": {"type": "string", "enum": sorted(LOOKUP_RELATIONS)},
            },
            "required": ["entity", "relation"],
        },
        fn=lambda entity, relation: kg_lookup(graph, entity, relation),
    )
