"""Expert trajectories for SFT: a scripted researcher that answers synthesised questions with
real tool calls against the retrieval engine (MedResearcher-R1's teacher with Masked
Trajectory Guidance, played by a program).

The expert sees the question's reasoning path and entity mapping (the cheat sheet), but it
only moves along the chain through what the tools return: it searches the anchor by name,
reads each entity's document, and takes the next entity only when the document names it
(looking its id up with `search` when the document gives the name alone), or, for a feature
reported in too many disorders to list, when a search on the feature and the hop's clues
returns it. When a hop cannot be followed it answers "unknown". Keeping the trajectories
whose answer is correct (`medjax.envs.research` scores them) is the paper's rejection filter,
and the solve rate by hop count measures whether the questions are answerable from the
corpus at all.

`ExpertResearcher` is a `TextBackend`, so the agent loop runs it like any policy.
"""

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from medjax.knowledge.graph import KnowledgeGraph
from medjax.llm.base import Generation, Message
from medjax.sampling import SamplingParams
from medjax.synthesis.qa import clue_text, hop_query


def _call(name: str, **arguments: Any) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def _mentions_id(text: str, entity: str) -> bool:
    return re.search(rf"(?<![\w:]){re.escape(entity)}(?![\w])", text) is not None


def _mentions_name(text: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None


def plan(graph: KnowledgeGraph, record: Mapping[str, Any]) -> Iterator[str]:
    """The expert's replies, one per turn; each `send(observation)` gives the tool's output."""
    mapping = record["entity_mapping"]
    anchor = mapping["Anchor"]
    lookup = record["reasoning_path"][0].get("lookup")
    if lookup is not None:  # A one-hop lookup question (`qa.synthesise_lookups`).
        target = mapping["Entity_A"]
        observation = yield (
            f"<think>One lookup of its {lookup} answers this.</think>"
            + _call("kg_lookup", entity=anchor["name"], relation=lookup)
        )
        if _mentions_id(observation, target["id"]):
            yield f"<think>It lists one.</think><answer>{target['name']}</answer>"
        else:
            yield "<think>I could not find it.</think><answer>unknown</answer>"
        return
    observation = yield (
        f"<think>Start by finding the {anchor['kind']} {anchor['name']}.</think>"
        + _call("search", query=[anchor["name"]], k=10)
    )
    if not _mentions_id(observation, anchor["id"]):
        # Short or generic names rank low in BM25: the graph knows exact names.
        relation = "diseases" if anchor["kind"] != "disease" else "genes"
        observation = yield (
            f"<think>The search missed it; look {anchor['name']} up by its exact name.</think>"
            + _call("kg_lookup", entity=anchor["name"], relation=relation)
        )
        if not _mentions_id(observation, anchor["id"]):
            yield f"<think>I could not find {anchor['name']}.</think><answer>unknown</answer>"
            return
    current, current_name = anchor["id"], anchor["name"]
    for step in record["reasoning_path"]:
        target = mapping[step["to"]]
        clues = "; ".join(clue_text(graph, c) for c in step["clues"])
        goal = f"{step['relation'].replace('_', ' ')}" + (f" ({clues})" if clues else "")
        observation = yield (
            f"<think>Read {current_name} to follow the link: {goal}.</think>"
            + _call("read", doc_id=current, goal=goal)
        )
        if _mentions_id(observation, target["id"]):
            found = True
        elif _mentions_name(observation, target["name"]):
            observation = yield (
                f"<think>{current_name} lists {target['name']}; look up its entry.</think>"
                + _call("search", query=[target["name"]])
            )
            found = _mentions_id(observation, target["id"])
        else:
            # Too many to list: search for the feature together with the clues.
            query = hop_query(graph, current_name, step["clues"])
            observation = yield (
                f"<think>{current_name} is reported in many disorders; narrow it down.</think>"
                + _call("search", query=[query], k=10)
            )
            found = _mentions_id(observation, target["id"])
        if not found:
            yield (
                f"<think>I could not follow the chain past {current_name}.</think>"
                "<answer>unknown</answer>"
            )
            return
        current, current_name = target["id"], target["name"]
    yield f"<think>The chain ends at {current_name}.</think><answer>{current_name}</answer>"


class ExpertResearcher:
    """Plays the expert for a set of question records (matched by their question text)."""

    def __init__(self, graph: KnowledgeGraph, records: Sequence[Mapping[str, Any]]):
        self.graph = graph
        self.records = {r["question"]: r for r in records}

    def reply(self, messages: Sequence[Message]) -> str:
        users = [m["content"] for m in messages if m["role"] == "user"]
        record = next((self.records[u] for u in users[:1] if u in self.records), None)
        if record is None:
            return "<answer>unknown</answer>"
        steps = plan(self.graph, record)
        reply = next(steps)
        for observation in users[1:]:  # Replay: each later user turn answered a reply.
            try:
                reply = steps.send(observation)
            except StopIteration:
                return "<answer>unknown</answer>"
        return reply

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        *,
        num_samples: int = 1,
    ) -> list[Generation]:
        out = []
        for messages in conversations:
            text = self.reply(messages)
            out.extend(Generation(text) for _ in range(num_samples))
        return out
