"""The MedDialogRubrics doctor as a training task (`training.consultation`): rewards by hand,
the expert's interviews and a scripted doctor's evaluation against hand-computed coverage."""

import numpy as np
import pytest

from medjax import agents
from medjax.eval import dialogue
from medjax.llm.base import Generation
from medjax.synthesis import cases, rubrics
from medjax.training import consultation

FAMILY = "Does anyone in your family have similar problems?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The task on the tiny case set, its environment and data (built once)."""
    root = tmp_path_factory.mktemp("consultation")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDJAX_CACHE", str(root / "cache"))
    task = consultation.ConsultationTask(data_dir=str(root / "tfds"), max_turns=4)
    env = task.environment()
    data = task.load(env)
    yield task, env, data
    mp.undo()


def _item(item_id, concepts, priority):
    return rubrics.RubricItem(
        item_id, f"Asks about {item_id}", "phenotype", concepts, (), "present", 1.0, priority
    )


def test_rewards_by_hand(tiny):
    _, env, _ = tiny
    task = consultation.ConsultationTask(coverage_weight=1.0, diagnosis_weight=0.5, max_turns=5)
    rubric = [
        _item("HP:0001250", ("HP:0001250",), 3),  # Seizure.
        _item("HP:0001263", ("HP:0001263",), 2),  # Global developmental delay.
        rubrics.RubricItem("generic:family_history", "", "generic", (), (), "unknown", 0.0, 1),
    ]
    case = cases.PatientCase("c", {"id": "OMIM:1", "name": "X"}, 3.0, "male", None, [], [], "")
    bench = dialogue.BenchmarkCase(case, rubric, ["X syndrome", "X"])
    good = [
        agents.Turn("Have you had seizures?"), agents.Turn("Is anyone in your family ill?"),
        agents.Turn(dialogue.END), agents.Turn("<answer>x syndrome</answer>", forced_final=True),
    ]  # fmt: skip
    bad = [
        agents.Turn("How is the weather?"), agents.Turn("<answer>flu</answer>", forced_final=True)
    ]  # fmt: skip
    trajs = [
        agents.Trajectory("c", 0, "doctor", turns=good, answer="x syndrome"),
        agents.Trajectory("c", 1, "doctor", turns=bad, answer="flu"),
    ]
    rewards, stats = task.score(env, trajs, [bench], num_generations=2)
    # Weights 3 + 2 + 1: seizure (3) and family history (1) met, then the right diagnosis.
    np.testing.assert_allclose(rewards, [4 / 6 + 0.5, 0.0], rtol=1e-6)
    assert stats["reward/coverage"] == pytest.approx(2 / 6)
    assert stats["reward/diagnosis_accuracy"] == pytest.approx(0.5)
    assert stats["reward/precision"] == pytest.approx(0.5)  # 2/2 useful, then 0/1.


def test_expert_interviews_are_the_sft_chats_and_hide_the_diagnosis(tiny):
    task, env, data = tiny
    assert len(data.chats) == len(data.records) > 0 and data.eval_records
    for chat, bench in zip(data.chats, data.records, strict=True):
        messages = chat["messages"]
        opening = messages[1]["content"]
        assert bench.case.case_id not in opening and bench.case.disease["id"] not in opening
        assert bench.case.chief_complaint in opening
        # The oracle asks the rubric by priority: its first question is the top item's.
        top = sorted(bench.rubric, key=lambda i: (-i.priority, i.id))[0]
        if not top.id.startswith("generic:"):
            name = env.graph.name(top.concepts[0]).lower()
            assert messages[2]["content"] == f"Do you have {name}?"
        # At most max_turns questions, then the diagnosis: the disease's name.
        asked = [m for m in messages[2:-1] if m["role"] == "assistant"]
        assert len(asked) <= task.max_turns
        assert messages[-1]["content"] == f"<answer>{bench.case.disease['name']}</answer>"
        assert 0 < chat["reward"] <= 1 and task.reference_reward(chat) == chat["reward"]
    prompts = [q.prompt for q in dialogue.queries(data.records + data.eval_records)]
    assert len(set(prompts)) == len(prompts)


class FamilyDoctor:
    """A text backend that asks about the family once, ends, and does not know."""

    def generate(self, conversations, params, *, num_samples=1):
        out = []
        for messages in conversations:
            asked = sum(m["role"] == "assistant" for m in messages)
            if messages[-1]["content"].endswith(dialogue.DIAGNOSIS_PROMPT):
                text = "<answer>unknown</answer>"
            else:
                text = FAMILY if asked == 0 else dialogue.END
            out += [Generation(text)] * num_samples
        return out


def test_a_scripted_doctor_scores_its_hand_computed_coverage(tiny):
    task, env, data = tiny
    records = data.eval_records
    result = task.evaluate(env, FamilyDoctor(), records)
    # Only the family-history item can be met: its weight over the rubric's total.
    expected = [
        sum(i.priority for i in b.rubric if i.id == "generic:family_history")
        / sum(i.priority for i in b.rubric)
        for b in records
    ]
    assert result["coverage"] == pytest.approx(np.mean(expected))
    assert result["mean_reward"] == pytest.approx(np.mean(expected))
    assert result["turns"] == 1 and result["diagnosis_accuracy"] == 0
    trajs = task.rollout(env, FamilyDoctor(), records[:1], num_generations=3)
    assert [t.rollout_index for t in trajs] == [0, 1, 2]
    assert all(t.turns[0].reply == FAMILY and t.answer == "unknown" for t in trajs)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match=r"ConsultationTask.dataset 'med_kg_qa/tiny'"):
        consultation.ConsultationTask(dataset="med_kg_qa/tiny")
    with pytest.raises(ValueError, match=r"ConsultationTask.expert 'nurse'"):
        consultation.ConsultationTask(expert="nurse")
    task = consultation.ConsultationTask()
    with pytest.raises(ValueError, match=r"SFTStage\.role 'main'"):
        task.sft_chats(None, [], "main")
    with pytest.raises(ValueError, match="M-GRPO"):
        task.rollout(None, None, [], num_generations=2, hierarchical=True)


def test_the_trainer_refuses_what_the_doctor_task_cannot_do(tmp_path):
    from medjax import train_lib

    task = consultation.ConsultationTask()
    run_dir = tmp_path / "run"
    with pytest.raises(train_lib.TrainError, match="M-GRPO needs a task with a sub-agent"):
        train_lib.train(str(run_dir), task=task, stages=[train_lib.RLStage(algorithm="mgrpo")])
    with pytest.raises(train_lib.TrainError, match="role 'searcher' is not one of"):
        train_lib.train(str(run_dir), task=task, stages=[train_lib.SFTStage(role="searcher")])
    assert not run_dir.exists()


def test_mixed_experts_take_turns_by_case(tiny):
    _, env, data = tiny
    task = consultation.ConsultationTask(data_dir=None, max_turns=4, expert=("checklist", "random"))
    trajs, scores = task._expert_interviews(env, data.records)
    firsts = [t.messages[2]["content"] for t in trajs]
    assert all(q == dialogue.CHECKLIST[0] for q in firsts[0::2])  # The checklist's first.
    assert all(q.startswith("Do you have ") for q in firsts[1::2])  # Random findings.
    assert len(scores) == len(data.records)
