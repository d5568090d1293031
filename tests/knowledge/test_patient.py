"""The patient agent on real HPO cases: the deterministic patient answers from its facts, the
checker catches a noisy backend's inserted findings (>= 95% recall, <= 5% false alarms), and
the guidance loop removes them; the three configurations of the paper are measured."""

import random

import pytest

from medjax.envs import patient
from medjax.knowledge import graph, hpo
from medjax.sampling import SamplingParams
from medjax.synthesis import cases

NOISE_RATE = 0.3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    g = graph.KnowledgeGraph(hpo.load(cache=tmp_path_factory.mktemp("cache")))
    matcher = patient.ConceptMatcher(g)
    rng = random.Random(0)
    diseases = [d for d in g.diseases() if d.startswith("OMIM:")]
    rng.shuffle(diseases)
    made = [cases.synthesise_case(g, d) for d in diseases[:60]]
    phenotypes = [p for p in g.phenotypes() if g.is_under(p, "HP:0000118")]
    return g, matcher, made, phenotypes


def test_deterministic_patient_by_hand(world):
    g, matcher, _, _ = world
    case = cases.synthesise_case(g, "OMIM:609621")  # Short QT syndrome 2.
    assert "HP:0001662" in case.present  # Bradycardia ("slow heartbeats").
    kp = patient.KnowledgePatient(g, matcher)
    assert kp.reply(case, "Is your heart rate slow, a bradycardia?") == "I have slow heartbeats."
    assert kp.reply(case, "Any seizures?") == "No, I don't have epilepsy."
    assert kp.reply(case, "Is anyone in your family affected?") == case.family_history
    assert kp.reply(case, "How is the weather?") == patient.NOT_SURE


def test_checker_and_guidance_report(world):
    g, _, made, _ = world
    report = patient.guidance_report(g, made, num_questions=240, noise_rate=NOISE_RATE)
    # The bar for the checker on a backend that inserts unsupported findings.
    assert report["checker"]["recall"] >= 0.95
    assert report["checker"]["false_alarm_rate"] <= 0.05
    rates = {k: v["hallucination_rate"] for k, v in report["configurations"].items()}
    # Noise at 0.3 (0.15 under the strict prompt): within binomial bounds of 240 draws.
    assert 0.2 <= rates["prompt only"] <= 0.4
    assert 0.08 <= rates["+ strict adherence"] <= 0.22
    assert rates["+ guidance"] == 0.0
    guided = report["configurations"]["+ guidance"]
    assert guided["corrections"] == guided["inserted"] > 0 and guided["fallbacks"] == 0


def test_contradictions_are_caught(world):
    g, matcher, made, _ = world
    checker = patient.FactChecker(g, matcher)
    case = made[0]
    fact = next(f for f in case.facts if f.present and f.concept.startswith("HP:"))
    denial = f"I never had {g.name(fact.concept).lower()}."
    assert checker.check(case, denial).contradicted == (fact.concept,)


class _Recording:
    """Answers every chat with its last message (or `reply`), and records each call's size
    and budget."""

    def __init__(self, reply=None):
        self.reply = reply
        self.sizes, self.budgets = [], []

    def generate(self, conversations, params, *, num_samples=1):
        from medjax.llm.base import Generation

        self.sizes.append(len(conversations))
        self.budgets.append(params.max_new_tokens)
        return [
            Generation(self.reply or f"reply to: {chat[-1]['content']}") for chat in conversations
        ]


def test_guided_patient_batches_backend_calls(world):
    g, _, made, _ = world
    questions = [f"Question {i}?" for i in range(5)]
    replies = {}
    for batch_size in (None, 2):
        backend = _Recording()
        agent = patient.GuidedPatient(g, backend, guidance=False, batch_size=batch_size)
        replies[batch_size] = agent.reply_batch(made[:5], questions)
        assert backend.sizes == ([5] if batch_size is None else [2, 2, 1])
    assert replies[None] == replies[2] == [f"reply to: Question {i}?" for i in range(5)]
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        patient.GuidedPatient(g, _Recording(), batch_size=0)


def test_guidance_report_passes_params_and_batches_to_an_llm_patient(world):
    g, _, made, _ = world
    backend = _Recording("I'm not sure, doctor.")
    params = SamplingParams(max_new_tokens=48, temperature=0.7)
    report = patient.guidance_report(
        g, made, num_questions=10, backend=backend, params=params, batch_size=4
    )
    # A reply that names no finding is never flagged: three configurations of
    # 10 replies each in calls of 4, 4 and 2, each with the given budget.
    assert backend.sizes == [4, 4, 2] * 3 and set(backend.budgets) == {48}
    for row in report["configurations"].values():
        assert row["corrections"] == 0 and row["hallucination_rate"] == 0.0
