"""The host-side multi-turn agent loop.

Every turn batches all live episodes into one backend call, parses each reply, runs the
tools (all sub-agent episodes of the turn together, batched in their own loop), appends the
observations as user turns and stops an episode on a final answer, an end phrase ("End
Inquiry"), or its budget: when the turn or context budget is spent, the last observation
carries an early-stop prompt asking for the final answer, and one more turn without tools
is sampled (as M-GRPO's released code does).

With a `TokenBackend` the loop keeps each episode as token ids: the first prompt is the chat
template's rendering, each reply appends exactly the sampled ids, and each user turn
appends the ids of the text the chat template adds between the history so far and the next
generation prompt. So the prompt of every turn, and the trajectory the trainer reads, are
the ids the policy saw and sampled. The ids not sampled come from `tokenizer_lib.tokenize_chat`,
which encodes message content (tool output, patient replies, documents) with special tokens as
text: a `<|im_end|>` in a tool's output is characters, not the end of the turn. Where the
history ends at a special token (ChatML's `<|im_end|>`), a user turn's ids are the tail of
`tokenizer_lib.encode_chat` of the whole conversation, as SFT data has them. A template
that rewrites earlier turns (Qwen3's drops past `<think>` blocks) cannot be used this way
and raises `TemplateDriftError`.

Usage:
  agent = AgentSpec("researcher", backend, system_prompt="...", tools=[search, read])
  trajectories = run_episodes(agent, [Query("q1", "Which gene ...?")], num_rollouts=8)
"""

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from medjax.agents import tools as tools_lib
from medjax.agents.trajectory import Trajectory, Turn
from medjax.llm.base import Message, TextBackend, TokenBackend
from medjax.models import tokenizer as tokenizer_lib
from medjax.sampling import SamplingParams

# One INFO line per turn ("researcher turn 3: 12/17 episodes finished, 41 s"): progress of
# long evaluations and rollouts; run_train.py shows it, a library user opts in with logging.
log = logging.getLogger("medjax.agents")

EARLY_STOP_PROMPT = (
    "You have used up the turns or tokens for this task. Do not call any more tools: give"
    " your final answer now, inside <answer></answer>."
)
NO_ACTION_ERROR = "Call one tool or give your final answer inside <answer></answer>."
NO_ANSWER_SUMMARY = "The sub-agent finished without an answer."
SUMMARISER_PROMPT = (
    "Summarise what the research sub-agent below found, as a short factual answer to its"
    " task. Keep names, numbers and sources; add nothing."
)
# Room kept for the chat template's tokens around a user turn (ChatML needs 6).
_FRAMING_TOKENS = 16
# Each turn stops after the first of these (one tool call per turn).
TURN_STOPS = ("</tool_call>", "</answer>")


class TemplateDriftError(ValueError):
    """The chat template rendered the history differently from the ids already sampled."""


@dataclasses.dataclass(frozen=True)
class Query:
    """A task for an agent.

    Attributes:
      id: a unique id (links rollouts, sub-agent episodes and rewards).
      prompt: the first user message, or a whole list of messages after the system prompt.
      metadata: carried into every trajectory (ground truth, case id, ...).
      stream: names the query's random draws (default: `id`): a backend that takes streams
        (`JaxPolicyBackend`) samples rollout g's turn t from a key of (stream, g, t) alone,
        so an episode's tokens do not depend on which episodes share its batch.
    """

    id: str
    prompt: str | Sequence[Message]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    stream: str = ""


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """One agent: a backend, its prompt, tools and budgets.

    Attributes:
      name: recorded in its trajectories.
      backend: a TextBackend; a TokenBackend keeps exact token ids for training.
      system_prompt: first message; the tools' descriptions are appended to it.
      tools: `tools_lib.Tool`s, including `delegate_tool(sub_agent)` for a hierarchy.
      sampling: per-turn sampling; the loop adds the turn stops (`</tool_call>`,
        `</answer>`, `end_phrases`) and, for token backends, the tokenizer's EOS id.
      max_turns: policy turns before the early-stop prompt forces a final one.
      max_context_tokens: token backends: the longest an episode may grow (prompt, replies
        and observations). A normal turn keeps room for the early-stop prompt and a final
        turn of `final_turn_tokens`; once an observation would eat into that room the
        early-stop prompt follows it (or replaces it, where both do not fit). None: no limit.
      final_turn_tokens: the new-token budget of the forced final turn (also reserved).
      early_stop_prompt: appended to the last observation when the budget is spent.
      end_phrases: text that ends the episode ("End Inquiry" for the dialogue doctor).
      answer_after_end: after an end phrase, ask for the final answer with the early-stop
        prompt (the dialogue doctor's diagnosis) instead of ending at once.
      responder: for dialogue agents: given the trajectories of the episodes whose reply
        neither calls a tool nor answers, returns the user's reply to each (the patient).
        Without one such a reply is a format error.
    """

    name: str
    backend: TextBackend
    system_prompt: str = ""
    tools: Sequence[tools_lib.Tool] = ()
    sampling: SamplingParams = dataclasses.field(
        default_factory=lambda: SamplingParams(max_new_tokens=512)
    )
    max_turns: int = 8
    max_context_tokens: int | None = None
    final_turn_tokens: int = 256
    early_stop_prompt: str = EARLY_STOP_PROMPT
    end_phrases: tuple[str, ...] = ()
    answer_after_end: bool = False
    responder: Callable[[list[Trajectory]], list[str]] | None = None

    def __post_init__(self):
        if self.max_turns < 1:
            raise ValueError(f"AgentSpec {self.name!r}: max_turns must be >= 1.")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"AgentSpec {self.name!r}: tool names repeat: {names}.")


@dataclasses.dataclass
class _Episode:
    traj: Trajectory
    text: str = ""  # The rendered text of `traj.token_ids` (token mode).
    forced: bool = False  # The next turn answers the early-stop prompt.
    done: bool = False
    observation: str | None = None  # The user turn to append after this turn.
    end_requested: bool = False  # An end phrase was said: the final answer comes next.
    stream: str = ""  # Its query's `stream`.


def _stream(*parts) -> int:
    """A 32-bit stream id of `parts`, the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def system_prompt(agent: AgentSpec) -> str:
    """The agent's first message as the loop sends it: its prompt and its tools."""
    return "\n\n".join(p for p in (agent.system_prompt, tools_lib.render_tools(agent.tools)) if p)


def _turn_params(agent: AgentSpec, tokenizer) -> SamplingParams:
    extra = tuple(s for s in TURN_STOPS + agent.end_phrases if s not in agent.sampling.stop_strings)
    params = dataclasses.replace(agent.sampling, stop_strings=agent.sampling.stop_strings + extra)
    return params.ending_at(None if tokenizer is None else tokenizer.eos_token_id)


class _Runner:
    """The state of one `run_episodes` call: episodes of one agent, turn by turn."""

    def __init__(self, agent: AgentSpec, queries: Sequence[Query], num_rollouts: int):
        self.agent = agent
        self.token_mode = isinstance(agent.backend, TokenBackend)
        self.tokenizer = agent.backend.tokenizer if self.token_mode else None
        self.params = _turn_params(agent, self.tokenizer)
        self.tools = {t.name: t for t in agent.tools}
        self.num_rollouts = num_rollouts
        self.episodes: list[_Episode] = []
        # What a normal turn leaves free: the early-stop prompt, the chat template's framing
        # around it, and the final turn.
        self._reserve = agent.final_turn_tokens
        if self.token_mode:
            early = self.tokenizer.encode(agent.early_stop_prompt, add_special_tokens=False)
            self._reserve += len(early) + _FRAMING_TOKENS
        system = system_prompt(agent)
        for q in queries:
            head = [{"role": "system", "content": system}] if system else []
            if isinstance(q.prompt, str):
                head.append({"role": "user", "content": q.prompt})
            else:
                head.extend(dict(m) for m in q.prompt)
            for g in range(num_rollouts):
                traj = Trajectory(
                    query_id=q.id, rollout_index=g, agent=agent.name,
                    messages=[dict(m) for m in head], metadata=dict(q.metadata),
                )  # fmt: skip
                ep = _Episode(traj, stream=q.stream or q.id)
                if self.token_mode:
                    chat = tokenizer_lib.tokenize_chat(self.tokenizer, head)
                    ep.text, ids = chat.text, chat.ids
                    traj.token_ids, traj.loss_mask = ids, [0] * len(ids)
                    traj.logps = [0.0] * len(ids)
                self.episodes.append(ep)

    # -- budgets ------------------------------------------------------------------------

    def _room(self, ep: _Episode) -> int | None:
        limit = self.agent.max_context_tokens
        return None if limit is None or not self.token_mode else limit - len(ep.traj.token_ids)

    def _turn_budget(self, ep: _Episode) -> int:
        room = self._room(ep)
        if ep.forced:
            cap = min(self.agent.final_turn_tokens, self.params.max_new_tokens)
            return cap if room is None else min(cap, room)
        cap = self.params.max_new_tokens
        return cap if room is None else min(cap, room - self._reserve)

    # -- one turn -------------------------------------------------------------------------

    def _sample(self, live: list[_Episode], first: bool):
        backend, params = self.agent.backend, self.params
        budgets = [self._turn_budget(e) for e in live]
        share = first and self.num_rollouts > 1  # All G rollouts of a query share turn 0.
        group = self.num_rollouts if share else 1
        heads = live[::group]
        seeded = {}
        if getattr(backend, "takes_streams", False):
            # Turn 0 of a group: sample g of the head's stream is rollout g.
            seeded["streams"] = [
                _stream(e.stream) if share else
                _stream(e.stream, e.traj.rollout_index, len(e.traj.turns))
                for e in heads
            ]  # fmt: skip
        start = time.perf_counter()
        if self.token_mode:
            gens = backend.generate_ids(
                [e.traj.token_ids for e in heads], params, num_samples=group,
                max_new_tokens=budgets[::group], **seeded,
            )  # fmt: skip
        else:
            gens = backend.generate(
                [e.traj.messages for e in heads], params, num_samples=group, **seeded
            )
        if len(gens) != len(live):
            raise RuntimeError(
                f"agent {self.agent.name!r}: the backend returned {len(gens)} replies for"
                f" {len(live)} episodes."
            )
        return gens, time.perf_counter() - start

    def _append_reply(self, ep: _Episode, gen) -> None:
        traj = ep.traj
        # A text backend (e.g. JSON over HTTP) can return lone surrogates, which no file or
        # tokenizer takes; the parser still sees the raw text and refuses them in a call.
        traj.messages.append({"role": "assistant", "content": tools_lib.encodable(gen.text)})
        if self.token_mode:
            n = len(gen.token_ids)
            traj.token_ids.extend(gen.token_ids)
            traj.loss_mask.extend([1] * n)
            traj.logps.extend(gen.logps if gen.logps is not None else [0.0] * n)
            ep.text += self.tokenizer.decode(gen.token_ids, skip_special_tokens=False)

    def _append_user(self, ep: _Episode, content: str) -> None:
        traj = ep.traj
        traj.messages.append({"role": "user", "content": content})
        if self.token_mode:
            chat = self._tail(ep, traj.messages)
            traj.token_ids.extend(chat.ids)
            traj.loss_mask.extend([0] * len(chat.ids))
            traj.logps.extend([0.0] * len(chat.ids))
            ep.text = chat.text

    def _tail(self, ep: _Episode, messages: list[Message]) -> tokenizer_lib.ChatTokens:
        """The chat rendered with the next generation prompt; its ids are those of the text
        after the history the episode already holds the ids of."""
        try:
            return tokenizer_lib.tokenize_chat(self.tokenizer, messages, prefix=ep.text)
        except tokenizer_lib.ChatPrefixError:
            raise TemplateDriftError(
                f"agent {self.agent.name!r}, query {ep.traj.query_id!r}: the chat template"
                " renders the history differently from the ids sampled so far (does it"
                " rewrite past assistant turns?); token trajectories need a template that"
                " only appends."
            ) from None

    def _finish(self, ep: _Episode, reason: str, answer: str | None = None) -> None:
        ep.done, ep.traj.finish_reason, ep.traj.answer = True, reason, answer

    def _observe(self, ep: _Episode) -> None:
        """Appends the turn's observation, with the early-stop prompt when the budget is
        spent; ends the episode where not even a final turn would fit."""
        turn = ep.traj.turns[-1]
        content, ep.observation = ep.observation, None
        if content is not None:
            # A tool's, patient's or sub-agent's text may hold lone surrogates, which neither
            # the tokenizer nor `write_jsonl` can encode.
            content = tools_lib.encodable(content)
        if ep.end_requested:  # The episode ended itself: only the answer is left.
            content = self.agent.early_stop_prompt
            if self._room(ep) is not None and self._room(ep) - len(self._user_ids(ep, content)) < 1:
                self._finish(ep, "context")
                return
            ep.forced = True
            turn.observation = content
            self._append_user(ep, content)
            return
        forced = f"{content}\n\n{self.agent.early_stop_prompt}"
        spent = len(ep.traj.turns) >= self.agent.max_turns
        room = self._room(ep)
        if not spent and room is not None:
            # Another normal turn only while it keeps its reserve after this observation.
            spent = room - len(self._user_ids(ep, content)) - self._reserve < 1
        if spent:
            content = forced
            if room is not None and room - len(self._user_ids(ep, content)) < 1:
                # No room for the observation: the early-stop prompt alone, if it fits.
                content = self.agent.early_stop_prompt
                if room - len(self._user_ids(ep, content)) < 1:
                    self._finish(ep, "context")
                    return
            ep.forced = True
        turn.observation = content
        self._append_user(ep, content)

    def _user_ids(self, ep: _Episode, content: str) -> list[int]:
        return self._tail(ep, [*ep.traj.messages, {"role": "user", "content": content}]).ids

    def run(self) -> list[Trajectory]:
        first, turn_index, run_start = True, 0, time.perf_counter()
        while live := [e for e in self.episodes if not e.done]:
            for ep in live:  # Only a prompt longer than the context gets here without room.
                if self._turn_budget(ep) < 1:
                    self._finish(ep, "context")
            if not (live := [e for e in live if not e.done]):
                break
            gens, backend_s = self._sample(live, first)
            first = False
            delegated: dict[str, list[tuple[_Episode, dict]]] = {}
            responding: list[_Episode] = []
            for ep, gen in zip(live, gens, strict=True):
                self._append_reply(ep, gen)
                turn = Turn(
                    reply=tools_lib.encodable(gen.text), num_tokens=len(gen.token_ids),
                    finish_reason=gen.finish_reason,
                    forced_final=ep.forced, backend_s=backend_s,
                )  # fmt: skip
                ep.traj.turns.append(turn)
                parsed = tools_lib.parse_reply(gen.text, () if ep.forced else self.agent.tools)
                turn.tool, turn.arguments = parsed.tool, parsed.arguments
                if parsed.answer is not None and parsed.error is None:
                    self._finish(ep, "answer", parsed.answer)
                elif ep.forced:  # A tool call here ignores the early-stop prompt: an error.
                    if parsed.error is not None:
                        turn.error = parsed.error
                        ep.traj.format_errors += 1
                    self._finish(ep, "no_answer")
                elif any(p in gen.text for p in self.agent.end_phrases):
                    if self.agent.answer_after_end:
                        ep.end_requested = True
                    else:
                        self._finish(ep, "end_phrase")
                elif parsed.error is not None:
                    self._error(ep, parsed.error)
                elif parsed.tool is not None:
                    tool = self.tools[parsed.tool]
                    if tool.delegate is not None:
                        delegated.setdefault(tool.name, []).append((ep, parsed.arguments))
                    else:
                        tool_start = time.perf_counter()
                        output, error = tools_lib.run_tool(tool, parsed.arguments)
                        turn.tool_s = time.perf_counter() - tool_start
                        if error is not None:
                            self._error(ep, error)
                        else:
                            ep.observation = _tool_response(output)
                elif self.agent.responder is not None:
                    responding.append(ep)
                else:
                    self._error(ep, NO_ACTION_ERROR)
            for name, calls in delegated.items():
                self._delegate(self.tools[name], calls)
            if responding:
                replies = self.agent.responder([e.traj for e in responding])
                if len(replies) != len(responding):
                    raise RuntimeError(
                        f"agent {self.agent.name!r}: the responder returned {len(replies)}"
                        f" replies for {len(responding)} episodes."
                    )
                for ep, reply in zip(responding, replies, strict=True):
                    ep.observation = reply
            for ep in live:
                if not ep.done:
                    self._observe(ep)
            turn_index += 1
            if log.isEnabledFor(logging.INFO):
                done = sum(e.done for e in self.episodes)
                log.info(
                    "%s turn %d: %d/%d episodes finished, %.0f s", self.agent.name, turn_index,
                    done, len(self.episodes), time.perf_counter() - run_start,
                )  # fmt: skip
        return [e.traj for e in self.episodes]

    def _error(self, ep: _Episode, message: str) -> None:
        ep.traj.turns[-1].error = message
        ep.traj.format_errors += 1
        ep.observation = _tool_response(f"Error: {message}")

    def _delegate(self, tool: tools_lib.Tool, calls: list[tuple[_Episode, dict]]) -> None:
        """Runs the sub-agent episodes of every `tool` call of this turn in one batch."""
        requests = []
        for ep, args in calls:
            requests.append(tools_lib.Delegation(
                query_id=ep.traj.query_id, rollout_index=ep.traj.rollout_index,
                invocation_index=len(ep.traj.sub_trajectories), task=args["task"],
                context=args.get("context") or "",
            ))  # fmt: skip
        if not isinstance(tool.delegate, AgentSpec):
            self._delegate_remote(tool, calls, requests)
            return
        queries = [
            Query(
                ep.traj.query_id, r.prompt, dict(ep.traj.metadata),
                stream=f"{ep.stream}/{r.rollout_index}/{r.invocation_index}",
            )
            for (ep, _), r in zip(calls, requests, strict=True)
        ]  # fmt: skip
        start = time.perf_counter()
        subs = run_episodes(tool.delegate, queries)
        summaries = [s.answer if s.answer is not None else NO_ANSWER_SUMMARY for s in subs]
        if tool.summariser is not None:
            chats = [
                [
                    {"role": "system", "content": SUMMARISER_PROMPT},
                    {"role": "user", "content": _transcript(q, s)},
                ]
                for q, s in zip(queries, subs, strict=True)
            ]
            summary_params = dataclasses.replace(self.params, stop_strings=(), eos_ids=())
            if isinstance(tool.summariser, TokenBackend):
                summary_params = dataclasses.replace(
                    summary_params, eos_ids=(tool.summariser.tokenizer.eos_token_id,)
                )
            summaries = [g.text for g in tool.summariser.generate(chats, summary_params)]
        elapsed = time.perf_counter() - start
        for (ep, _), sub, summary in zip(calls, subs, summaries, strict=True):
            sub.rollout_index = ep.traj.rollout_index
            sub.invocation_index = len(ep.traj.sub_trajectories)
            ep.traj.sub_trajectories.append(sub)
            ep.traj.turns[-1].tool_s = elapsed
            ep.observation = _tool_response(summary)

    def _delegate_remote(
        self, tool: tools_lib.Tool, calls: list[tuple[_Episode, dict]],
        requests: list[tools_lib.Delegation],
    ) -> None:  # fmt: skip
        """Hands this turn's calls to a remote sub-agent (`tools_lib.remote_delegate_tool`).
        A call the sub-agent could not serve becomes an error observation counted in
        `tool_failures`, not a format error: the policy did nothing wrong."""
        start = time.perf_counter()
        results = tool.delegate(requests)
        elapsed = time.perf_counter() - start
        if len(results) != len(calls):
            raise RuntimeError(
                f"tool {tool.name!r}: the remote sub-agent returned {len(results)} results for"
                f" {len(calls)} calls."
            )
        for (ep, _), request, result in zip(calls, requests, results, strict=True):
            turn = ep.traj.turns[-1]
            turn.tool_s = elapsed
            if result.error is not None:
                turn.error = result.error
                ep.traj.tool_failures += 1
                ep.observation = _tool_response(f"Error: {result.error}")
                continue
            sub = result.trajectory
            sub.rollout_index, sub.invocation_index = (
                ep.traj.rollout_index,
                request.invocation_index,
            )
            ep.traj.sub_trajectories.append(sub)
            summary = result.summary if result.summary is not None else NO_ANSWER_SUMMARY
            ep.observation = _tool_response(summary)


def _tool_response(text: str) -> str:
    return f"<tool_response>\n{text}\n</tool_response>"


def _transcript(query: Query, sub: Trajectory) -> str:
    lines = [f"Task: {query.prompt}"]
    for turn in sub.turns:
        lines.append(f"Sub-agent: {turn.reply}")
        if turn.observation:
            lines.append(f"Observation: {turn.observation}")
    return "\n\n".join(lines)


def run_episodes(
    agent: AgentSpec, queries: Sequence[Query], *, num_rollouts: int = 1
) -> list[Trajectory]:
    """Runs `num_rollouts` episodes of `agent` per query, all batched turn by turn.

    Returns:
      Trajectories, query-major: entries q*G .. q*G+G-1 are query q's rollouts.
    """
    if num_rollouts < 1:
        raise ValueError(f"run_episodes: num_rollouts must be >= 1, got {num_rollouts}.")
    if not queries:
        return []
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids) and num_rollouts > 1:
        raise ValueError("run_episodes: query ids repeat; rollouts could not be told apart.")
    return _Runner(agent, queries, num_rollouts).run()
