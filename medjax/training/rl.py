"""From rollouts to training batches: rewards, advantages and rows for each RL algorithm.

    trajs = rollout(task, env, backend, records, num_generations=G)
    batch, stats = grpo_batch(trajs, records, G, task.reward)      # GRPO family
    batch, stats = grao_batch(trajs, records, references, ...)      # GRAO (+ expert answers)
    main, sub, stats = mgrpo_batches(trajs, records, K, d, key)     # M-GRPO, both agents

Every batch is a dict of numpy arrays, rows prompt-major, padded to a power-of-two width
(bounded compiles). `stats` are the per-step scalars the trainer logs: reward mean/std and
each reward term, advantages, response lengths, turns, tool calls, format errors and
finish reasons.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from medjax import agents, losses
from medjax.agents import tools as tools_lib
from medjax.envs import research
from medjax.sampling import SamplingParams
from medjax.training import data as data_lib


@dataclasses.dataclass(frozen=True)
class ResearchTask:
    """The MedResearcher task as the trainer runs it: data, agent budgets and reward.

    Attributes:
      dataset: the `med_kg_qa` config the questions come from ("med_kg_qa/tiny"); expert
        chats come from `med_kg_qa_trajectories` with the same config.
      data_dir: the TFDS folder (built there on first use); None: TFDS's default.
      eval_split: held-out questions for evaluation ("validation" or "test").
      num_eval_questions: evaluate on the first N of them (None: all).
      max_turns: policy turns before the forced final turn (main agent for M-GRPO).
      sub_turns: the sub-agent's turn budget (M-GRPO).
      max_new_tokens: tokens per turn.
      final_turn_tokens: tokens of the forced final turn.
      max_context_tokens: the longest an episode may grow (None: unlimited).
      max_observation_chars: tool responses cut to this many characters, in rollouts and
        in the SFT chats alike (small-context policies); None: whole.
      temperature: sampling temperature of rollouts (log-probs are taken at it).
      top_p: nucleus sampling of rollouts.
      reward: the composite reward's weights.
    """

    dataset: str = "med_kg_qa/tiny"
    data_dir: str | None = None
    eval_split: str = "validation"
    num_eval_questions: int | None = None
    max_turns: int = 8
    sub_turns: int = 4
    max_new_tokens: int = 128
    final_turn_tokens: int = 64
    max_context_tokens: int | None = 4096
    max_observation_chars: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    reward: research.RewardConfig = dataclasses.field(default_factory=research.RewardConfig)

    def tools(self, env: research.ResearchEnvironment) -> list[agents.Tool]:
        tools = env.tools()
        if self.max_observation_chars is None:
            return tools
        return [tools_lib.truncate_output(t, self.max_observation_chars) for t in tools]

    def agent(
        self,
        env: research.ResearchEnvironment,
        backend,
        *,
        greedy: bool = False,
        sub_backend=None,
        hierarchical: bool = False,
    ) -> agents.AgentSpec:
        """The researcher (or M-GRPO's main agent with a searching sub-agent)."""
        sampling = SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, greedy=greedy,
        )  # fmt: skip
        common = dict(
            sampling=sampling, max_context_tokens=self.max_context_tokens,
            final_turn_tokens=self.final_turn_tokens,
        )  # fmt: skip
        if not hierarchical:
            return agents.AgentSpec(
                "researcher", backend, system_prompt=research.SYSTEM_PROMPT,
                tools=self.tools(env), max_turns=self.max_turns, **common,
            )  # fmt: skip
        sub = agents.AgentSpec(
            "searcher", sub_backend or backend, system_prompt=research.SUB_AGENT_PROMPT,
            tools=self.tools(env), max_turns=self.sub_turns, **common,
        )  # fmt: skip
        return agents.AgentSpec(
            "main", backend, system_prompt=research.SYSTEM_PROMPT,
            tools=[agents.delegate_tool(sub)], max_turns=self.max_turns, **common,
        )  # fmt: skip


def rollout(task, env, backend, records, *, num_generations, sub_backend=None, hierarchical=False):
    """G episodes per record, query-major."""
    agent = task.agent(env, backend, sub_backend=sub_backend, hierarchical=hierarchical)
    return agents.run_episodes(agent, research.queries(records), num_rollouts=num_generations)


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0


def episode_stats(trajs: Sequence[agents.Trajectory], prefix: str = "") -> dict[str, float]:
    """Lengths, turns, tool calls, format errors and finish reasons of a set of episodes."""
    generated = [t.num_generated for t in trajs]
    out = {
        "response_length/mean": _mean(generated),
        "response_length/max": float(max(generated, default=0)),
        "episode_length/mean": _mean(len(t.token_ids) for t in trajs),
        "turns/mean": _mean(len(t.turns) for t in trajs),
        "tool_calls/mean": _mean(sum(x.tool is not None for x in t.turns) for t in trajs),
        "format_errors/mean": _mean(t.format_errors for t in trajs),
        "generated_tokens": float(sum(generated)),
    }
    for reason in ("answer", "no_answer", "context", "stopped", "end_phrase"):
        out[f"finish/{reason}"] = _mean(t.finish_reason == reason for t in trajs)
    return {prefix + k: v for k, v in out.items()}


def score_episodes(
    trajs: Sequence[agents.Trajectory],
    records: Sequence[Mapping[str, Any]],
    num_generations: int,
    reward: research.RewardConfig,
) -> list[research.RewardTerms]:
    """`research.score` of each query-major episode against its record."""
    return [research.score(t, records[i // num_generations], reward) for i, t in enumerate(trajs)]


def reward_stats(terms: Sequence[research.RewardTerms], prefix: str = "") -> dict[str, float]:
    totals = np.array([t.total for t in terms], np.float64)
    return {
        prefix + "reward/mean": float(totals.mean()) if totals.size else 0.0,
        prefix + "reward/std": float(totals.std()) if totals.size else 0.0,
        prefix + "reward/correct": _mean(t.correct for t in terms),
        prefix + "reward/format_valid": _mean(t.format_valid for t in terms),
        prefix + "reward/tool_calls": _mean(t.tool_calls for t in terms),
        prefix + "reward/excess_calls": _mean(t.excess_calls for t in terms),
        prefix + "reward/answered": _mean(t.answered for t in terms),
        prefix + "reward/format_errors": _mean(t.format_errors for t in terms),
    }


def advantage_stats(adv: np.ndarray, prefix: str = "") -> dict[str, float]:
    adv = np.asarray(adv, np.float64)
    return {
        prefix + "advantages/mean": float(adv.mean()) if adv.size else 0.0,
        prefix + "advantages/std": float(adv.std()) if adv.size else 0.0,
        prefix + "advantages/abs_mean": float(np.abs(adv).mean()) if adv.size else 0.0,
        prefix + "advantages/zero_fraction": float((adv == 0).mean()) if adv.size else 0.0,
    }


def episode_rows(
    trajs: Sequence[agents.Trajectory | None], *, pad_id: int
) -> dict[str, np.ndarray]:
    """`agents.training_batch` of the episodes at a bucketed width; None entries become
    all-padding rows (M-GRPO rollouts that delegated nothing)."""
    real = [t for t in trajs if t is not None]
    width = data_lib.bucket(max((len(t.token_ids) for t in real), default=1))
    keep = np.array([t is not None for t in trajs], bool)
    if not real:
        batch = data_lib.pad_rows([], width, pad_id=pad_id, num_rows=len(trajs))
        batch["old_logps"] = np.zeros((len(trajs), width), np.float32)
        return batch
    batch = agents.training_batch(real, pad_id, width=width)
    source = np.maximum(np.cumsum(keep) - 1, 0)
    return {
        k: np.where(keep[:, None], v[source], pad_id if k == "input_ids" else 0).astype(v.dtype)
        for k, v in batch.items()
    }


def grpo_batch(
    trajs, records, num_generations: int, reward: research.RewardConfig, *, pad_id: int,
    scale: str = "group", ddof: int = 1,
):  # fmt: skip
    """Rows of the G episodes per record with group-relative advantages."""
    terms = score_episodes(trajs, records, num_generations, reward)
    rewards = np.array([t.total for t in terms], np.float32)
    adv = np.asarray(
        losses.group_advantages(rewards, num_generations, scale=scale, ddof=ddof), np.float32
    )
    batch = episode_rows(trajs, pad_id=pad_id)
    batch["advantages"] = adv
    stats = {**reward_stats(terms), **advantage_stats(adv), **episode_stats(trajs)}
    return batch, stats


def reference_reward(example: Mapping[str, Any], reward: research.RewardConfig) -> float:
    """The reward `research.score` gives an expert chat (correct and well formed, so only
    the call penalty varies)."""
    turns = [agents.Turn(reply="", tool="tool") for _ in range(int(example["num_tool_calls"]))]
    traj = agents.Trajectory(
        query_id=example["id"], rollout_index=0, agent="expert", turns=turns,
        answer=example["answer_name"], finish_reason="answer",
    )  # fmt: skip
    return research.score(traj, data_lib.research_record(example), reward).total


def grao_batch(
    trajs, records, references, num_generations: int, reward: research.RewardConfig, *,
    pad_id: int,
):  # fmt: skip
    """Rows of the G episodes per record plus each record's expert chat as GRAO's reference
    answer y. `references`: per record, (ids, mask, reward) of the expert chat."""
    terms = score_episodes(trajs, records, num_generations, reward)
    batch = episode_rows(trajs, pad_id=pad_id)
    del batch["old_logps"]
    batch["rewards"] = np.array([t.total for t in terms], np.float32)
    ref = data_lib.pad_rows(
        [(ids, mask) for ids, mask, _ in references],
        data_lib.bucket(max(len(ids) for ids, _, _ in references)),
        pad_id=pad_id,
    )
    for k, v in ref.items():
        batch[f"ref_{k}"] = v
    batch["ref_rewards"] = np.array([r for _, _, r in references], np.float32)
    stats = {
        **reward_stats(terms), **episode_stats(trajs),
        "reference/reward_mean": float(batch["ref_rewards"].mean()),
        "reference/length_mean": _mean(len(ids) for ids, _, _ in references),
    }  # fmt: skip
    return batch, stats


def mgrpo_batches(
    trajs, records, num_rollouts: int, target_count: int | None, key: jax.Array, *,
    reward: research.RewardConfig, pad_id: int, main_weights=losses.mgrpo.MAIN_REWARD_WEIGHTS,
    sub_weights=None, quantile: float = 0.99,
):  # fmt: skip
    """M-GRPO rows for the main agent and the aligned sub-agent rows.

    R_M = a1 format + a2 correct (Eq. 4); R_S of a sub-trajectory = b1 its format + b2 its
    main rollout's correctness (the released variant: r_expert needs an LLM rater). Each
    rollout is aligned to d sub-trajectories (`target_count`, or the `quantile` of the
    counts when None), and sub advantages pool the d*K of each query (Eq. 11-13). Rollouts
    that delegated nothing give all-padding sub rows (advantage 0, mask 0).

    Returns:
      (main_batch, sub_batch, stats).
    """
    terms = score_episodes(trajs, records, num_rollouts, reward)
    fmt = np.array([t.format_valid for t in terms], np.float32)
    correct = np.array([t.correct for t in terms], np.float32)
    main_rewards = np.asarray(losses.mgrpo_main_rewards(fmt, correct, weights=main_weights))
    main_adv = np.asarray(losses.mgrpo_main_advantages(main_rewards, num_rollouts), np.float32)
    main = episode_rows(trajs, pad_id=pad_id)
    main["advantages"] = main_adv

    subs, owner = agents.sub_trajectories(trajs)
    counts = np.bincount(owner, minlength=len(trajs)) if len(owner) else np.zeros(len(trajs))
    d = target_count or max(losses.choose_target_count(counts, quantile), 1)
    align = losses.align_sub_trajectories(owner, d, key, num_rollouts=len(trajs))
    index = np.asarray(align.indices).reshape(-1)
    sub_fmt = np.array(
        [float(s.finish_reason == "answer" and s.format_errors == 0) for s in subs], np.float32
    )
    rows_fmt = np.where(index >= 0, sub_fmt[np.maximum(index, 0)] if len(subs) else 0.0, 0.0)
    parent = np.repeat(np.arange(len(trajs)), d)
    kwargs = {"variant": "released"}
    if sub_weights is not None:
        kwargs["weights"] = sub_weights
    sub_rewards = np.asarray(losses.mgrpo_sub_rewards(rows_fmt, correct[parent], **kwargs))
    query = np.where(index >= 0, parent // num_rollouts, -1)
    sub_adv = np.asarray(
        losses.mgrpo_sub_advantages(sub_rewards, query, num_queries=len(trajs) // num_rollouts),
        np.float32,
    )
    sub = episode_rows([subs[i] if i >= 0 else None for i in index], pad_id=pad_id)
    sub["advantages"] = np.where(index >= 0, sub_adv, 0.0).astype(np.float32)
    stats = {
        **reward_stats(terms), **advantage_stats(main_adv), **episode_stats(trajs),
        "main/reward_mean": float(main_rewards.mean()),
        "sub/reward_mean": float(sub_rewards[index >= 0].mean()) if (index >= 0).any() else 0.0,
        "sub/target_count": float(d),
        "sub/count_mean": float(np.mean(counts)) if len(counts) else 0.0,
        "sub/rollouts_without_subs": float((np.asarray(align.rollout_valid) == 0).sum()),
        "sub/duplicated": float(align.num_duplicated),
        "sub/dropped": float(align.num_dropped),
        **advantage_stats(sub["advantages"][index >= 0], prefix="sub/"),
        **episode_stats(subs, prefix="sub/"),
    }  # fmt: skip
    return main, sub, stats
