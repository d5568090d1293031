"""From rollouts to training batches: rewards, advantages and rows for each RL algorithm.

    trajs = task.rollout(env, backend, records, num_generations=G)
    rewards, reward_stats = task.score(env, trajs, records, G)
    batch, stats = grpo_batch(trajs, rewards, G)                    # GRPO family
    batch, stats = grao_batch(trajs, rewards, references)           # GRAO (+ expert answers)
    main, sub, stats = mgrpo_batches(trajs, records, K, d, key)     # M-GRPO, both agents
    # Decoupled M-GRPO: mgrpo_main_batch in the main trainer, mgrpo_sub_batch in the sub one.

Every batch is a dict of numpy arrays, rows prompt-major, padded to a power-of-two width
(bounded compiles). `stats` are the per-step scalars the trainer logs: reward mean/std and
each reward term, advantages, response lengths, turns, tool calls, format errors and
finish reasons.
"""

import dataclasses
import functools
import json
import types
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from medjax import agents, losses, packing
from medjax.agents import tools as tools_lib
from medjax.envs import research
from medjax.sampling import SamplingParams
from medjax.training import data as data_lib
from medjax.training.task import TaskData


@functools.cache
def _research_environment() -> research.ResearchEnvironment:
    """The graph, corpus and BM25 index (read-only), built or loaded once per process."""
    from medjax.datasets import med_kg_qa

    return research.build_environment(med_kg_qa.knowledge_graph())


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
      tool_names: the environment's tools the researcher gets, by name (None: all of
        `search`, `read`, `kg_lookup`); fewer tools, a shorter system prompt. The SFT chats
        get the same system prompt.

    It implements `medjax.training.task.Task` (as `training.consultation`'s task does), and
    for M-GRPO also `reward` and `sub_agent`.
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
    tool_names: tuple[str, ...] | None = None

    def __post_init__(self):
        # Checked when gin builds the task, before a run writes anything.
        if self.tool_names is not None:
            unknown = [n for n in self.tool_names if n not in research.TOOL_NAMES]
            if unknown or not self.tool_names:
                raise ValueError(
                    f"ResearchTask.tool_names {self.tool_names!r}: expected one or more of"
                    f" {list(research.TOOL_NAMES)}."
                )

    roles = (None, "researcher", "main", "searcher")
    result_keys: ClassVar[Mapping[str, str]] = types.MappingProxyType(
        {
            "accuracy": "share of questions whose final <answer> matches the gold entity's name or"
            " an alias (normalised exact match)",
            "mean_reward": "mean composite reward of the episodes (research.RewardConfig: correct"
            " + format_weight * format_valid + answer_weight * answered - call and error"
            " penalties)",
            "answered": "share of episodes that ended with an <answer>",
            "format_valid": "share of episodes that ended with an <answer> and made no format or"
            " tool error",
            "format_errors": "mean format and tool errors per episode",
            "mean_tool_calls": "mean tool calls per episode",
            "expert_nll": "token-mean negative log-likelihood of the scripted expert's replies on"
            " the same held-out questions (lower: closer to the expert)",
        }
    )

    def environment(self) -> research.ResearchEnvironment:
        return _research_environment()

    def load(self, env: research.ResearchEnvironment) -> TaskData:
        """The expert's chats (`med_kg_qa_trajectories` train) with their questions, and
        the held-out questions (`eval_split`, the first `num_eval_questions`)."""
        del env  # The questions carry everything.
        from medjax import datasets
        from medjax.datasets import med_kg_qa

        name, _, config = self.dataset.partition("/")
        if name != "med_kg_qa":
            raise ValueError(f"ResearchTask.dataset {self.dataset!r}: expected med_kg_qa[/config].")
        suffix = f"/{config}" if config else ""
        try:
            chats = datasets.load(f"med_kg_qa_trajectories{suffix}", "train", self.data_dir)
            held_out = datasets.load(self.dataset, self.eval_split, self.data_dir)
        except (ValueError, KeyError) as e:
            raise ValueError(f"dataset {self.dataset!r}: {e}") from None
        chats = [med_kg_qa.to_trajectory(chats[i]) for i in range(len(chats))]
        eval_records = [med_kg_qa.to_record(held_out[i]) for i in range(len(held_out))]
        if not chats:
            raise ValueError(f"dataset med_kg_qa_trajectories{suffix} (train) is empty.")
        records = [data_lib.research_record(c) for c in chats]
        return TaskData(chats, records, eval_records[: self.num_eval_questions])

    def sft_chats(self, env, chats, role: str | None) -> list[list[dict[str, str]]]:
        return role_chats(self, env, chats, role or "researcher")

    def rollout(self, env, backend, records, *, num_generations: int, **hierarchy):
        """G episodes per record, query-major (`hierarchy`: `agent`'s M-GRPO keywords)."""
        agent = self.agent(env, backend, **hierarchy)
        return agents.run_episodes(agent, research.queries(records), num_rollouts=num_generations)

    def score(self, env, trajs, records, num_generations: int):
        """(rewards [N] float32, the step's reward statistics): `research.score`."""
        del env
        terms = score_episodes(trajs, records, num_generations, self.reward)
        return np.array([t.total for t in terms], np.float32), reward_stats(terms)

    def reference_reward(self, chat) -> float:
        """GRAO's R(y): the reward `research.score` gives the expert's chat."""
        return reference_reward(chat, self.reward)

    def evaluate(
        self, env, backend, records, *, sub_backend=None, hierarchical: bool = False
    ) -> dict[str, Any]:
        """Greedy episodes on `records` (`medjax.eval.research`): the researcher, or M-GRPO's
        main agent over its sub-agent (`sub_backend`, default `backend`)."""
        from medjax.eval import research as eval_research

        agent = self.agent(
            env, backend, greedy=True, sub_backend=sub_backend, hierarchical=hierarchical
        )
        return eval_research.evaluate_agent(agent, records, reward_config=self.reward)

    def expert_chats(self, env, records) -> list[list[dict[str, str]]]:
        """The scripted expert's chats for `records` (held-out expert NLL)."""
        return [t.messages for t in research.expert_trajectories(env, records)]

    def tools(self, env: research.ResearchEnvironment) -> list[agents.Tool]:
        tools = env.tools()
        if self.tool_names is not None:
            tools = [t for t in tools if t.name in self.tool_names]
        if self.max_observation_chars is None:
            return tools
        return [tools_lib.truncate_output(t, self.max_observation_chars) for t in tools]

    def _common(self, greedy: bool) -> dict[str, Any]:
        sampling = SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, greedy=greedy,
        )  # fmt: skip
        return dict(
            sampling=sampling, max_context_tokens=self.max_context_tokens,
            final_turn_tokens=self.final_turn_tokens,
        )  # fmt: skip

    def sub_agent(
        self, env: research.ResearchEnvironment, backend, *, greedy: bool = False
    ) -> agents.AgentSpec:
        """M-GRPO's searching sub-agent (the retrieval tools, `sub_turns` turns)."""
        return agents.AgentSpec(
            "searcher", backend, system_prompt=research.SUB_AGENT_PROMPT,
            tools=self.tools(env), max_turns=self.sub_turns, **self._common(greedy),
        )  # fmt: skip

    def agent(
        self,
        env: research.ResearchEnvironment,
        backend,
        *,
        greedy: bool = False,
        sub_backend=None,
        hierarchical: bool = False,
        remote_sub_agent=None,
    ) -> agents.AgentSpec:
        """The researcher, or M-GRPO's main agent delegating to a searching sub-agent (run
        in this process on `sub_backend`, or served by another: `remote_sub_agent`, a client
        for `agents.remote_delegate_tool`)."""
        if not hierarchical:
            return agents.AgentSpec(
                "researcher", backend, system_prompt=research.SYSTEM_PROMPT,
                tools=self.tools(env), max_turns=self.max_turns, **self._common(greedy),
            )  # fmt: skip
        if remote_sub_agent is not None:
            delegate = agents.remote_delegate_tool(remote_sub_agent)
        else:
            delegate = agents.delegate_tool(
                self.sub_agent(env, sub_backend or backend, greedy=greedy)
            )
        return agents.AgentSpec(
            "main", backend, system_prompt=research.SYSTEM_PROMPT, tools=[delegate],
            max_turns=self.max_turns, **self._common(greedy),
        )  # fmt: skip


ROLES = ("researcher", "main", "searcher")


def role_chats(
    task: ResearchTask, env: research.ResearchEnvironment, chats: Sequence[Mapping[str, Any]],
    role: str,
) -> list[list[dict[str, str]]]:  # fmt: skip
    """The expert's chats as SFT data for one agent role.

    "researcher": as they are (one agent with the retrieval tools). "searcher": M-GRPO's
    sub-agent: the same search, under the sub-agent's prompt, its task being the question.
    "main": M-GRPO's main agent: delegates the question to the sub-agent, reads back the
    answer it found (the searcher's final answer is its summary) and answers with it.
    """
    if role not in ROLES:
        raise ValueError(f"role_chats: role {role!r} is not one of {ROLES}.")
    if role in ("researcher", "searcher"):
        # The rollouts' system prompt (the task's tools), not the one stored with the chats.
        agent = task.agent(env, None) if role == "researcher" else task.sub_agent(env, None)
        system = agents.system_prompt(agent)
        return [[{"role": "system", "content": system}, *c["messages"][1:]] for c in chats]
    system = agents.system_prompt(
        task.agent(env, None, hierarchical=True, remote_sub_agent=lambda calls: [])
    )
    out = []
    for c in chats:
        question = c["messages"][1]["content"]
        call = json.dumps({"name": "delegate", "arguments": {"task": question}}, ensure_ascii=False)
        answer = c["answer_name"]
        out.append([
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": "<think>The sub-agent can search for this.</think>"
                                             f"<tool_call>{call}</tool_call>"},
            {"role": "user", "content": f"<tool_response>\n{answer}\n</tool_response>"},
            {"role": "assistant", "content": f"<think>The sub-agent found {answer}.</think>"
                                             f"<answer>{answer}</answer>"},
        ])  # fmt: skip
    return out


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


# The arrays of `shared_prefix_rows`' packed layout (besides the rows' own [B, C] arrays).
PACKED_KEYS = ("packed_ids", "packed_segments", "packed_positions", "predict_index")


def shared_prefix_rows(
    batch: Mapping[str, np.ndarray],
    group: int,
    *,
    pad_id: int,
    min_widths: tuple[int, int] = (0, 0),
):
    """Rows of whole episodes ([B, T], `episode_rows`) repacked so that each question's
    `group` episodes are one row: the tokens they share up to the first one any of them
    scores (the prompt) once, then each episode's remaining tokens back to back
    (`medjax.packing`'s layout: an episode attends to the prompt and to itself only, at its
    own positions). `medjax.scoring.score_packed` gives each scored token the log-prob the
    whole row gives it, for P prefixes + B continuations instead of B whole episodes, and
    runs the LM head on the scored tokens only.

    Returns the batch with `PACKED_KEYS` ([P, L]; `predict_index` [P, group, K]: the packed
    position that predicts each scored token) and every other [B, T] array cut to its
    row's scored tokens, [B, K] in order (`input_ids` are then the targets, `loss_mask`
    their mask values; `attention_mask` is dropped); [B] arrays (advantages) are unchanged. L and K
    are `data.bucket` widths, at least `min_widths` (L, K): a trainer that passes the widths
    it has compiled for pads narrower batches to them instead of compiling again. A loss
    over the scored tokens only is the same on these rows.

    Raises:
      ValueError: rows that do not form whole groups, or a group whose rows differ in
        their first token (nothing to share: they are not one question's episodes).
    """
    ids = np.asarray(batch["input_ids"])
    b, t = ids.shape
    if b % group:
        raise ValueError(f"shared_prefix_rows: {b} rows do not form groups of {group}.")
    num = b // group
    lengths = (np.asarray(batch["attention_mask"]) > 0).sum(axis=1)
    scored = (np.asarray(batch["loss_mask"]) > 0) & (np.arange(t)[None, :] < lengths[:, None])
    first = np.where(scored.any(axis=1), scored.argmax(axis=1), lengths)
    prefix = np.zeros(num, np.int64)
    for q in range(num):
        rows = slice(q * group, (q + 1) * group)
        n = int(min(lengths[rows].min(), first[rows].min()))
        same = (ids[rows, :n] == ids[q * group, :n]).all(axis=0)
        prefix[q] = n if same.all() else int(np.argmin(same))
        if prefix[q] == 0:
            raise ValueError(
                f"shared_prefix_rows: rows {q * group}-{(q + 1) * group - 1} share no first"
                " token; they are not one question's episodes."
            )
    starts = np.repeat(prefix, group)
    rest = lengths - starts
    need = prefix + rest.reshape(num, group).sum(axis=1)  # Each packed row's tokens.
    width = int(max(rest.max(), 1))
    inside = np.arange(width)[None, :] < rest[:, None]
    at = np.minimum(starts[:, None] + np.arange(width)[None, :], t - 1)
    conts = np.where(inside, np.take_along_axis(ids, at, axis=1), pad_id)
    layout = packing.pack_groups(
        prefix, rest.reshape(num, group), prompt_capacity=int(prefix.max()),
        completion_capacity=width,
        row_length=max(data_lib.bucket(int(need.max())), min_widths[0]),
    )  # fmt: skip
    packed = packing.pack_tokens(
        ids[::group, : int(prefix.max())], conts.reshape(num, group, width),
        layout.source_index, pad_id=pad_id,
    )  # fmt: skip
    # Each row's scored tokens, in order, at the front of K columns.
    counts = scored.sum(axis=1)
    k = max(data_lib.bucket(int(max(counts.max(), 1))), min_widths[1])
    keep = np.arange(k)[None, :] < counts[:, None]
    cols = np.zeros((b, k), np.int64)  # Positions in the episode of each kept token.
    for r in range(b):
        cols[r, : counts[r]] = np.flatnonzero(scored[r])
    predict = np.asarray(layout.predict_index).reshape(b, width)
    within = np.maximum(cols - starts[:, None], 0)  # Each kept token's place in its continuation.
    predict = np.where(keep, np.take_along_axis(predict, within, axis=1), 0)
    out = {}
    for key, v in batch.items():
        v = np.asarray(v)
        if key == "attention_mask":
            continue
        if v.shape[:2] != (b, t):
            out[key] = v
            continue
        fill = pad_id if key == "input_ids" else 0
        out[key] = np.where(keep, np.take_along_axis(v, cols, axis=1), fill).astype(v.dtype)
    out.update(
        packed_ids=np.asarray(packed, np.int32),
        packed_segments=np.asarray(layout.segment_ids, np.int32),
        packed_positions=np.asarray(layout.positions, np.int32),
        predict_index=predict.reshape(num, group, k).astype(np.int32),
    )
    return out


def grpo_batch(
    trajs, rewards: np.ndarray, num_generations: int, *, pad_id: int, scale: str = "group",
    ddof: int = 1,
):  # fmt: skip
    """Rows of the G episodes per record with group-relative advantages of `rewards`
    (`task.score`'s)."""
    adv = np.asarray(
        losses.group_advantages(np.asarray(rewards, np.float32), num_generations, scale=scale,
                                ddof=ddof),
        np.float32,
    )  # fmt: skip
    batch = episode_rows(trajs, pad_id=pad_id)
    batch["advantages"] = adv
    return batch, {**advantage_stats(adv), **episode_stats(trajs)}


def reference_reward(example: Mapping[str, Any], reward: research.RewardConfig) -> float:
    """The reward `research.score` gives an expert chat (correct and well formed, so only
    the call penalty varies)."""
    turns = [agents.Turn(reply="", tool="tool") for _ in range(int(example["num_tool_calls"]))]
    traj = agents.Trajectory(
        query_id=example["id"], rollout_index=0, agent="expert", turns=turns,
        answer=example["answer_name"], finish_reason="answer",
    )  # fmt: skip
    return research.score(traj, data_lib.research_record(example), reward).total


def grao_batch(trajs, rewards: np.ndarray, references, *, pad_id: int):
    """Rows of the G episodes per record (`rewards`: `task.score`'s) plus each record's
    expert chat as GRAO's reference answer y. `references`: per record, (ids, mask, reward)
    of the expert chat."""
    batch = episode_rows(trajs, pad_id=pad_id)
    del batch["old_logps"]
    batch["rewards"] = np.asarray(rewards, np.float32)
    ref = data_lib.pad_rows(
        [(ids, mask) for ids, mask, _ in references],
        data_lib.bucket(max(len(ids) for ids, _, _ in references)),
        pad_id=pad_id,
    )
    for k, v in ref.items():
        batch[f"ref_{k}"] = v
    batch["ref_rewards"] = np.array([r for _, _, r in references], np.float32)
    stats = {
        **episode_stats(trajs),
        "reference/reward_mean": float(batch["ref_rewards"].mean()),
        "reference/length_mean": _mean(len(ids) for ids, _, _ in references),
    }  # fmt: skip
    return batch, stats


def mgrpo_main_batch(
    trajs, records, num_rollouts: int, *, reward: research.RewardConfig, pad_id: int,
    main_weights=losses.mgrpo.MAIN_REWARD_WEIGHTS,
):  # fmt: skip
    """The main agent's rows: R_M = a1 format + a2 correct (Eq. 4), plus the reward's
    shaping terms (`answer_weight`, `error_penalty`; 0 by default, as in the paper);
    advantages over each query's K rollouts.

    Returns:
      (batch, terms, main_rewards, stats): `terms` are each rollout's `research.score`.
    """
    terms = score_episodes(trajs, records, num_rollouts, reward)
    fmt = np.array([t.format_valid for t in terms], np.float32)
    correct = np.array([t.correct for t in terms], np.float32)
    main_rewards = np.asarray(losses.mgrpo_main_rewards(fmt, correct, weights=main_weights))
    main_rewards = main_rewards + np.array(
        [reward.answer_weight * t.answered - reward.error_penalty * t.format_errors for t in terms],
        np.float32,
    )
    main_adv = np.asarray(losses.mgrpo_main_advantages(main_rewards, num_rollouts), np.float32)
    batch = episode_rows(trajs, pad_id=pad_id)
    batch["advantages"] = main_adv
    stats = {
        **reward_stats(terms), **advantage_stats(main_adv), **episode_stats(trajs),
        "main/reward_mean": float(main_rewards.mean()),
    }  # fmt: skip
    return batch, terms, main_rewards, stats


def mgrpo_sub_batch(
    subs: Sequence[agents.Trajectory], owner: np.ndarray, correct: np.ndarray,
    num_rollouts: int, target_count: int | None, key: jax.Array, *, pad_id: int,
    sub_weights=None, quantile: float = 0.99, shaping: research.RewardConfig | None = None,
    align: bool = True, variant: str = "released", expert_rater=None,
):  # fmt: skip
    """The sub-agent's aligned rows, from the main rollouts' correctness only.

    R_S of a sub-trajectory = b1 its format + b2 its main rollout's correctness (variant
    "released"; "paper" adds b3 r_expert, `expert_rater(sub_trajectory)` in [0, 1]), plus
    `shaping`'s `answer_weight` and `error_penalty` terms of its own episode (0 by
    default). Each rollout is aligned to d
    sub-trajectories (`target_count`, or the `quantile` of the counts when None), and sub
    advantages pool the d*K of each query (Eq. 11-13). Rollouts that delegated nothing give
    all-padding rows (advantage 0, mask 0). `align` False skips Eq. 11: each rollout keeps
    its own sub-trajectories once, rows padded (mask 0) to a power of two at least the
    largest count, and the advantages pool the query's real sub-trajectories. This is
    everything the sub trainer needs from the main one, which is why decoupled trainers
    exchange only these statistics.

    Args:
      subs: the sub-trajectories, grouped by rollout in call order.
      owner: [len(subs)] the position of each one's main rollout (query-major).
      correct: [num queries * K] each main rollout's correctness.
      num_rollouts: K.

    Returns:
      (batch, stats).
    """
    total = len(correct)
    owner = np.asarray(owner, np.int32)
    counts = np.bincount(owner, minlength=total) if len(owner) else np.zeros(total, np.int64)
    if align:
        d = target_count or max(losses.choose_target_count(counts, quantile), 1)
        aligned = losses.align_sub_trajectories(owner, d, key, num_rollouts=total)
        index = np.asarray(aligned.indices).reshape(-1)
        duplicated, dropped = float(aligned.num_duplicated), float(aligned.num_dropped)
    else:  # Every rollout's own sub-trajectories once, rows padded with -1 to a bucket.
        d = data_lib.bucket(max(int(counts.max(initial=0)), 1), minimum=1)
        index = np.full((total, d), -1, np.int64)
        for r in range(total):
            own = np.flatnonzero(owner == r)
            index[r, : len(own)] = own
        index = index.reshape(-1)
        duplicated = dropped = 0.0
    sub_fmt = np.array(
        [float(s.finish_reason == "answer" and s.format_errors == 0) for s in subs], np.float32
    )
    rows_fmt = np.where(index >= 0, sub_fmt[np.maximum(index, 0)] if len(subs) else 0.0, 0.0)
    parent = np.repeat(np.arange(total), d)
    kwargs = {"variant": variant}
    if sub_weights is not None:
        kwargs["weights"] = sub_weights
    if variant == "paper":
        if expert_rater is None:
            raise ValueError("mgrpo_sub_batch: variant 'paper' needs expert_rater (r_expert).")
        rated = np.array([float(expert_rater(s)) for s in subs] or [0.0], np.float32)
        expert = np.where(index >= 0, rated[np.maximum(index, 0)], 0.0)
        kwargs["expert_reward"] = expert.astype(np.float32)
    correct = np.asarray(correct, np.float32)
    sub_rewards = np.asarray(losses.mgrpo_sub_rewards(rows_fmt, correct[parent], **kwargs))
    if shaping is not None and len(subs):
        extra = np.array(
            [shaping.answer_weight * (s.finish_reason == "answer")
             - shaping.error_penalty * s.format_errors for s in subs],
            np.float32,
        )  # fmt: skip
        sub_rewards = sub_rewards + np.where(index >= 0, extra[np.maximum(index, 0)], 0.0)
    query = np.where(index >= 0, parent // num_rollouts, -1)
    sub_adv = np.asarray(
        losses.mgrpo_sub_advantages(sub_rewards, query, num_queries=total // num_rollouts),
        np.float32,
    )
    batch = episode_rows([subs[i] if i >= 0 else None for i in index], pad_id=pad_id)
    batch["advantages"] = np.where(index >= 0, sub_adv, 0.0).astype(np.float32)
    stats = {
        "sub/reward_mean": float(sub_rewards[index >= 0].mean()) if (index >= 0).any() else 0.0,
        "sub/target_count": float(d),
        "sub/count_mean": float(np.mean(counts)) if len(counts) else 0.0,
        "sub/rollouts_without_subs": float((counts == 0).sum()),
        "sub/duplicated": duplicated,
        "sub/dropped": dropped,
        **advantage_stats(batch["advantages"][index >= 0], prefix="sub/"),
        **episode_stats(subs, prefix="sub/"),
    }  # fmt: skip
    return batch, stats


def mgrpo_batches(
    trajs, records, num_rollouts: int, target_count: int | None, key: jax.Array, *,
    reward: research.RewardConfig, pad_id: int, main_weights=losses.mgrpo.MAIN_REWARD_WEIGHTS,
    sub_weights=None, quantile: float = 0.99, align: bool = True, variant: str = "released",
    expert_rater=None,
):  # fmt: skip
    """M-GRPO rows for the main agent and the aligned sub-agent rows, in one process:
    `mgrpo_main_batch`, then `mgrpo_sub_batch` on the sub-trajectories the rollouts hold.

    Returns:
      (main_batch, sub_batch, stats).
    """
    main, terms, _, stats = mgrpo_main_batch(
        trajs, records, num_rollouts, reward=reward, pad_id=pad_id, main_weights=main_weights
    )
    subs, owner = agents.sub_trajectories(trajs)
    correct = np.array([t.correct for t in terms], np.float32)
    sub, sub_stats = mgrpo_sub_batch(
        subs, owner, correct, num_rollouts, target_count, key, pad_id=pad_id,
        sub_weights=sub_weights, quantile=quantile, shaping=reward, align=align,
        variant=variant, expert_rater=expert_rater,
    )  # fmt: skip
    return main, sub, {**stats, **sub_stats}
