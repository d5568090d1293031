"""medjax.knowledge.similarity and medjax.synthesis.rubrics: a hand-made release whose
similarities, frequencies, scores, verifier numbers and priorities are worked out by hand,
and one smoke test on the real release."""

import math

import numpy as np
import pytest

from medjax.knowledge import graph, hpo, similarity
from medjax.llm.base import Generation
from medjax.synthesis import rubrics

OBO_TERMS = [
    ("HP:0000001", "All", None, ()),
    ("HP:0000118", "Phenotypic abnormality", "HP:0000001", ()),
    ("HP:0000005", "Mode of inheritance", "HP:0000001", ()),
    ("HP:0000006", "Autosomal dominant inheritance", "HP:0000005", ()),
    ("HP:0000007", "Autosomal recessive inheritance", "HP:0000005", ()),
    ("HP:0000100", "Abnormality of the alpha", "HP:0000118", ()),
    ("HP:0000101", "Alpha one", "HP:0000100", ("First alpha",)),
    ("HP:0000102", "Alpha two", "HP:0000100", ()),
    ("HP:0000200", "Abnormality of the beta", "HP:0000118", ()),
    ("HP:0000201", "Beta one", "HP:0000200", ()),
    ("HP:0001939", "Abnormality of metabolism/homeostasis", "HP:0000118", ()),
    ("HP:0001940", "Increased gamma level", "HP:0001939", ()),
    ("HP:0000300", "Delta finding", "HP:0000118", ()),
]
HEADER = (
    "database_id\tdisease_name\tqualifier\thpo_id\treference\tevidence\tonset\tfrequency\tsex"
    "\tmodifier\taspect\tbiocuration"
)
# f midpoints: HP:0040281 0.895, HP:0040283 0.17, "" unknown -> 0.5 prior.
ROWS = [
    ("OMIM:1", "Alpha syndrome", "", "HP:0000101", "HP:0040281", "P"),
    ("OMIM:1", "Alpha syndrome", "", "HP:0000201", "1/2", "P"),
    ("OMIM:1", "Alpha syndrome", "", "HP:0001940", "", "P"),
    ("OMIM:1", "Alpha syndrome", "NOT", "HP:0000300", "", "P"),
    ("OMIM:1", "Alpha syndrome", "", "HP:0000007", "", "I"),
    ("OMIM:2", "Beta disease", "", "HP:0000101", "HP:0040283", "P"),
    ("OMIM:2", "Beta disease", "", "HP:0000102", "", "P"),
    ("OMIM:2", "Beta disease", "", "HP:0000300", "3/4", "P"),
    ("OMIM:2", "Beta disease", "", "HP:0000006", "", "I"),
    ("OMIM:3", "Gamma disorder", "", "HP:0000102", "25%", "P"),
    ("OMIM:3", "Gamma disorder", "", "HP:0000201", "", "P"),
    ("OMIM:3", "Gamma disorder", "", "HP:0001940", "1/4", "P"),
    ("OMIM:3", "Gamma disorder", "", "HP:0000007", "", "I"),
    ("OMIM:4", "Delta disease", "", "HP:0000300", "1/1", "P"),
    ("OMIM:4", "Delta disease", "", "HP:0000007", "", "I"),
    ("ORPHA:9", "Alpha syndrome", "", "HP:0000101", "", "P"),
]
# Propagated profiles A(D) (strict descendants of HP:0000118), written out by hand.
PROFILES = {
    "OMIM:1": {"HP:0000101", "HP:0000100", "HP:0000201", "HP:0000200", "HP:0001940", "HP:0001939"},
    "OMIM:2": {"HP:0000101", "HP:0000100", "HP:0000102", "HP:0000300"},
    "OMIM:3": {"HP:0000102", "HP:0000100", "HP:0000201", "HP:0000200", "HP:0001940", "HP:0001939"},
    "OMIM:4": {"HP:0000300"},
    "ORPHA:9": {"HP:0000101", "HP:0000100"},
}


def write_release(folder):
    folder.mkdir(parents=True, exist_ok=True)
    obo = ["format-version: 1.2", "data-version: hp/releases/2099-01-01", ""]
    for tid, name, parent, synonyms in OBO_TERMS:
        obo += ["[Term]", f"id: {tid}", f"name: {name}"]
        obo += [f'synonym: "{s}" EXACT []' for s in synonyms]
        obo += [f"is_a: {parent}"] if parent else []
        obo.append("")
    (folder / "hp.obo").write_text("\n".join(obo))
    lines = ["#description: test", HEADER]
    for d, name, q, term, freq, aspect in ROWS:
        lines.append("\t".join([d, name, q, term, d, "TAS", "", freq, "", "", aspect, "x[2099]"]))
    (folder / "phenotype.hpoa").write_text("\n".join(lines) + "\n")
    g2p = [
        "ncbi_gene_id\tgene_symbol\thpo_id\thpo_name\tfrequency\tdisease_id",
        "1\tGA\tHP:0000101",
    ]
    (folder / "genes_to_phenotype.txt").write_text(g2p[0] + "\n1\tGA\tHP:0000101\tx\t-\tOMIM:1\n")
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    return graph.KnowledgeGraph(hpo.load(write_release(tmp / "release"), cache=tmp / "cache"))


def expected_similarity(a: str, b: str) -> float:
    """IC-weighted cosine from the definition, with df counted from PROFILES."""
    n = len(PROFILES)
    terms = sorted(set().union(*PROFILES.values()))
    df = np.array([sum(t in p for p in PROFILES.values()) for t in terms], float)
    ic = -np.log(df / n)
    va = np.array([t in PROFILES[a] for t in terms]) * ic
    vb = np.array([t in PROFILES[b] for t in terms]) * ic
    return float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))


# -- similarity ---------------------------------------------------------------------------


def test_differential_by_hand(toy):
    got = similarity.differential(toy, "OMIM:1", k=5)
    # OMIM:4 shares nothing (similarity 0, left out); ORPHA:9 is another namespace.
    assert [d for d, _ in got] == ["OMIM:3", "OMIM:2"]
    for d, s in got:
        assert s == pytest.approx(expected_similarity("OMIM:1", d), abs=1e-12)
    assert got[0][1] > got[1][1] > 0
    wide = dict(similarity.differential(toy, "OMIM:1", k=5, same_namespace=False))
    assert wide["ORPHA:9"] == pytest.approx(expected_similarity("OMIM:1", "ORPHA:9"), abs=1e-12)
    assert similarity.differential(toy, "OMIM:1", k=1) == got[:1]
    index = similarity.index_for(toy)
    assert index is similarity.index_for(toy)  # Built once per graph.
    for j, t in enumerate(index.terms):
        assert index.df[j] == toy.df(t)
    assert index.differentials(k=5, block=2) == {
        d: index.differential(d, 5) for d in toy.diseases()
    }


def test_frequency_of_by_hand(toy):
    f = similarity.frequency_of
    assert f(toy, "OMIM:1", "HP:0000101") == pytest.approx(0.895)
    assert f(toy, "OMIM:1", "HP:0001940") == 0.5  # Unknown frequency: the prior.
    assert f(toy, "OMIM:1", "HP:0000300") == 0.0  # NOT row.
    assert similarity.is_negated(toy, "OMIM:1", "HP:0000300")
    assert f(toy, "OMIM:1", "HP:0000102") == 0.0  # Neither it nor a descendant.
    # Propagation: max over annotated descendants (Alpha one 0.17, Alpha two unknown 0.5).
    assert f(toy, "OMIM:2", "HP:0000100") == 0.5
    assert f(toy, "OMIM:2", "HP:0000100", propagate=False) == 0.0
    assert f(toy, "OMIM:3", "HP:0000100") == pytest.approx(0.25)
    profile = similarity.frequency_profile(toy, "OMIM:1")
    assert profile == pytest.approx(
        {
            "HP:0000101": 0.895,
            "HP:0000100": 0.895,
            "HP:0000201": 0.5,
            "HP:0000200": 0.5,
            "HP:0001940": 0.5,
            "HP:0001939": 0.5,
            "HP:0000118": 0.895,
            "HP:0000001": 0.895,
        }
    )
    for p, v in profile.items():
        assert f(toy, "OMIM:1", p) == pytest.approx(v)


# -- rubrics ------------------------------------------------------------------------------

RIVALS = ["OMIM:3", "OMIM:2"]


def test_candidate_scores_by_hand(toy):
    items = rubrics.candidate_items(toy, "OMIM:1", RIVALS)
    scored = [(it.id, it.kind, it.expected, round(it.score, 6)) for it in items[:-4]]
    assert scored == [
        ("HP:0000300", "negative", "absent", -0.75),  # 0 (NOT) - max(0, 3/4).
        ("HP:0000101", "phenotype", "present", 0.725),  # 0.895 - max(0, 0.17).
        ("HP:0000102", "negative", "absent", -0.5),  # 0 - max(0.25, 0.5).
        ("inheritance", "inheritance", "present", 0.5),  # AR vs {AR, AD}: 1 of 2 differs.
        ("HP:0001940", "phenotype", "present", 0.25),  # 0.5 - max(1/4, 0).
    ]  # Beta one: 0.5 - max(0.5, 0) = 0, dropped.
    assert [it.kind for it in items[-4:]] == ["generic"] * 4
    first = items[1]
    assert first.text == "Asks about alpha one"
    assert first.synonyms == ("alpha one", "first alpha")
    assert [d for d, _ in first.evidence] == ["OMIM:1", "OMIM:3", "OMIM:2"]
    assert [f for _, f in first.evidence] == pytest.approx([0.895, 0.0, 0.17])  # float32.
    assert items[3].concepts == ("HP:0000007",)
    # Same modes everywhere: no inheritance item.
    assert "inheritance" not in [it.id for it in rubrics.candidate_items(toy, "OMIM:1", ["OMIM:3"])]


def test_verify_by_hand(toy):
    cands = rubrics.candidate_items(toy, "OMIM:1", RIVALS)
    by_id = {c.id: c for c in cands}
    items = [by_id["HP:0000300"], by_id["HP:0000101"], by_id["HP:0001940"], cands[-1]]
    got = rubrics.verify(items, toy, cands, top_n=4)
    # Top 4 by |score|: 0.75, 0.725, 0.5, 0.5; covered 0.75 + 0.725.
    assert got["coverage"] == pytest.approx(1.475 / 2.475)
    assert got["redundancy"] == 0.0
    assert got["askability"] == pytest.approx(2 / 3)  # The gamma level is a lab finding.
    assert got["total"] == pytest.approx(1.475 / 2.475 + 0.25 * 2 / 3)
    assert got["num_items"] == 3  # The generic item is left out.
    alpha = rubrics.phenotype_item(toy, "OMIM:1", RIVALS, "HP:0000100")
    assert alpha.score == pytest.approx(0.895 - 0.5)
    redundant = [by_id["HP:0000101"], alpha, by_id["HP:0000102"]]
    # Pairs (101, 100) and (100, 102) are ancestor/descendant; (101, 102) is not.
    assert rubrics.verify(redundant, toy, cands)["redundancy"] == pytest.approx(2 / 3)
    assert rubrics.verify([], toy, cands)["coverage"] == 0.0


def test_merge_and_priorities(toy):
    cands = rubrics.candidate_items(toy, "OMIM:1", RIVALS)
    by_id = {c.id: c for c in cands}
    alpha = rubrics.phenotype_item(toy, "OMIM:1", RIVALS, "HP:0000100")
    merged = rubrics.merge([alpha, by_id["HP:0000300"], by_id["HP:0000101"]], toy)
    assert [it.id for it in merged] == ["HP:0000101", "HP:0000300"]
    assert merged[0].concepts == ("HP:0000101", "HP:0000100")
    assert merged[0].covers == ("HP:0000101", "HP:0000100")
    assert merged[0].score == pytest.approx(0.725)
    assert merged[0].text == "Asks about alpha one"
    # A negative about Alpha two is not merged into the positive Abnormality of the alpha.
    assert len(rubrics.merge([alpha, by_id["HP:0000102"]], toy)) == 2
    # |scores| 0.75, 0.725, 0.5, 0.5, 0.25: r = 0, 1, 2, 2, 4 -> 3 - floor(3r/5).
    got = rubrics.assign_priorities(cands)
    assert [it.priority for it in got] == [3, 3, 2, 2, 1, 1, 1, 1, 1]


def test_reject_sample_keeps_the_verifiers_best(toy):
    run = rubrics.reject_sample(toy, "OMIM:1", k_items=2, num_samples=6, seed=3)
    again = rubrics.reject_sample(toy, "OMIM:1", k_items=2, num_samples=6, seed=3)
    assert run.items == again.items and run.samples == again.samples
    totals = [s["total"] for _, s in run.samples]
    assert run.best == int(np.argmax(totals)) and len(run.samples) == 6
    assert [it.id for it in run.items if it.kind != "generic"] == list(run.samples[run.best][0])
    assert [it.kind for it in run.items][-4:] == ["generic"] * 4
    assert {it.priority for it in run.items} <= {1, 2, 3}
    assert [d for d, _ in run.differential] == RIVALS
    # Recompute the kept set's verdict independently of the run.
    kept = [it for it in run.items if it.kind != "generic"]
    assert rubrics.verify(kept, toy, run.candidates, top_n=2)["total"] == pytest.approx(max(totals))
    others = {
        rubrics.reject_sample(toy, "OMIM:1", k_items=2, num_samples=6, seed=s).samples[0][0]
        for s in range(8)
    }
    assert len(others) > 1  # Seeds matter.


class FakeWriter:
    def __init__(self, texts):
        self.texts = texts
        self.prompts = []

    def generate(self, conversations, params, *, num_samples=1):
        self.prompts.append(conversations[0][-1]["content"])
        return [Generation(self.texts[i % len(self.texts)]) for i in range(num_samples)]


def test_writer_items_map_to_hpo_terms(toy):
    writer = FakeWriter(
        [
            'Sure: ["First alpha", "alpha TWO", "Not a term", {"name": "Delta finding"}]',
            "no json here",
        ]
    )
    run = rubrics.reject_sample(toy, "OMIM:1", writer=writer, num_samples=2, k_items=3)
    assert run.source == "writer" and "Alpha syndrome (OMIM:1)" in writer.prompts[0]
    assert run.samples[0][0] == ("HP:0000300", "HP:0000101", "HP:0000102")
    assert run.samples[1][0] == () and run.best == 0
    assert [it.priority for it in run.items][:3] == [3, 2, 1]  # 0.75, 0.725, 0.5.


# -- the real release ---------------------------------------------------------------------


def test_real_graph_smoke(tmp_path):
    g = graph.KnowledgeGraph(hpo.load(cache=tmp_path))
    disease = "OMIM:154700"  # Marfan syndrome.
    diff = similarity.differential(g, disease, k=5)
    assert len(diff) == 5 and all(d.startswith("OMIM:") and d != disease for d, _ in diff)
    assert all(0 < s <= 1 for _, s in diff)
    assert [s for _, s in diff] == sorted((s for _, s in diff), reverse=True)
    run = rubrics.reject_sample(g, disease, differential=diff, num_samples=4, seed=0)
    assert run.items and {it.priority for it in run.items} <= {1, 2, 3}
    assert any(it.priority == 3 for it in run.items)
    assert all(not math.isnan(it.score) for it in run.candidates)
