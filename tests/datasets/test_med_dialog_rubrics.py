"""medjax.datasets: `med_dialog_rubrics/tiny` built from scratch into a temporary data dir
(no download, no TensorFlow) and compared with `cases.synthesise_case` and
`rubrics.reject_sample` run here; the MedDialogRubrics .xlsx reader on a workbook written
here. The HPO cache goes to a temporary `MEDJAX_CACHE`, as in test_med_kg_qa.py.
"""

# ruff: noqa: RUF001 (full-width Chinese punctuation is what the spreadsheet holds)

import hashlib
import random
import re
import types

import pytest

from medjax import datasets
from medjax.datasets import med_dialog_rubrics as mdr
from medjax.datasets import meddialog_xlsx
from medjax.synthesis import cases, rubrics

TINY = 40


@pytest.fixture(scope="module", autouse=True)
def cold_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDJAX_CACHE", str(tmp_path_factory.mktemp("medjax_cache")))
        mdr.knowledge_graph.cache_clear()
        yield
    mdr.knowledge_graph.cache_clear()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def sources(data_dir):
    return datasets.load("med_dialog_rubrics/tiny", split=None, data_dir=data_dir)


@pytest.fixture(scope="module")
def graph():
    return mdr.knowledge_graph()


def bucket_split(disease_id: str) -> str:
    # The documented rule, written out independently of `med_kg_qa.split_of`.
    h = int(hashlib.sha256(disease_id.encode()).hexdigest()[:16], 16) % 100
    return "train" if h < 80 else "validation" if h < 90 else "test"


def expected_diseases(graph, num: int, seed: int = 0) -> list[str]:
    """The first `num` shuffled OMIM diseases that have a consistent case for `seed`."""
    order = sorted(d for d in graph.diseases() if d.startswith("OMIM:"))
    random.Random(seed).shuffle(order)
    out = []
    for d in order:
        try:
            cases.synthesise_case(graph, d, seed=seed)
        except ValueError:
            continue
        out.append(d)
        if len(out) == num:
            return out
    raise AssertionError("too few diseases")


def test_splits_hold_every_case_once_and_share_no_disease(data_dir, sources, graph):
    assert set(sources) == {"train", "validation", "test"}
    sizes = {split: len(src) for split, src in sources.items()}
    assert sum(sizes.values()) == TINY and sizes["train"] > sizes["test"] > 0
    info = datasets.builder("med_dialog_rubrics/tiny", data_dir=data_dir).info
    assert {s: info.splits[s].num_examples for s in sizes} == sizes
    assert info.file_format.value == "array_record"
    diseases = {s: [ex["disease_id"].decode() for ex in src] for s, src in sources.items()}
    assert not set(diseases["train"]) & set(diseases["validation"])
    assert not set(diseases["train"]) & set(diseases["test"])
    assert not set(diseases["validation"]) & set(diseases["test"])
    for split, ids in diseases.items():
        assert {bucket_split(d) for d in ids} == {split}
    # 8,359 OMIM diseases: tiny is one case each of the first 40 usable ones, seed 0.
    everything = sorted(d for ids in diseases.values() for d in ids)
    assert everything == sorted(expected_diseases(graph, TINY))


def test_records_round_trip(sources, graph):
    for src in sources.values():
        for example in src:
            case = mdr.to_case(example)
            disease = case["disease"]["id"]
            want = cases.synthesise_case(graph, disease, seed=case["seed"])
            assert case["seed"] == 0 and case["case_id"] == f"{disease}#0" == want.case_id
            assert case["disease"] == want.disease
            assert (case["age"], case["sex"], case["onset"]) == (want.age, want.sex, want.onset)
            assert case["chief_complaint"] == want.chief_complaint
            assert case["family_history"] == want.family_history
            assert case["facts"] == [
                {"id": f.id, "concept": f.concept, "present": f.present}
                | {"category": f.category, "text": f.text}
                for f in want.facts
            ]
            rubric = rubrics.reject_sample(graph, disease, seed=case["rubric_seed"])
            assert [(r["id"], r["text"], r["kind"], r["priority"]) for r in case["rubrics"]] == [
                (it.id, it.text, it.kind, it.priority) for it in rubric.items
            ]
            assert [r["concepts"] for r in case["rubrics"]] == [
                list(it.concepts) for it in rubric.items
            ]
            assert [(d["id"], d["similarity"]) for d in case["differential"]] == [
                (d, s) for d, s in rubric.differential
            ]
            assert {r["priority"] for r in case["rubrics"]} <= {1, 2, 3}
            assert 3 in {r["priority"] for r in case["rubrics"]}


def test_configs():
    default = datasets.builder("med_dialog_rubrics", data_dir="/nonexistent")
    assert default.builder_config.name == "default"
    assert default.builder_config.num_cases == 5_200
    assert str(default.version) == "1.0.0" and "1.0.0" in default.RELEASE_NOTES
    with pytest.raises(ValueError, match="no config 'huge'; configs: tiny, default"):
        datasets.load("med_dialog_rubrics/huge")


def test_rounds_reseed_cases_and_reuse_rubrics(monkeypatch):
    """Hand-checked with stubs: two OMIM diseases (one ORPHA left out), 5 cases from seed 3
    take rounds with case seeds 3, 3, 4, 4, 5; each disease's rubric is drawn once."""
    graph = types.SimpleNamespace(diseases=lambda: ["OMIM:2", "ORPHA:9", "OMIM:1"])

    def stub_cases(graph, diseases, *, seed):
        return [types.SimpleNamespace(case_id=f"{d}#{seed}") for d in diseases]

    drawn = []

    def stub_rubric(graph, disease, *, k_items, num_samples, seed):
        drawn.append((disease, seed))
        return f"rubric of {disease}"

    monkeypatch.setattr(mdr.cases_lib, "synthesise_cases", stub_cases)
    monkeypatch.setattr(mdr.rubrics_lib, "reject_sample", stub_rubric)
    config = mdr.CasesConfig(name="stub", num_cases=5, seed=3)
    order = mdr.disease_order(graph, 3)
    assert sorted(order) == ["OMIM:1", "OMIM:2"]
    pairs = mdr.synthesise(config, graph)
    assert [c.case_id for c, _ in pairs] == [
        f"{order[0]}#3", f"{order[1]}#3", f"{order[0]}#4", f"{order[1]}#4", f"{order[0]}#5"
    ]  # fmt: skip
    assert [r for _, r in pairs] == [f"rubric of {order[i]}" for i in (0, 1, 0, 1, 0)]
    assert drawn == [(order[0], 3), (order[1], 3)]

    monkeypatch.setattr(mdr.cases_lib, "synthesise_cases", lambda graph, diseases, *, seed: [])
    with pytest.raises(RuntimeError, match="round 0 gave no case"):
        mdr.synthesise(config, graph)


# The MedDialogRubrics spreadsheet reader.

HEADER = ["编号", "主诉", "病历", "诊断", "科室", "问诊要点"]
ROWS = [
    [1, "发热3天", "患者男，25岁，发热3天，最高38.5℃。", "急性上呼吸道感染", "呼吸内科",
     "1.询问发热持续时间 2.询问最高体温38.5℃时是否寒战\n3、询问有无咳嗽"],
    [2, "反复头痛1月", "患者女，40岁，头痛。", "偏头痛", "神经内科", "头痛部位；头痛性质;诱发因素"],
    [None, None, None, None, None, None],
    [3, "腹痛2小时", "患者男，60岁。", "急性阑尾炎", "普外科",
     "（1）腹痛部位\n（2）有无转移性右下腹痛"],
]  # fmt: skip


def write_xlsx(path, header, rows):
    openpyxl = pytest.importorskip("openpyxl")
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.title = "病例"
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    workbook.save(path)
    return path


def test_load_xlsx(tmp_path):
    path = write_xlsx(tmp_path / "MedDialogRubrics.xlsx", HEADER, ROWS)
    rows = meddialog_xlsx.load_xlsx(path)
    assert [r["row"] for r in rows] == [2, 3, 5]
    assert rows[0] == {
        "chief_complaint": "发热3天",
        "record": "患者男，25岁，发热3天，最高38.5℃。",
        "diagnosis": "急性上呼吸道感染",
        "department": "呼吸内科",
        "must_ask": ["询问发热持续时间", "询问最高体温38.5℃时是否寒战", "询问有无咳嗽"],
        "row": 2,
    }
    assert rows[1]["must_ask"] == ["头痛部位", "头痛性质", "诱发因素"]
    assert rows[2]["must_ask"] == ["腹痛部位", "有无转移性右下腹痛"]
    assert (rows[2]["diagnosis"], rows[2]["department"]) == ("急性阑尾炎", "普外科")
    assert meddialog_xlsx.load_xlsx(path, sheet="病例") == rows


def test_load_xlsx_errors(tmp_path):
    path = write_xlsx(
        tmp_path / "partial.xlsx", ["主诉", "病历", "问诊要点"], [["发热", "病历", "1.体温"]]
    )
    with pytest.raises(ValueError) as err:
        meddialog_xlsx.load_xlsx(path)
    message = str(err.value)
    assert "partial.xlsx" in message
    assert "lacks column(s) 诊断 (diagnosis), 科室 (department);" in message
    assert re.search(r"header row: \['主诉', '病历', '问诊要点'\]", message)
    with pytest.raises(ValueError, match=r"partial\.xlsx.*has no sheet 'x'"):
        meddialog_xlsx.load_xlsx(path, sheet="x")
    with pytest.raises(FileNotFoundError, match=r"missing\.xlsx"):
        meddialog_xlsx.load_xlsx(tmp_path / "missing.xlsx")
    (tmp_path / "text.xlsx").write_text("not a workbook")
    with pytest.raises(ValueError, match=r"text\.xlsx.*not a readable \.xlsx"):
        meddialog_xlsx.load_xlsx(tmp_path / "text.xlsx")
