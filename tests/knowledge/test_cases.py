"""medjax.synthesis.cases on a hand-made release: templates, records, the consistency
checker, atomic facts in lay words and the chief complaint; plus a smoke run on the real
graph."""

import random

import pytest

from medjax.knowledge import graph, hpo
from medjax.synthesis import cases

TERMS = [
    ("HP:0000001", "All", None, ""),
    ("HP:0000118", "Phenotypic abnormality", "HP:0000001", ""),
    ("HP:0000005", "Mode of inheritance", "HP:0000001", ""),
    ("HP:0000007", "Autosomal recessive inheritance", "HP:0000005", ""),
    ("HP:0003674", "Onset", "HP:0000001", ""),
    ("HP:0011463", "Childhood onset", "HP:0003674", ""),
    ("HP:0001250", "Seizure", "HP:0000118", 'synonym: "Epilepsy" RELATED layperson []'),
    ("HP:0007359", "Focal-onset seizure", "HP:0001250", ""),
    ("HP:0001939", "Abnormality of metabolism/homeostasis", "HP:0000118", ""),
    ("HP:0002151", "Increased serum lactate", "HP:0001939", ""),
    ("HP:0000032", "Abnormality of male external genitalia", "HP:0000118", ""),
    (
        "HP:0000028",
        "Cryptorchidism",
        "HP:0000032",
        'synonym: "Undescended testis" EXACT layperson []',
    ),
]
HEADER = (
    "database_id\tdisease_name\tqualifier\thpo_id\treference\tevidence\tonset\tfrequency\tsex"
    "\tmodifier\taspect\tbiocuration"
)
# (disease, name, qualifier, term, onset, frequency, sex, aspect)
ROWS = [
    ("OMIM:1", "Contradictory syndrome", "", "HP:0007359", "", "HP:0040280", "", "P"),
    ("OMIM:1", "Contradictory syndrome", "NOT", "HP:0001250", "", "", "", "P"),
    ("OMIM:2", "Lactic epilepsy", "", "HP:0001250", "HP:0011463", "HP:0040280", "", "P"),
    ("OMIM:2", "Lactic epilepsy", "", "HP:0002151", "", "1/1", "", "P"),
    ("OMIM:2", "Lactic epilepsy", "", "HP:0000028", "", "HP:0040280", "MALE", "P"),
    ("OMIM:2", "Lactic epilepsy", "", "HP:0000007", "", "", "", "I"),
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    obo = ["format-version: 1.2", "data-version: hp/releases/2099-01-01", ""]
    for tid, name, parent, extra in TERMS:
        obo += ["[Term]", f"id: {tid}", f"name: {name}"]
        obo += [extra] if extra else []
        obo += [f"is_a: {parent} ! x"] if parent else []
        obo.append("")
    (folder / "hp.obo").write_text("\n".join(obo))
    lines = ["#description: test", HEADER]
    for d, name, q, term, onset, freq, sex, aspect in ROWS:
        lines.append("\t".join([d, name, q, term, d, "TAS", onset, freq, sex, "", aspect, "x"]))
    (folder / "phenotype.hpoa").write_text("\n".join(lines) + "\n")
    (folder / "genes_to_phenotype.txt").write_text(
        "ncbi_gene_id\tgene_symbol\thpo_id\thpo_name\tfrequency\tdisease_id\n"
    )
    data = hpo.load(folder, cache=tmp_path_factory.mktemp("cache"))
    return graph.KnowledgeGraph(data)


def test_template(toy):
    t = cases.disease_template(toy, "OMIM:2")
    assert t.phenotypes == (
        ("HP:0001250", 1.0, ""), ("HP:0002151", 1.0, ""), ("HP:0000028", 1.0, "MALE"),
    )  # fmt: skip
    assert t.onsets == ("HP:0011463",) and t.inheritance == ("HP:0000007",) and not t.negatives
    assert cases.disease_template(toy, "OMIM:1").negatives == ("HP:0001250",)


def test_case_by_hand(toy):
    case = cases.synthesise_case(toy, "OMIM:2", seed=3)
    assert case.sex == "male"  # Its only sex-specific row is male.
    assert 1.0 <= case.age <= 6.0 and case.onset == "HP:0011463"  # Childhood onset.
    assert case.present == ["HP:0000028", "HP:0001250", "HP:0002151"]  # All obligate.
    facts = {f.concept: (f.category, f.text) for f in case.facts}
    assert facts["HP:0001250"] == ("history", "I have epilepsy.")  # The layperson synonym.
    assert facts["HP:0000028"] == ("history", "I have undescended testis.")
    assert facts["HP:0002151"] == ("test", "My tests showed increased serum lactate.")
    assert facts["onset"] == ("history", "It started: childhood onset.")
    assert [f.id for f in case.facts] == [f"f{i}" for i in range(len(case.facts))]
    assert case.chief_complaint == "I came because of undescended testis and epilepsy."
    assert cases.synthesise_case(toy, "OMIM:2", seed=3) == case  # Deterministic.


def test_checker_rejects_contradictions(toy):
    # Focal seizure is obligate but Seizure (its parent) is negated: never consistent.
    with pytest.raises(ValueError, match="no consistent record of OMIM:1"):
        cases.synthesise_case(toy, "OMIM:1", max_redraws=5)
    template = cases.disease_template(toy, "OMIM:2")
    case = cases.generate_record(toy, template, random.Random(0), "c")
    assert cases.check_consistency(toy, case) == []
    case.sex, case.age = "female", 0.5
    problems = cases.check_consistency(toy, case)
    assert problems == [
        "age 0.5 is below the onset Childhood onset",
        "HP:0000028 cannot occur in a female patient",
    ]
    case.sex, case.age, case.absent = "male", 3.0, ["HP:0000118"]
    assert cases.check_consistency(toy, case)[0].startswith("HP:0000028 is present but HP:0000118")


def test_llm_rewrite_keeps_unparsed_lines(toy):
    case = cases.synthesise_case(toy, "OMIM:2", seed=3)

    class Writer:
        def generate(self, conversations, params, *, num_samples=1):
            from medjax import llm

            assert "1. " + case.facts[0].text in conversations[0][1]["content"]
            return [llm.Generation("1. My testicle never came down.\nnot a numbered line")]

    out = cases.rewrite_facts(case, Writer())
    assert out.facts[0].text == "My testicle never came down."
    assert [f.text for f in out.facts[1:]] == [f.text for f in case.facts[1:]]


def test_real_graph_cases(tmp_path):
    g = graph.KnowledgeGraph(hpo.load(cache=tmp_path))
    diseases = [d for d in g.diseases() if d.startswith("OMIM:")][:100]
    made = cases.synthesise_cases(g, diseases, seed=0)
    for case in made:
        assert not cases.check_consistency(g, case)
        found = [f for f in case.facts if f.present and f.concept.startswith("HP:")]
        annotated = len(cases.disease_template(g, case.disease["id"]).phenotypes)
        assert len(found) >= min(cases.MIN_FINDINGS, annotated)
        assert case.chief_complaint.startswith("I came because")
