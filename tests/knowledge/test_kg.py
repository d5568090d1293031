"""medjax.knowledge and medjax.synthesis.qa: the bundled HPO files parsed to the counts of the
files themselves, a hand-made graph whose chains and clues are checked by hand, the cache,
and questions on the real graph that resolve uniquely, leak nothing and replay from a seed."""

import collections
import csv
import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from medjax.knowledge import chains, graph, hpo
from medjax.synthesis import qa

# -- the real bundled files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return hpo.load(cache=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def real_graph(real):
    return graph.KnowledgeGraph(real)


def test_counts_match_the_source_files(real):
    folder = hpo.data_dir()
    # Counted here with plain text tools, independently of the parser.
    with open(folder / "hp.obo", encoding="utf-8") as f:
        obo = f.read()
    assert len(real.terms) == obo.count("\n[Term]\n") == 19_484
    assert sum(t.obsolete for t in real.terms.values()) == obo.count("\nis_obsolete: true") == 450
    assert sum(bool(t.definition) for t in real.terms.values()) == 16_454
    with open(folder / "phenotype.hpoa", encoding="utf-8") as f:
        rows = [
            r for r in csv.reader((line for line in f if not line.startswith("#")), delimiter="\t")
        ]
    header, rows = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    a = real.annotations
    assert len(a) == len(rows) == 271_702
    assert int(a.negated.sum()) == sum(r[col["qualifier"]] == "NOT" for r in rows) == 711
    assert int(np.isnan(a.frequency).sum()) == sum(not r[col["frequency"]] for r in rows) == 64_217
    prefixes = collections.Counter(d.split(":")[0] for d in real.disease_ids)
    assert prefixes == collections.Counter(
        r[col["database_id"]].split(":")[0] for r in {r[0]: r for r in rows}.values()
    )
    assert prefixes["OMIM"] == 8_359 and prefixes["DECIPHER"] == 47
    aspects = collections.Counter(hpo.ASPECTS[i] for i in a.aspect.tolist())
    assert aspects == {"P": 254_621, "I": 8_854, "C": 8_020, "H": 130, "M": 77}
    assert int((a.onset >= 0).sum()) == 3_043
    # The three frequency forms, row by row against the raw cells.
    forms = collections.Counter()
    for raw, got in zip((r[col["frequency"]] for r in rows), a.frequency.tolist(), strict=True):
        if raw.startswith("HP:"):
            forms["term"] += 1
            assert got == pytest.approx(hpo.FREQUENCY_TERMS[raw])
        elif "/" in raw:
            forms["n/m"] += 1
            n, m = raw.split("/")
            assert got == pytest.approx(int(n) / int(m))
        elif raw.endswith("%"):
            forms["%"] += 1
            assert got == pytest.approx(float(raw[:-1]) / 100)
    assert forms == {"term": 117_794, "n/m": 89_578, "%": 113}
    # Gene-disease pairs, counted from the raw file: (gene, disease) pairs and genes.
    with open(folder / "genes_to_phenotype.txt", encoding="utf-8") as f:
        g2p = [line.rstrip("\n").split("\t") for line in f][1:]
    pairs = {(r[0], r[5]) for r in g2p}
    assert real.gene_disease.shape == (len(pairs), 2) == (12_302, 2)
    assert len(set(real.gene_disease[:, 0].tolist())) == len({r[0] for r in g2p}) == 5_132
    assert len(set(real.gene_disease[:, 1].tolist())) == len({r[5] for r in g2p}) == 8_873


def test_real_graph_by_hand(real_graph):
    g = real_graph
    assert g.name("NCBIGene:10") == "NAT2"
    assert g.neighbours("NCBIGene:10", "associated_with") == ["OMIM:243400"]
    assert g.name("OMIM:243400") == "Acetylation, slow"
    assert g.neighbours("OMIM:243400", "has_phenotype") == ["HP:0001939"]
    assert g.neighbours("OMIM:243400", "inheritance") == ["HP:0000007"]
    assert g.neighbours("ORPHA:1401", "lacks_phenotype") == ["HP:0001270", "HP:0200041"]
    assert g.frequency("OMIM:619340", "HP:0002187") == 1.0  # "1/1"
    assert g.neighbours("HP:0001250", "is_a") == ["HP:0012638"]
    summary = g.degree_summary()
    assert summary["phenotypes_used"] == 11_272 and summary["phenotypes_with_one_disease"] == 2_876
    assert summary["phenotypes_per_disease_median"] == 15 and len(g.rare_phenotypes()) == 5_344


@pytest.mark.parametrize(
    ("raw", "want"),
    [("HP:0040281", 0.895), ("3/4", 0.75), ("12%", 0.12), ("", math.nan), ("HP:0040285", 0.0)],
)
def test_parse_frequency(raw, want):
    got = hpo.parse_frequency(raw)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


@pytest.mark.parametrize("raw", ["5/0", "3/2", "often", "120%"])
def test_bad_frequencies_name_the_place(raw):
    with pytest.raises(hpo.HpoFormatError, match=rf"x.hpoa:7: .*{raw}"):
        hpo.parse_frequency(raw, where="x.hpoa:7")


# -- a hand-made release ------------------------------------------------------------------

OBO = """format-version: 1.2
data-version: hp/releases/2099-01-01

[Term]
id: HP:0000001
name: All

[Term]
id: HP:0000118
name: Phenotypic abnormality
is_a: HP:0000001 ! All

[Term]
id: HP:0000005
name: Mode of inheritance
is_a: HP:0000001 ! All

[Term]
id: HP:0000007
name: Autosomal recessive inheritance
is_a: HP:0000005 ! Mode of inheritance

[Term]
id: HP:0000006
name: Autosomal dominant inheritance
is_a: HP:0000005 ! Mode of inheritance

[Term]
id: HP:0000100
name: Abnormality of the alpha
def: "Any anomaly of the alpha." [PMID:1]
is_a: HP:0000118 ! Phenotypic abnormality

[Term]
id: HP:0000101
name: Alpha one
synonym: "First alpha" EXACT []
is_a: HP:0000100 ! Abnormality of the alpha

[Term]
id: HP:0000102
name: Alpha two
is_a: HP:0000100 ! Abnormality of the alpha

[Term]
id: HP:0000200
name: Abnormality of the beta
is_a: HP:0000118 ! Phenotypic abnormality

[Term]
id: HP:0000201
name: Beta one
is_a: HP:0000200 ! Abnormality of the beta
"""
HEADER = (
    "database_id\tdisease_name\tqualifier\thpo_id\treference\tevidence\tonset\tfrequency\tsex"
    "\tmodifier\taspect\tbiocuration"
)
HPOA_ROWS = [
    ("OMIM:1", "Alpha syndrome", "", "HP:0000101", "HP:0040281", "P"),
    ("OMIM:1", "Alpha syndrome", "", "HP:0000201", "1/2", "P"),
    ("OMIM:1", "Alpha syndrome", "", "HP:0000007", "", "I"),
    ("OMIM:2", "Beta disease", "", "HP:0000101", "HP:0040283", "P"),
    ("OMIM:2", "Beta disease", "", "HP:0000102", "", "P"),
    ("OMIM:2", "Beta disease", "NOT", "HP:0000201", "", "P"),
    ("OMIM:2", "Beta disease", "", "HP:0000006", "", "I"),
    ("OMIM:3", "Gamma disorder", "", "HP:0000102", "25%", "P"),
    ("OMIM:3", "Gamma disorder", "", "HP:0000201", "", "P"),
    ("OMIM:3", "Gamma disorder", "", "HP:0000007", "", "I"),
    ("ORPHA:9", "Alpha syndrome", "", "HP:0000101", "", "P"),
]
GENES = [("1", "GA", "OMIM:1"), ("2", "GB", "OMIM:2"), ("2", "GB", "OMIM:3")]


def write_release(folder, rows=HPOA_ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hp.obo").write_text(OBO)
    lines = ["#description: test", HEADER]
    for d, name, q, term, freq, aspect in rows:
        lines.append("\t".join([d, name, q, term, d, "TAS", "", freq, "", "", aspect, "x[2099]"]))
    (folder / "phenotype.hpoa").write_text("\n".join(lines) + "\n")
    g2p = ["ncbi_gene_id\tgene_symbol\thpo_id\thpo_name\tfrequency\tdisease_id"]
    g2p += [f"{gid}\t{sym}\tHP:0000101\tAlpha one\t-\t{d}" for gid, sym, d in GENES]
    (folder / "genes_to_phenotype.txt").write_text("\n".join(g2p) + "\n")
    return folder


@pytest.fixture
def toy(tmp_path):
    data = hpo.load(write_release(tmp_path / "release"), cache=tmp_path / "cache")
    return graph.KnowledgeGraph(data)


def test_toy_graph(toy):
    assert toy.data.version == "2099-01-01"
    assert toy.data.terms["HP:0000101"].synonyms == ("First alpha",)
    assert toy.data.terms["HP:0000100"].definition == "Any anomaly of the alpha."
    assert toy.neighbours("OMIM:2", "lacks_phenotype") == ["HP:0000201"]
    assert toy.neighbours("HP:0000201", "has_phenotype", reverse=True) == ["OMIM:1", "OMIM:3"]
    assert toy.neighbours("NCBIGene:2", "associated_with") == ["OMIM:2", "OMIM:3"]
    assert toy.frequency("OMIM:3", "HP:0000102") == pytest.approx(0.25)
    # df counts diseases annotated with the term or a descendant: alpha one and two.
    assert toy.df("HP:0000100") == 4 and toy.direct_df("HP:0000101") == 3
    assert toy.information_content("HP:0000100") == pytest.approx(-math.log(4 / 4))
    assert toy.rare_genes() == ["NCBIGene:1"]


def test_clues_and_chains_by_hand(toy):
    s = chains.ChainSampler(toy, hub_percentile=100)
    # From gene GB two diseases: only OMIM:3 is recessive.
    assert s.identify("NCBIGene:2", "associated_with", False, "OMIM:3", ["NCBIGene:2"], "OMIM") == (
        ("inheritance", "HP:0000007"),
    )
    # Alpha syndrome has two features; "a kind of abnormality of the alpha" singles one out.
    assert s.identify("OMIM:1", "has_phenotype", False, "HP:0000101", ["OMIM:1"], "OMIM") == (
        ("is_a", "HP:0000100"),
    )
    # Alpha one in OMIM, other than Alpha syndrome: Beta disease alone (ORPHA:9 is another
    # namespace), so no clue is needed.
    assert s.identify("HP:0000101", "has_phenotype", True, "OMIM:2", ["OMIM:1"], "OMIM") == ()
    # Beta one belongs to OMIM:1 and OMIM:3 (OMIM:2 lacks it): from OMIM:3, nothing of
    # OMIM:1's can tell it from... itself; the only other is OMIM:1, excluded when used.
    hand = chains.Chain(
        "NCBIGene:1",
        (
            chains.Hop("associated_with", False, "OMIM:1"),
            chains.Hop("has_phenotype", False, "HP:0000101", (("is_a", "HP:0000100"),)),
            chains.Hop("has_phenotype", True, "OMIM:2"),
            chains.Hop("associated_with", True, "NCBIGene:2"),
            chains.Hop("associated_with", False, "OMIM:3"),
            chains.Hop("has_phenotype", False, "HP:0000102", (("is_a", "HP:0000100"),)),
        ),
    )
    assert s.resolve(hand) == [[e] for e in hand.entities[1:]] and s.is_unique(hand)
    # Without its clue the second hop has two answers.
    loose = dataclasses.replace(
        hand, hops=(hand.hops[0], dataclasses.replace(hand.hops[1], clues=()))
    )
    assert s.resolve(loose)[1] == ["HP:0000101", "HP:0000201"] and not s.is_unique(loose)
    # The longest chain from GA has six hops and resolves uniquely, from any seed.
    for seed in range(5):
        chain = s.longest_chain("NCBIGene:1", random.Random(seed), max_hops=6)
        assert len(chain.hops) == 6 and s.is_unique(chain)


def test_cache_is_versioned_and_rebuilt(tmp_path):
    release = write_release(tmp_path / "release")
    cache = tmp_path / "cache"
    first = hpo.load(release, cache=cache)
    (entry,) = cache.iterdir()
    warm = hpo.load(release, cache=cache)
    assert warm.terms == first.terms and warm.disease_names == first.disease_names
    np.testing.assert_array_equal(warm.annotations.frequency, first.annotations.frequency)
    np.testing.assert_array_equal(warm.gene_disease, first.gene_disease)
    entry.write_bytes(b"damaged")
    assert hpo.load(release, cache=cache).terms == first.terms  # Rebuilt, not crashed.
    write_release(release, HPOA_ROWS[:-1])  # A new release gets a new cache entry.
    assert len(hpo.load(release, cache=cache).disease_ids) == 3
    assert len(list(cache.iterdir())) == 2


def test_bad_release_files_name_file_and_line(tmp_path):
    rows = [*HPOA_ROWS[:2], ("OMIM:1", "Alpha syndrome", "", "HP:9999999", "", "P")]
    release = write_release(tmp_path / "r", rows)
    with pytest.raises(hpo.HpoFormatError, match=r"phenotype.hpoa:5: hpo_id 'HP:9999999'"):
        hpo.parse(release)
    rows = [("OMIM:1", "Alpha syndrome", "MAYBE", "HP:0000101", "", "P")]
    with pytest.raises(hpo.HpoFormatError, match=r"phenotype.hpoa:3: qualifier 'MAYBE'"):
        hpo.parse(write_release(tmp_path / "s", rows))
    (tmp_path / "s" / "hp.obo").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks hp\.obo"):
        hpo.parse(tmp_path / "s")


# -- questions on the real graph -----------------------------------------------------------


@pytest.fixture(scope="module")
def questions(real_graph):
    return list(qa.synthesise(real_graph, 40, seed=3, seeds="mixed"))


def test_questions_resolve_uniquely_and_leak_nothing(real_graph, questions):
    sampler = chains.ChainSampler(real_graph)
    assert len(questions) == 40
    hops = collections.Counter(q.hops for q in questions)
    assert set(hops) <= set(range(2, 7)) and len(hops) >= 3
    for q in questions:
        record = dataclasses.asdict(q)
        chain = qa.record_chain(record)
        assert sampler.is_unique(chain)
        assert chain.answer == q.answer["id"] and q.answer["name"] in q.answer["aliases"]
        text = q.question.lower()
        for entity in chain.entities[1:]:
            assert real_graph.name(entity).lower() not in text
        for alias in q.answer["aliases"]:
            assert len(alias) < 3 or alias.lower() not in text
        assert real_graph.name(q.anchor) in q.question  # The anchor is named.
        assert "Entity_A" in q.question or q.hops == 1
        assert q.difficulty == ("easy" if q.hops <= 2 else "medium" if q.hops == 3 else "hard")
    assert len({q.question for q in questions}) == len(questions)


def test_questions_replay_from_a_seed(real_graph, questions):
    again = list(qa.synthesise(real_graph, 10, seed=3, seeds="mixed"))
    assert again == questions[:10]
    other = list(qa.synthesise(real_graph, 10, seed=4, seeds="mixed"))
    assert [q.question for q in other] != [q.question for q in again]


def test_leak_filter_by_hand(toy):
    chain = chains.Chain(
        "NCBIGene:1",
        (
            chains.Hop("associated_with", False, "OMIM:1"),
            chains.Hop("has_phenotype", False, "HP:0000101"),
        ),
    )
    assert qa.leaks(toy, "Which feature of the gene GA is first alpha?", chain) == ["first alpha"]
    assert qa.leaks(toy, "Is alpha syndrome caused by GA?", chain) == ["alpha syndrome"]
    assert qa.leaks(toy, "Which clinical feature is a sign seen in Entity_A?", chain) == []


def test_cli_writes_jsonl(tmp_path):
    env = {**os.environ, "MEDJAX_CACHE": str(tmp_path / "cache")}
    subprocess.run(
        [sys.executable, "-m", "medjax.synthesis.qa", "--out", str(tmp_path / "out"), "--num", "5"],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    lines = (tmp_path / "out" / "questions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 5
    for r in records:
        assert {"question", "answer", "hops", "reasoning_path"} <= set(r)
        assert {"id", "name", "aliases"} <= set(r["answer"]) and r["hops"] == len(
            r["reasoning_path"]
        )


class _Rewriter:
    """A stand-in LLM: returns fixed rewrites in order."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, conversations, params, *, num_samples=1):
        from medjax import llm

        assert len(conversations) == len(self.texts)
        return [llm.Generation(t) for t in self.texts]


def test_llm_rewrite_keeps_only_safe_paraphrases(real_graph, questions):
    records = [dataclasses.asdict(q) for q in questions[:4]]
    anchor = real_graph.name(records[0]["anchor"])
    placeholders = " ".join(sorted(set(re.findall(r"Entity_[A-Z]", records[0]["question"]))))
    good = f"Beginning with {anchor}, follow {placeholders}: which one ends the chain?"
    leaky = records[1]["question"] + " Hint: " + records[1]["answer"]["name"]
    no_anchor = records[2]["question"].replace(real_graph.name(records[2]["anchor"]), "it")
    out = qa.rewrite(real_graph, records, _Rewriter([good, leaky, no_anchor, ""]))
    assert [r["rewritten"] for r in out] == [True, False, False, False]
    assert out[0]["question"] == good
    assert [r["question"] for r in out[1:]] == [r["question"] for r in records[1:]]


def test_curriculum_split(questions):
    records = [dataclasses.asdict(q) for q in questions]
    stages = qa.curriculum(records)
    assert stages["easy"] and all(r["hops"] == 2 for r in stages["easy"])
    assert stages["hard"] and all(4 <= r["hops"] <= 6 for r in stages["hard"])
