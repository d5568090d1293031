"""The MedResearcher environment: a synthesised multi-hop question, the private retrieval
engine as tools, a final `<answer>`, and a composite reward.

    env = research.build_environment()           # graph, corpus, BM25 index (cached)
    agent = research.researcher_agent(env, backend)
    trajs = agents.run_episodes(agent, research.queries(records), num_rollouts=8)
    rewards = [research.score(t, record) for t, record in zip(trajs, repeated_records)]

Reward (medical_notes.md 2.5; the paper's exact weights are unpublished):

    r = correct + format_weight * format_valid - call_penalty * max(0, tool_calls - call_budget)
        [+ answer_weight * answered - error_penalty * format_errors: shaping, off by default]

- `correct`: 1 when the normalised answer equals the normalised name or an alias of the
  answer entity (lower case, punctuation, articles and extra spaces removed); otherwise, when a
  `judge` backend is given, 1 when it replies "Correct" (the MedResearcher evaluator's
  fallback after exact match).
- `format_valid`: 1 when the episode ended with an `<answer>` and no turn had a format error.
- the call penalty charges tool calls beyond the budget (the paper's efficiency term).
Every term is returned separately (`RewardTerms`) so that trainers log them one by one.
Weights live in `RewardConfig`, which `gin/envs/research.gin` binds.

For M-GRPO, `hierarchical_agents` gives the main agent only `delegate` and its sub-agent
`search`/`read`/`kg_lookup`.
"""

import dataclasses
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from medjax import agents
from medjax.envs import tools as tools_lib
from medjax.knowledge import corpus as corpus_lib
from medjax.knowledge import graph as graph_lib
from medjax.knowledge import hpo, retrieval
from medjax.llm.base import TextBackend
from medjax.sampling import SamplingParams
from medjax.synthesis.expert import ExpertResearcher
from medjax.synthesis.qa import hop_query

SYSTEM_PROMPT = (
    "You are a medical research assistant. Answer the question by searching and reading the"
    " medical knowledge base; verify every step with the tools before you answer."
)
SUB_AGENT_PROMPT = (
    "You are a research sub-agent. Use the tools to find out what the task asks and answer"
    " briefly inside <answer></answer>."
)
# Bump when `medjax.knowledge.corpus` writes different documents.
CORPUS_VERSION = 1
JUDGE_PROMPT = (
    "Judge whether the response answers the question correctly, given the correct answer."
    " Reply with exactly one word: Correct or Incorrect."
)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Weights of the composite reward (see the module docstring).

    `answer_weight` and `error_penalty` are shaping terms for small policies, 0 (off) in the
    papers' reward: `answer_weight` pays for ending with an `<answer>` even after format
    errors, and `error_penalty` charges each format or tool error. A policy trained from
    scratch makes errors in nearly every episode, so the binary format term alone gives it
    no signal to learn from.
    """

    format_weight: float = 0.1
    call_penalty: float = 0.05
    call_budget: int = 10
    answer_weight: float = 0.0
    error_penalty: float = 0.0


@dataclasses.dataclass(frozen=True)
class RewardTerms:
    correct: float
    format_valid: float
    tool_calls: int
    excess_calls: int
    total: float
    answered: float = 0.0
    format_errors: int = 0


# The names of `ResearchEnvironment.tools()`, in order.
TOOL_NAMES = ("search", "read", "kg_lookup")


@dataclasses.dataclass
class ResearchEnvironment:
    graph: graph_lib.KnowledgeGraph
    index: retrieval.BM25Index

    def tools(self) -> list[agents.Tool]:
        return [
            tools_lib.search_tool(self.index),
            tools_lib.read_tool(self.index),
            tools_lib.kg_lookup_tool(self.graph),
        ]


def build_environment(
    graph: graph_lib.KnowledgeGraph | None = None, *, cache: str | None = None
) -> ResearchEnvironment:
    """The graph, its corpus and a BM25 index, cached under the HPO release's hash."""
    graph = graph_lib.KnowledgeGraph(hpo.load()) if graph is None else graph
    root = hpo.cache_dir() if cache is None else cache
    key = f"{graph.data.source_hash[:20]}-corpus{CORPUS_VERSION}"
    # The corpus (~12,700 documents, seconds to write) is built only when the index is.
    index = retrieval.BM25Index.cached(
        lambda: corpus_lib.build_corpus(graph), f"{root}/bm25-{key}", key=key
    )
    return ResearchEnvironment(graph, index)


def normalise(text: str) -> str:
    """Lower case without punctuation, articles or extra whitespace (SQuAD's rule)."""
    text = text.lower()
    text = "".join(" " if c in string.punctuation else c for c in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(answer: str | None, aliases: Sequence[str]) -> bool:
    return answer is not None and normalise(answer) in {normalise(a) for a in aliases}


def score(
    trajectory: agents.Trajectory,
    record: Mapping[str, Any],
    config: RewardConfig = RewardConfig(),
    *,
    judge: TextBackend | None = None,
) -> RewardTerms:
    """The composite reward of one episode for its question record."""
    aliases = record["answer"]["aliases"]
    correct = exact_match(trajectory.answer, aliases)
    if not correct and judge is not None and trajectory.answer is not None:
        chat = [
            {"role": "system", "content": JUDGE_PROMPT},
            {
                "role": "user",
                "content": f"Question: {record['question']}\nCorrect answer:"
                f" {record['answer']['name']}\nResponse: {trajectory.answer}",
            },
        ]
        params = SamplingParams(max_new_tokens=8, greedy=True)
        verdict = judge.generate([chat], params)[0].text.strip().lower()
        correct = verdict.startswith("correct")
    format_valid = trajectory.finish_reason == "answer" and trajectory.format_errors == 0
    calls = sum(t.tool is not None for t in trajectory.turns)
    excess = max(0, calls - config.call_budget)
    answered = trajectory.finish_reason == "answer"
    total = (
        float(correct)
        + config.format_weight * format_valid
        - config.call_penalty * excess
        + config.answer_weight * answered
        - config.error_penalty * trajectory.format_errors
    )
    return RewardTerms(
        float(correct), float(format_valid), calls, excess, total, float(answered),
        trajectory.format_errors,
    )  # fmt: skip


def queries(records: Sequence[Mapping[str, Any]]) -> list[agents.Query]:
    return [agents.Query(r["id"], r["question"], {"answer": r["answer"]}) for r in records]


def researcher_agent(
    env: ResearchEnvironment, backend: TextBackend, *, max_turns: int = 12, **spec: Any
) -> agents.AgentSpec:
    """A single researcher with `search`, `read` and `kg_lookup`."""
    return agents.AgentSpec(
        "researcher", backend, system_prompt=SYSTEM_PROMPT, tools=env.tools(),
        max_turns=max_turns, **spec,
    )  # fmt: skip


def hierarchical_agents(
    env: ResearchEnvironment,
    main_backend: TextBackend,
    sub_backend: TextBackend,
    *,
    summariser: TextBackend | None = None,
    main_turns: int = 8,
    sub_turns: int = 6,
) -> agents.AgentSpec:
    """M-GRPO's split: the main agent delegates, the sub-agent searches and reads."""
    sub = agents.AgentSpec(
        "searcher", sub_backend, system_prompt=SUB_AGENT_PROMPT, tools=env.tools(),
        max_turns=sub_turns,
    )  # fmt: skip
    return agents.AgentSpec(
        "main", main_backend, system_prompt=SYSTEM_PROMPT,
        tools=[agents.delegate_tool(sub, summariser=summariser)], max_turns=main_turns,
    )  # fmt: skip


def expert_trajectories(
    env: ResearchEnvironment, records: Sequence[Mapping[str, Any]], *, max_turns: int = 30
) -> list[agents.Trajectory]:
    """Runs the scripted expert on every record and keeps the correct, well-formed episodes
    (the paper's rejection filter), in record order."""
    agent = researcher_agent(env, ExpertResearcher(env.graph, records), max_turns=max_turns)
    trajectories = agents.run_episodes(agent, queries(records))
    return [
        t for t, r in zip(trajectories, records, strict=True)
        if score(t, r).correct == 1.0 and t.format_errors == 0
    ]  # fmt: skip


def hop_queries(
    graph: graph_lib.KnowledgeGraph, record: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """(query, gold doc id) per hop: what a researcher who knows the previous entity would
    search: its name and the hop's clues."""
    mapping = record["entity_mapping"]
    out, previous = [], mapping["Anchor"]
    for step in record["reasoning_path"]:
        target = mapping[step["to"]]
        out.append((hop_query(graph, previous["name"], step["clues"]), target["id"]))
        previous = target
    return out


def hop_recall(env: ResearchEnvironment, records: Sequence[Mapping[str, Any]], k: int = 10):
    """Recall@k of the gold document over every hop of `records` (`hop_queries`), overall and
    by relation."""
    pairs, relations = [], []
    for r in records:
        for (query, gold), step in zip(hop_queries(env.graph, r), r["reasoning_path"], strict=True):
            pairs.append((query, gold))
            relations.append(f"{step['relation']}{'^-1' if step['reverse'] else ''}")
    hits = env.index.search([q for q, _ in pairs], k)
    found = [any(h.doc_id == gold for h in hs) for (_, gold), hs in zip(pairs, hits, strict=True)]
    by_relation: dict[str, list[bool]] = {}
    for rel, f in zip(relations, found, strict=True):
        by_relation.setdefault(rel, []).append(f)
    return {
        "recall": sum(found) / max(len(found), 1),
        "hops": len(found),
        "by_relation": {r: sum(v) / len(v) for r, v in sorted(by_relation.items())},
    }
