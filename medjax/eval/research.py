"""Research-QA evaluation: the researcher agent on held-out questions, scored with the
training reward (`medjax.envs.research.score`), so that numbers before and after training
compare directly with the rewards the trainer logs.

    env = research.build_environment()
    report = eval_research.evaluate(env, backend, records, num_rollouts=4)
    report["accuracy"], report["finish_reasons"], report["episodes"][0]

Means are over episodes (questions x rollouts), so with `num_rollouts` > 1 `accuracy` is the
expected single-sample accuracy (mean@k), not pass@k. Token counts come from the backend's
sampled ids: a backend that exposes none (an OpenAI-compatible endpoint) reports 0.
"""

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from medjax import agents
from medjax.envs import research

# `hierarchical_agents`' own keywords; every other agent keyword is an `AgentSpec` field.
_HIERARCHY_KEYS = ("summariser", "main_turns", "sub_turns")


def make_agent(
    env: research.ResearchEnvironment,
    backend,
    *,
    agent_kwargs: Mapping[str, Any] | None = None,
    sub_backend=None,
    hierarchical: bool = False,
) -> agents.AgentSpec:
    """The agent `evaluate` runs.

    Args:
      env: the research environment (tools).
      backend: the policy (a TextBackend; a TokenBackend also reports token counts).
      agent_kwargs: single agent: `researcher_agent`'s keywords (`max_turns` and any
        `AgentSpec` field: `sampling`, `max_context_tokens`, `final_turn_tokens`, ...).
        Hierarchical: `summariser`, `main_turns` and `sub_turns` go to `hierarchical_agents`;
        `max_turns` is taken as `main_turns` (the main agent's budget; giving both is an
        error); every other `AgentSpec` field is set on both the main agent and its sub-agent.
      sub_backend: the sub-agent's policy (hierarchical only); defaults to `backend`.
      hierarchical: M-GRPO's split: the main agent only delegates, the sub-agent searches.

    Raises:
      ValueError: `max_turns` and `main_turns` both given.
      TypeError: a keyword that is not an `AgentSpec` field.
    """
    kwargs = dict(agent_kwargs or {})
    if not hierarchical:
        return research.researcher_agent(env, backend, **kwargs)
    split = {k: kwargs.pop(k) for k in _HIERARCHY_KEYS if k in kwargs}
    if "max_turns" in kwargs:
        if "main_turns" in split:
            raise ValueError(
                "eval.research: give max_turns or main_turns for a hierarchical agent, not both."
            )
        split["main_turns"] = kwargs.pop("max_turns")
    main = research.hierarchical_agents(env, backend, sub_backend or backend, **split)
    if not kwargs:
        return main
    (delegate,) = main.tools
    sub = dataclasses.replace(delegate.delegate, **kwargs)
    return dataclasses.replace(main, tools=[dataclasses.replace(delegate, delegate=sub)], **kwargs)


def _generated_tokens(trajectory: agents.Trajectory) -> int:
    """Tokens the policy sampled in an episode and in the sub-agent episodes it launched."""
    own = sum(t.num_tokens for t in trajectory.turns)
    return own + sum(_generated_tokens(s) for s in trajectory.sub_trajectories)


def evaluate(
    env: research.ResearchEnvironment,
    backend,
    records: Sequence[Mapping[str, Any]],
    *,
    num_rollouts: int = 1,
    reward_config: research.RewardConfig = research.RewardConfig(),  # noqa: B008 (frozen)
    agent_kwargs: Mapping[str, Any] | None = None,
    sub_backend=None,
    hierarchical: bool = False,
) -> dict[str, Any]:
    """Runs the researcher on every record's question and scores each episode.

    The agent is `research.researcher_agent(env, backend, **agent_kwargs)`, or with
    `hierarchical` `research.hierarchical_agents(env, backend, sub_backend or backend, ...)`
    (see `make_agent` for how `agent_kwargs` reach it). All episodes run batched turn by
    turn in one `agents.run_episodes` call.

    Args:
      env: the research environment (tools).
      backend: the policy.
      records: questions in the `qa.QARecord` schema (`med_kg_qa.to_record`): `id`,
        `question` and `answer` (`name`, `aliases`); ids unique when `num_rollouts` > 1.
      num_rollouts: episodes per question.
      reward_config: the reward's weights (`research.score`).
      agent_kwargs: the agent's keywords (`make_agent`).
      sub_backend: the sub-agent's policy (hierarchical only); defaults to `backend`.
      hierarchical: evaluate M-GRPO's main/sub-agent split.

    Returns:
      A JSON-serialisable dict. Means over all episodes: `accuracy` (share correct),
      `mean_reward` (the composite reward), `format_valid`, `mean_tool_calls` (the main
      agent's, as the reward counts them), `mean_turns` (main agent policy turns, the
      forced final one included), `mean_generated_tokens` (main and sub-agent episodes),
      `format_errors` (per episode). Counts: `num_questions`, `num_episodes`,
      `finish_reasons` ({reason: episodes}). `episodes`: one dict per episode, query-major
      (`query_id`, `rollout_index`, `answer`, `gold` (the answer's name), `correct`,
      `reward`, `finish_reason`).

    Raises:
      ValueError: no records, or `num_rollouts` < 1.
    """
    agent = make_agent(
        env, backend, agent_kwargs=agent_kwargs, sub_backend=sub_backend, hierarchical=hierarchical
    )
    return evaluate_agent(agent, records, num_rollouts=num_rollouts, reward_config=reward_config)


def evaluate_agent(
    agent: agents.AgentSpec,
    records: Sequence[Mapping[str, Any]],
    *,
    num_rollouts: int = 1,
    reward_config: research.RewardConfig = research.RewardConfig(),  # noqa: B008 (frozen)
) -> dict[str, Any]:
    """`evaluate` with a ready agent (the trainer's, with its budgets and tool set)."""
    if not records:
        raise ValueError("eval.research.evaluate: no records to evaluate.")
    trajectories = agents.run_episodes(agent, research.queries(records), num_rollouts=num_rollouts)
    episodes, terms = [], []
    for i, t in enumerate(trajectories):
        record = records[i // num_rollouts]  # Query-major: rollouts of a record are adjacent.
        term = research.score(t, record, reward_config)
        terms.append(term)
        episodes.append(
            {
                "query_id": t.query_id,
                "rollout_index": t.rollout_index,
                "answer": t.answer,
                "gold": record["answer"]["name"],
                "correct": bool(term.correct),
                "reward": term.total,
                "finish_reason": t.finish_reason,
            }
        )
    n = len(trajectories)

    def mean(values) -> float:
        return float(sum(values)) / n

    return {
        "accuracy": mean(x.correct for x in terms),
        "mean_reward": mean(x.total for x in terms),
        "format_valid": mean(x.format_valid for x in terms),
        "answered": mean(t.finish_reason == "answer" for t in trajectories),
        "mean_tool_calls": mean(x.tool_calls for x in terms),
        "mean_turns": mean(len(t.turns) for t in trajectories),
        "mean_generated_tokens": mean(_generated_tokens(t) for t in trajectories),
        "num_questions": len(records),
        "num_episodes": n,
        "finish_reasons": dict(collections.Counter(t.finish_reason for t in trajectories)),
        "format_errors": mean(t.format_errors for t in trajectories),
        "episodes": episodes,
    }
