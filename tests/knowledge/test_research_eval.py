"""medjax.eval.research: a scripted policy that answers some questions right, one wrong, one
never and one after a format error; accuracy, reward and every mean checked by hand. Also the
hierarchical agent with its sub-agent played by a second scripted backend."""

import json

import pytest

from medjax import agents, llm
from medjax.envs import research
from medjax.eval import research as eval_research
from medjax.knowledge import corpus, graph, hpo, retrieval
from medjax.models import tokenizer as tokenizer_lib
from medjax.sampling import SamplingParams

CORPUS = [
    "Which gene is behind slow acetylation? Which phenotype is a seizure?",
    '<tool_call>{"name": "search", "arguments": {"query": ["slow acetylation"]}}</tool_call>',
    "<answer>NAT2</answer> It is probably NAT2. Let me think.",
] * 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The real graph, but a BM25 index over two documents: cheap, and enough for `search`."""
    g = graph.KnowledgeGraph(hpo.load(cache=tmp_path_factory.mktemp("cache")))
    docs = [corpus.disease_document(g, "OMIM:243400"), corpus.gene_document(g, "NCBIGene:10")]
    return research.ResearchEnvironment(g, retrieval.BM25Index(docs))


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(CORPUS, vocab_size=320)


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def record(qid, question, name, aliases):
    return {"id": qid, "question": question, "answer": {"name": name, "aliases": aliases}}


NAT2 = ["NAT2", "NAT-2", "NCBIGene:10"]
RECORDS = [
    record("right", "Which gene is behind slow acetylation?", "NAT2", NAT2),
    record("wrong", "Which phenotype is a seizure?", "Seizure", ["Seizure"]),
    record("never", "Which gene is behind fast acetylation?", "NAT2", NAT2),
    record("late", "Which gene acetylates slowly?", "NAT2", NAT2),
]
# The policy's replies by question, turn by turn (the last one repeats).
SEARCH = call("search", query=["slow acetylation"])
REPLIES = {
    "right": [SEARCH, "<answer>NAT2</answer>"],
    "wrong": ["<answer>Migraine</answer>"],
    "never": ["It is probably NAT2."],
    "late": ["Let me think.", "<answer>the NAT-2</answer>"],
}


def policy(prompt: str) -> str:
    """Finds the question in the rendered prompt and the turn from the assistant turns."""
    qid = next(r["id"] for r in RECORDS if r["question"] in prompt)
    turn = prompt.count("<|im_start|>assistant") - 1
    replies = REPLIES[qid]
    return replies[min(turn, len(replies) - 1)]


def sampled_tokens(tok, reply: str) -> int:
    # A reply that ends on a stop tag stops there; any other ends with the EOS token.
    stopped = reply.endswith(("</tool_call>", "</answer>"))
    return len(tok.encode(reply, add_special_tokens=False)) + (not stopped)


def test_scripted_accuracy_and_rewards_by_hand(env, tok):
    backend = llm.ScriptedBackend(policy, tok)
    cfg = research.RewardConfig(format_weight=0.1, call_penalty=0.05, call_budget=10)
    report = eval_research.evaluate(
        env, backend, RECORDS, num_rollouts=2, reward_config=cfg, agent_kwargs={"max_turns": 2}
    )
    # right: 2 turns, 1 search, correct and well formed: 1 + 0.1.
    # wrong: 1 turn, answers Migraine: 0 + 0.1.
    # never: no action in turns 1 and 2 (2 errors), the forced 3rd gives none: 0.
    # late: no action in turn 1 (1 error), then "the NAT-2" == alias NAT-2: 1 + 0.
    assert report["num_questions"] == 4 and report["num_episodes"] == 8
    assert report["accuracy"] == pytest.approx(2 / 4)
    assert report["mean_reward"] == pytest.approx((1.1 + 0.1 + 0.0 + 1.0) / 4)
    assert report["format_valid"] == pytest.approx(2 / 4)
    assert report["mean_tool_calls"] == pytest.approx(1 / 4)
    assert report["mean_turns"] == pytest.approx((2 + 1 + 3 + 2) / 4)
    assert report["format_errors"] == pytest.approx((0 + 0 + 2 + 1) / 4)
    assert report["finish_reasons"] == {"answer": 6, "no_answer": 2}
    replies = {
        "right": REPLIES["right"], "wrong": REPLIES["wrong"], "never": REPLIES["never"] * 3,
        "late": REPLIES["late"],
    }  # fmt: skip
    tokens = sum(sampled_tokens(tok, r) for rs in replies.values() for r in rs)
    assert report["mean_generated_tokens"] == pytest.approx(tokens / 4)
    episodes = report["episodes"]
    assert [(e["query_id"], e["rollout_index"]) for e in episodes] == [
        (q, g) for q in ("right", "wrong", "never", "late") for g in (0, 1)
    ]
    assert episodes[0] == {
        "query_id": "right", "rollout_index": 0, "answer": "NAT2", "gold": "NAT2",
        "correct": True, "reward": pytest.approx(1.1), "finish_reason": "answer",
    }  # fmt: skip
    assert [e["answer"] for e in episodes[2::2]] == ["Migraine", None, "the NAT-2"]
    assert [e["correct"] for e in episodes[::2]] == [True, False, False, True]
    json.dumps(report)  # JSON-able as it is.


def test_hierarchical_agent_delegates_to_its_sub_agent(env, tok):
    def turn(prompt):
        return prompt.count("<|im_start|>assistant") - 1

    def main_policy(prompt):
        if turn(prompt) == 0:
            return call("delegate", task="Find the gene behind slow acetylation.")
        found = prompt.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>", 1)[0]
        return f"<answer>{found}</answer>"  # What the sub-agent answered.

    def sub_policy(prompt):
        assert research.SUB_AGENT_PROMPT in prompt and "Find the gene" in prompt
        return SEARCH if turn(prompt) == 0 else "<answer>NAT2</answer>"

    main, sub = llm.ScriptedBackend(main_policy, tok), llm.ScriptedBackend(sub_policy, tok)
    kwargs = {"max_turns": 1, "sampling": SamplingParams(max_new_tokens=64)}
    report = eval_research.evaluate(
        env, main, RECORDS[:1], agent_kwargs=kwargs, sub_backend=sub, hierarchical=True
    )
    assert report["accuracy"] == 1.0 and report["format_valid"] == 1.0
    # One delegate call; with max_turns=1 the main agent's answer is its forced 2nd turn.
    assert report["mean_tool_calls"] == 1.0 and report["mean_turns"] == 2.0
    assert agents.EARLY_STOP_PROMPT in tok.decode(main.prompts[-1])
    assert sub.calls == 2
    main_replies = [call("delegate", task="Find the gene behind slow acetylation.")]
    main_replies.append("<answer>NAT2</answer>")
    sub_replies = [SEARCH, "<answer>NAT2</answer>"]
    tokens = sum(sampled_tokens(tok, r) for r in main_replies + sub_replies)
    assert report["mean_generated_tokens"] == tokens  # Main and sub-agent episodes.


def test_agent_kwargs_reach_both_agents(env):
    backend = object()
    kwargs = {"max_turns": 3, "sub_turns": 2, "max_context_tokens": 500}
    main = eval_research.make_agent(env, backend, agent_kwargs=kwargs, hierarchical=True)
    sub = main.tools[0].delegate
    assert (main.max_turns, sub.max_turns) == (3, 2)
    assert main.max_context_tokens == sub.max_context_tokens == 500
    assert sub.backend is backend and [t.name for t in sub.tools] == ["search", "read", "kg_lookup"]
    single = eval_research.make_agent(env, backend, agent_kwargs={"max_turns": 3})
    assert single.max_turns == 3 and [t.name for t in single.tools] == [
        "search",
        "read",
        "kg_lookup",
    ]
    with pytest.raises(ValueError, match="not both"):
        eval_research.make_agent(
            env, backend, agent_kwargs={"max_turns": 3, "main_turns": 4}, hierarchical=True
        )
    with pytest.raises(ValueError, match="no records"):
        eval_research.evaluate(env, backend, [])
