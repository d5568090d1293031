# ruff: noqa: RUF001  (Chinese text in the released-file test uses full-width punctuation.)
"""The MedDialogRubrics benchmark: the rubric judge and the scores by hand, and run_eval.py
end to end with the three scripted baselines, which must order as expected."""

import json
import os
import re
import subprocess
import sys

import pytest

from medjax import agents
from medjax.envs.patient import ConceptMatcher
from medjax.eval import dialogue
from medjax.knowledge import graph, hpo
from medjax.synthesis import cases, rubrics


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    return graph.KnowledgeGraph(hpo.load(cache=tmp_path_factory.mktemp("cache")))


def _item(item_id, concepts, priority):
    return rubrics.RubricItem(
        item_id, f"Asks about {item_id}", "phenotype", concepts, (), "present", 1.0, priority
    )


def test_judge_and_scores_by_hand(g):
    judge = dialogue.RubricJudge(g, ConceptMatcher(g))
    rubric = [
        _item("HP:0001250", ("HP:0001250",), 3),  # Seizure.
        _item("HP:0001263", ("HP:0001263",), 2),  # Global developmental delay.
        rubrics.RubricItem("generic:family_history", "", "generic", (), (), "unknown", 0.0, 1),
    ]
    assert judge.met("Have you had seizures?", rubric) == {"HP:0001250"}
    assert judge.met("Any focal-onset seizures?", rubric) == {"HP:0001250"}  # A descendant.
    assert judge.met("Is anyone in your family ill?", rubric) == {"generic:family_history"}
    assert judge.met("How is the weather?", rubric) == set()
    case = cases.PatientCase("c", {"id": "OMIM:1", "name": "X"}, 3.0, "male", None, [], [], "")
    bench = dialogue.BenchmarkCase(case, rubric, ["X syndrome", "X"])
    turns = [
        agents.Turn("How is the weather?"), agents.Turn("Have you had seizures?"),
        agents.Turn("Is anyone in your family ill?"), agents.Turn(dialogue.END),
        agents.Turn("<answer>x syndrome</answer>", forced_final=True),
    ]  # fmt: skip
    traj = agents.Trajectory("c", 0, "doctor", turns=turns, answer="x syndrome")
    s = dialogue.score_case(judge, bench, traj, max_turns=5)
    # Weights 3 + 2 + 1 = 6: seizure (3) then family history (1) met.
    assert s["coverage_by_turn"] == [0.0, 0.5, 4 / 6, 4 / 6, 4 / 6]
    assert s["coverage"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3) and s["diagnosis_correct"] and s["turns"] == 3


def test_cases_from_the_dataset_keep_their_rubrics(g, tmp_path, monkeypatch):
    from medjax import datasets
    from medjax.datasets import med_dialog_rubrics

    monkeypatch.setenv("MEDJAX_CACHE", str(tmp_path / "cache"))
    source = datasets.load("med_dialog_rubrics/tiny", split="test", data_dir=str(tmp_path))
    bench = dialogue.cases_from_dataset(g, [med_dialog_rubrics.to_case(source[0])])[0]
    disease = bench.case.disease["id"]
    assert bench.rubric == rubrics.reject_sample(g, disease, seed=0).items
    assert bench.case == cases.synthesise_case(g, disease, seed=bench.case.seed)


def test_run_eval_end_to_end(tmp_path):
    env = {**os.environ, "MEDJAX_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "report"
    cmd = [sys.executable, "run_eval.py", "--task", "dialogue", "--config", "tiny"]
    cmd += ["--data-dir", str(tmp_path / "tfds"), "--out", str(out)]
    subprocess.run(
        cmd,
        check=True, env=env, capture_output=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"random", "checklist", "oracle"}
    for metric in ("coverage", "recall", "f1"):
        assert summary["oracle"][metric] > summary["checklist"][metric] > summary["random"][metric]
    assert summary["oracle"]["coverage"] == 1.0 and summary["oracle"]["diagnosis_accuracy"] == 1.0
    assert summary["random"]["diagnosis_accuracy"] == 0.0
    curve = summary["oracle"]["coverage_by_turn"]
    assert len(curve) == 12 and curve == sorted(curve)
    lines = (out / "oracle.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["transcript"][0]["role"] == "system"
    report = (out / "report.md").read_text()
    assert "| oracle | 5 | 1.000 |" in report  # The tiny config's test split: 5 cases.
    for png in ("coverage_by_turn.png", "scores.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Scripted:
    """A TextBackend that answers with fn(chat)."""

    def __init__(self, fn):
        self.fn = fn

    def generate(self, conversations, params, *, num_samples=1):
        from medjax import llm

        return [llm.Generation(self.fn(chat)) for chat in conversations]


@pytest.mark.parametrize(
    ("voting", "coverage"), [("majority", 1.0), ("unanimous", 0.0), ("liberal", 1.0)]
)
def test_released_file_with_llm_patient_and_judge_panel(tmp_path, voting, coverage):
    openpyxl = pytest.importorskip("openpyxl")
    from medjax.datasets import meddialog_xlsx

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["主诉", "病历", "诊断", "科室", "问诊要点"])
    sheet.append(
        ["咳嗽三天", "患者咳嗽三天，无发热。", "急性支气管炎", "呼吸科", "1. 发热\n2. 咳痰"]
    )
    path = tmp_path / "meddialog.xlsx"
    book.save(path)
    bench = dialogue.cases_from_xlsx(meddialog_xlsx.load_xlsx(path))
    assert [i.text for i in bench[0].rubric] == ["发热", "咳痰"] and bench[0].record

    def doctor(chat):
        asked = sum(m["role"] == "assistant" for m in chat)
        if chat[-1]["content"].endswith(dialogue.DIAGNOSIS_PROMPT):
            return "<answer>急性支气管炎</answer>"
        return ["有没有发热？", "有没有咳痰？", dialogue.END][asked]

    def patient(chat):
        assert "患者咳嗽三天" in chat[0]["content"]  # The patient sees its record.
        return "没有。"

    def fair_judge(chat):
        items = re.findall(r"(\d+)\. (\S+)", chat[1]["content"])
        question = chat[1]["content"].rsplit("Doctor's question: ", 1)[1]
        return "\n".join(f"{k}: {'yes' if text in question else 'no'}" for k, text in items)

    judges = [_Scripted(fair_judge), _Scripted(fair_judge), _Scripted(lambda chat: "1: no\n2: no")]
    trajs, scores = dialogue.run(
        _Scripted(doctor), bench, None, patient=dialogue.RecordPatient(_Scripted(patient), bench),
        judge=dialogue.JudgePanel(judges, voting),
    )  # fmt: skip
    assert scores[0]["coverage"] == coverage and scores[0]["diagnosis_correct"]
    assert trajs[0].messages[3] == {"role": "user", "content": "没有。"}
    # The panel also judges diagnoses that exact match misses.
    panel = dialogue.JudgePanel([_Scripted(lambda chat: "Correct")] * 2 + judges[2:], voting)
    assert panel.same_diagnosis("支气管炎（急性）", "急性支气管炎") == (voting != "unanimous")
    with pytest.raises(ValueError, match="voting must be one of"):
        dialogue.JudgePanel(judges, "plurality")
