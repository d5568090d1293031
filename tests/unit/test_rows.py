"""From a step's episodes to its training rows, for each RL algorithm: rewards, advantages,
masks and row order worked out by hand, then the algorithm's loss on those rows.

The episodes are built by hand and scored by the research task's real reward
(`ResearchTask.score`: 1 correct + 0.1 well formed - 0.05 per call over 10), so a test also
catches rows paired with the wrong question or a reward read from the wrong episode.
"""

import functools
import types

import jax
import numpy as np
import pytest
from flax import nnx
from test_grao import grao_numpy  # The float64 loop-by-loop Eq. 3 of GRAO's paper.
from test_training import TINY

from medjax import agents, losses
from medjax.models import DecoderLM
from medjax.models import tokenizer as tokenizer_lib
from medjax.training import algorithms, rl, stages

PAD = 3
QUESTIONS = [
    {"id": "q0", "question": "Which syndrome?", "hops": 2,
     "answer": {"name": "Marfan syndrome", "aliases": ["Marfan syndrome", "MFS"]}},
    {"id": "q1", "question": "Which gene?", "hops": 1,
     "answer": {"name": "FBN1", "aliases": ["FBN1"]}},
]  # fmt: skip


def episode(first, prompt, generated, *, answer=None, finish="answer", errors=0, calls=0,
            subs=(), query="q"):  # fmt: skip
    """An episode whose ids start with `first` (to tell rows apart): `prompt` ids the policy
    did not write, then `generated` of its own (sampled log-prob -0.5 each)."""
    ids = [first] + [5] * (prompt - 1) + [6] * generated
    turns = [agents.Turn(reply="", tool="search") for _ in range(calls)]
    turns.append(agents.Turn(reply="", num_tokens=generated))
    return agents.Trajectory(
        query, 0, "researcher", token_ids=ids, loss_mask=[0] * prompt + [1] * generated,
        logps=[0.0] * prompt + [-0.5] * generated, turns=turns, answer=answer,
        finish_reason=finish, format_errors=errors, sub_trajectories=list(subs),
    )  # fmt: skip


# Two questions x G=3, rewards by hand:
GRPO_EPISODES = [
    episode(10, 4, 2, answer="marfan syndrome"),  # Correct, well formed: 1.1.
    episode(11, 4, 3, answer="FBN1"),  # Wrong, well formed: 0.1.
    episode(12, 5, 1, finish="no_answer"),  # No answer: 0.
    episode(13, 3, 2, answer="FBN1", errors=1),  # Correct, a format error: 1.0.
    episode(14, 3, 4, answer="FBN1", calls=12),  # Correct, 2 calls over budget: 1.1 - 0.1.
    episode(15, 4, 1, answer="fbn1"),  # Correct (normalised), well formed: 1.1.
]
GRPO_REWARDS = [1.1, 0.1, 0.0, 1.0, 1.0, 1.1]
GENERATED = np.array([2, 3, 1, 2, 4, 1])
# Group means 0.4 and 3.1 / 3; the deviations from them:
DEVIATIONS = np.array([0.7, -0.3, -0.4, -0.1 / 3, -0.1 / 3, 0.2 / 3])
GROUP_SQUARES = (0.49 + 0.09 + 0.16, 2 * (0.1 / 3) ** 2 + (0.2 / 3) ** 2)


def rollouts(trajs, picked, run, step=0):
    records = [QUESTIONS[i] for i in picked]
    return algorithms.Rollouts(trajs, records, picked, step, jax.random.key(0), run)


def research_run(**more):
    """The run as an algorithm's rows read it: the task, its environment and tokenizer."""
    parts = dict(
        task=rl.ResearchTask(), env=None, tokenizer=types.SimpleNamespace(pad_token_id=PAD)
    )
    return types.SimpleNamespace(**{**parts, **more})


def grpo_stage(**kwargs):
    return stages.RLStage(algorithm="grpo", prompts_per_step=2, num_generations=3, **kwargs)


def expected_advantages(scale, ddof):
    if scale == "none":
        return DEVIATIONS
    if scale == "batch":  # The batch's std (ddof 1 of all six), each group's own mean.
        std = np.std(GRPO_REWARDS, ddof=1)
        return DEVIATIONS / (std + 1e-4)
    std = np.sqrt(np.repeat(GROUP_SQUARES, 3) / (3 - ddof))
    return DEVIATIONS / (std + 1e-4)


@pytest.mark.parametrize(
    "scale,ddof", [("group", 1), ("group", 0), ("batch", 1), ("none", 1)]
)  # fmt: skip
def test_grpo_rows_by_hand(scale, ddof):
    """Catches advantages negated or not scaled as `advantage_scale` / `advantage_ddof` say
    (options not passed on), rows out of episode order, masks off by one."""
    stage = grpo_stage(advantage_scale=scale, advantage_ddof=ddof)
    rows = stage.method.rows(stage, rollouts(GRPO_EPISODES, [0, 1], research_run())).policy
    np.testing.assert_allclose(rows["advantages"], expected_advantages(scale, ddof), rtol=1e-5)
    assert rows["advantages"].dtype == np.float32
    assert rows["input_ids"][:, 0].tolist() == [10, 11, 12, 13, 14, 15]
    assert rows["input_ids"].shape == (6, 64)  # The bucketed width.
    lengths = [4 + 2, 4 + 3, 5 + 1, 3 + 2, 3 + 4, 4 + 1]
    assert rows["attention_mask"].sum(axis=1).tolist() == lengths
    assert (rows["input_ids"][np.arange(6), lengths] == PAD).all()
    assert rows["loss_mask"].sum(axis=1).tolist() == GENERATED.tolist()
    # The first generated position of each row: right after its prompt.
    starts = [4, 4, 5, 3, 3, 4]
    assert [int(np.argmax(m)) for m in rows["loss_mask"]] == starts
    np.testing.assert_array_equal(rows["old_logps"], -0.5 * rows["loss_mask"])


def test_grpo_step_stats_by_hand():
    stage = grpo_stage()
    stats = stage.method.rows(stage, rollouts(GRPO_EPISODES, [0, 1], research_run())).stats
    assert stats["reward/mean"] == pytest.approx(4.3 / 6)
    assert stats["reward/correct"] == pytest.approx(4 / 6)
    assert stats["reward/format_valid"] == pytest.approx(4 / 6)
    assert stats["reward/excess_calls"] == pytest.approx(2 / 6)
    assert stats["generated_tokens"] == 13
    assert stats["finish/no_answer"] == pytest.approx(1 / 6)
    assert stats["advantages/zero_fraction"] == 0


def test_grpo_rows_pair_each_group_with_its_own_question():
    """The same episodes for the questions in the other order: q1's answers now score 0.1
    (wrong) and q0's 1.1 ones 0.1 too; a reward read against records[i % G] or the picked
    order reversed would not give this."""
    stage = grpo_stage()
    swapped = GRPO_EPISODES[3:] + GRPO_EPISODES[:3]
    rows = stage.method.rows(stage, rollouts(swapped, [0, 1], research_run())).policy
    # q0 gets the FBN1 answers: 0 (format error), 0.1 - 0.1 (12 calls), 0.1; q1 gets
    # "marfan syndrome" 0.1, "FBN1" 1.1, no answer 0.
    groups = [np.array([0.0, 0.0, 0.1]), np.array([0.1, 1.1, 0.0])]
    want = np.concatenate([(g - g.mean()) / (np.std(g, ddof=1) + 1e-4) for g in groups])
    np.testing.assert_allclose(rows["advantages"], want, rtol=1e-5, atol=1e-6)


def tiny_model(vocab_size=64, seed=0):
    """test_training's tiny model, on one device, unsharded."""
    return DecoderLM(TINY.replace(vocab_size=vocab_size), rngs=nnx.Rngs(seed))


def loss_of(stage, model, batch):
    """The stage's algorithm's loss on `batch`, jitted (eager op-by-op dispatch is slow)."""
    return nnx.jit(stage.method.loss_fn(stage, 1.0))(model, batch)


# Log-ratios log pi - log pi_old of each generated token (row-major), both sides of the clip
# range: ratios 0.67 to 1.35.
LOG_RATIOS = np.array([0.3, -0.1, 0.05, -0.4, 0.15, 0.0, 0.25, 0.1, -0.2, 0.12, -0.05, 0.2, -0.3])


def surrogate_terms(adv, lengths, log_ratios, level="token", eps_high=0.2):
    """Each row's per-token losses -min(r A, clip(r, 0.8, 1 + eps_high) A), by hand, with r
    per token, or per row: exp of the mean ("sequence", GSPO) or sum ("trajectory", M-GRPO
    Eq. 15) of the row's log-ratios."""
    terms = []
    for a, x in zip(adv, np.split(log_ratios, np.cumsum(lengths)[:-1]), strict=True):
        if level != "token":
            x = np.full(len(x), x.mean() if level == "sequence" else x.sum())
        r = np.exp(x)
        terms.append(-np.minimum(r * a, np.clip(r, 0.8, 1 + eps_high) * a))
    return terms


def off_policy(rows, model, plain_logps, log_ratios):
    """The rows with old log-probs that put `log_ratios` between the policy and them."""
    old = plain_logps(model, rows["input_ids"], rows["loss_mask"])
    old[rows["loss_mask"] > 0] -= log_ratios
    return {**rows, "old_logps": old.astype(np.float32)}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo"])
def test_grpo_loss_on_the_rows_by_hand(loss_type, plain_logps):
    """Old log-probs set to the policy's own (from plain forwards) minus LOG_RATIOS, so each
    token's ratio is known; each loss type reduces the clipped surrogate its own way (GSPO:
    one ratio per row). Catches the loss's options (bound on `RLStage.loss`) or the
    advantages not reaching the loss."""
    options = {"gspo": dict(importance_sampling_level="sequence")}.get(
        loss_type, dict(loss_type=loss_type)
    )
    stage = grpo_stage(loss=functools.partial(losses.grpo_loss, **options))
    rows = stage.method.rows(stage, rollouts(GRPO_EPISODES, [0, 1], research_run())).policy
    model = tiny_model()
    value, _ = loss_of(stage, model, off_policy(rows, model, plain_logps, LOG_RATIOS))
    level = "sequence" if loss_type == "gspo" else "token"
    terms = surrogate_terms(expected_advantages("group", 1), GENERATED, LOG_RATIOS, level)
    want = {
        "bnpo": sum(t.sum() for t in terms) / GENERATED.sum(),
        "dapo": sum(t.sum() for t in terms) / GENERATED.sum(),
        "dr_grpo": sum(t.sum() for t in terms) / (6 * 64),  # B x the width, its default.
    }.get(loss_type, np.mean([t.mean() for t in terms]))  # Rows' token means, averaged.
    np.testing.assert_allclose(float(value), want, rtol=1e-4)


def test_grpo_kl_beta_reaches_the_loss(plain_logps):
    """kl_beta with reference log-probs 0.3 below the policy's on every token: the k3 KL is
    exp(-0.3) + 0.3 - 1 a token, added as beta * KL to the token-mean loss."""
    stage = grpo_stage(kl_beta=0.04)
    rows = stage.method.rows(stage, rollouts(GRPO_EPISODES, [0, 1], research_run())).policy
    del rows["old_logps"]
    model = tiny_model()
    rows["ref_logps"] = (
        plain_logps(model, rows["input_ids"], rows["loss_mask"]) - 0.3 * rows["loss_mask"]
    ).astype(np.float32)
    value, metrics = loss_of(stage, model, rows)
    kl = np.exp(-0.3) + 0.3 - 1
    # On-policy, each group's advantages sum to 0: the loss is the KL term alone (up to
    # the float32 rounding of that sum, ~1e-7 against 1.6e-3).
    np.testing.assert_allclose(float(value), 0.04 * kl, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl_mean"]), kl, rtol=1e-3)


# --- GRAO -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["Which syndrome? Which gene? Marfan syndrome FBN1 answer search"] * 20
    return tokenizer_lib.train_bpe(corpus, 300)


def expert_chat(question, answer, calls):
    return {
        "id": question["id"], "question": question["question"], "hops": question["hops"],
        "answer_name": answer, "answer_aliases": question["answer"]["aliases"],
        "num_tool_calls": calls,
        "messages": [
            {"role": "system", "content": "You research."},
            {"role": "user", "content": question["question"]},
            {"role": "assistant", "content": f"<answer>{answer}</answer>"},
        ],
    }  # fmt: skip


# Expert chats: q0 answered after 1 call (R(y) = 1.1), q1 after 12 calls (1.1 - 0.1).
CHATS = [expert_chat(QUESTIONS[0], "Marfan syndrome", 1), expert_chat(QUESTIONS[1], "FBN1", 12)]


def grao_rows(tokenizer, **loss_options):
    stage = stages.RLStage(
        algorithm="grao", prompts_per_step=2, num_generations=2,
        loss=functools.partial(losses.grao_loss, **loss_options) if loss_options else None,
    )  # fmt: skip
    # The step drew q1 then q0; episodes question-major in that order.
    trajs = [
        episode(20, 3, 2, answer="FBN1"),  # q1, correct: 1.1.
        episode(21, 3, 3, finish="no_answer"),  # q1: 0.
        episode(22, 4, 2, answer="MFS"),  # q0, correct by alias: 1.1.
        episode(23, 4, 1, answer="FBN1", calls=11),  # q0, wrong, 1 call over: 0.1 - 0.05.
    ]
    run = research_run(data=types.SimpleNamespace(chats=CHATS), tokenizer=tokenizer)
    return stage, stage.method.rows(stage, rollouts(trajs, [1, 0], run))


def test_grao_rows_by_hand(tokenizer):
    """Catches a reference answer paired with the wrong question (the picked order), its
    reward or mask wrong, sample rewards out of episode order."""
    _, rows = grao_rows(tokenizer)
    batch = rows.policy
    np.testing.assert_allclose(batch["rewards"], [1.1, 0.0, 1.1, 0.05], rtol=1e-6)
    np.testing.assert_allclose(batch["ref_rewards"], [1.0, 1.1], rtol=1e-6)
    assert batch["input_ids"][:, 0].tolist() == [20, 21, 22, 23]
    assert batch["loss_mask"].sum(axis=1).tolist() == [2, 3, 2, 1]
    assert "old_logps" not in batch and "advantages" not in batch
    # Each reference row holds its question's expert chat; only the answer is trained on.
    for row, chat in zip(range(2), [CHATS[1], CHATS[0]], strict=True):
        n = int(batch["ref_attention_mask"][row].sum())
        text = tokenizer.decode(batch["ref_input_ids"][row, :n])
        assert chat["question"] in text and text.startswith("<|im_start|>system\nYou research.")
        trained = batch["ref_input_ids"][row][batch["ref_loss_mask"][row] > 0]
        assert tokenizer.decode(trained) == chat["messages"][2]["content"]
    assert rows.stats["reference/reward_mean"] == pytest.approx(1.05)


@pytest.mark.parametrize("in_group", [True, False])
def test_grao_loss_on_the_rows_equals_the_paper_equation(tokenizer, in_group, plain_logps):
    """GRAO's loss on its rows against Eq. 3 written loop by loop (test_grao.grao_numpy) on
    log-probs from plain forwards: catches samples and references swapped, a wrong G, the
    loss's options not reaching it."""
    stage, rows = grao_rows(tokenizer, reference_in_group=in_group)
    batch = rows.policy
    model = tiny_model(vocab_size=len(tokenizer), seed=1)
    value, _ = loss_of(stage, model, batch)
    samples = plain_logps(model, batch["input_ids"], batch["loss_mask"])
    answers = plain_logps(model, batch["ref_input_ids"], batch["ref_loss_mask"])
    want, _, _ = grao_numpy(
        samples, batch["loss_mask"], batch["rewards"], answers, batch["ref_loss_mask"],
        batch["ref_rewards"], 2, 0.5, 0.6, 1e-6, in_group,
    )  # fmt: skip
    np.testing.assert_allclose(float(value), want, rtol=1e-4)


# --- M-GRPO -----------------------------------------------------------------------------------


def sub(first, ok):
    return episode(first, 2, 2, answer="x" if ok else None, finish="answer" if ok else "no_answer")


# Two questions x K=2 rollouts; every rollout that delegates makes exactly d = 2 calls, so
# alignment keeps each one's own sub-trajectories, in call order.
MGRPO_EPISODES = [
    episode(30, 4, 2, answer="Marfan syndrome", subs=[sub(40, True), sub(41, False)]),
    episode(31, 4, 3, answer="FBN1", subs=[sub(42, True), sub(43, True)]),
    episode(32, 3, 2, answer="FBN1", errors=1),  # Delegated nothing.
    episode(33, 3, 1, answer="FBN1", subs=[sub(44, True), sub(45, False)]),
]
# R_M = 0.1 format + 0.9 correct when well formed, else 0: 1.0, 0.1 | 0, 1.0. Population std.
MAIN_ADVANTAGES = np.array([0.45 / (0.45 + 1e-6), -0.45 / (0.45 + 1e-6),
                            -0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6)])  # fmt: skip
# R_S = 0.1 own format + 0.9 its main's correctness when well formed, else 0, pooled over a
# question's d x K rows (padding left out): q0 [1.0, 0, 0.1, 0.1] (mean 0.3, variance
# 0.165), q1 [1.0, 0] (the correct but malformed main delegated nothing).
SUB_ADVANTAGES = np.concatenate([
    np.array([0.7, -0.3, -0.2, -0.2]) / (np.sqrt(0.165) + 1e-6),
    [0.0, 0.0],
    np.array([0.5, -0.5]) / (0.5 + 1e-6),
])  # fmt: skip


def mgrpo_rows(**stage_options):
    stage = stages.RLStage(
        algorithm="mgrpo", prompts_per_step=2, num_generations=2, **stage_options
    )
    return stage.method.rows(stage, rollouts(MGRPO_EPISODES, [0, 1], research_run()))


def test_mgrpo_rows_with_one_shared_model_by_hand():
    """One model plays both agents: the main rows, then the aligned sub rows, one batch.
    Catches main and sub advantages swapped or negated, the pooled groups wrong, padding
    rows trained, the sub rows out of call order."""
    rows = mgrpo_rows()
    assert rows.sub is None
    batch = rows.policy
    assert batch["input_ids"][:, 0].tolist() == [30, 31, 32, 33, 40, 41, 42, 43, PAD, PAD, 44, 45]
    np.testing.assert_allclose(
        batch["advantages"], np.concatenate([MAIN_ADVANTAGES, SUB_ADVANTAGES]), rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip
    assert batch["loss_mask"].sum(axis=1).tolist() == [2, 3, 2, 1, 2, 2, 2, 2, 0, 0, 2, 2]
    assert rows.stats["main/reward_mean"] == pytest.approx(2.1 / 4)
    assert rows.stats["sub/reward_mean"] == pytest.approx(2.2 / 6)
    assert rows.stats["sub/rollouts_without_subs"] == 1 and rows.stats["sub/target_count"] == 2


@pytest.mark.parametrize("train_sub", [True, False])
def test_mgrpo_rows_with_two_models_by_hand(train_sub):
    """Distinct models: the main rows train the policy, the sub rows the sub-agent (none
    when it is frozen)."""
    rows = mgrpo_rows(shared_model=False, train_sub=train_sub)
    np.testing.assert_allclose(rows.policy["advantages"], MAIN_ADVANTAGES, rtol=1e-5)
    assert rows.policy["input_ids"][:, 0].tolist() == [30, 31, 32, 33]
    if not train_sub:
        assert rows.sub is None
        return
    np.testing.assert_allclose(rows.sub["advantages"], SUB_ADVANTAGES, rtol=1e-5, atol=1e-6)
    assert rows.sub["input_ids"][:, 0].tolist() == [40, 41, 42, 43, PAD, PAD, 44, 45]


@pytest.mark.parametrize("ratio_level", ["token", "trajectory"])
def test_mgrpo_loss_on_the_rows_by_hand(ratio_level, plain_logps):
    """M-GRPO's loss (clip 0.2 / 0.28, as released) on the shared rows, off-policy by known
    log-ratios: each row's token mean of the clipped surrogate, averaged over all 12 rows,
    the 2 padding rows as zeros (the fixed 1 / (d K) of Eq. 16, and TRL's mean over B);
    "trajectory" takes one ratio per row, exp of its summed log-ratios (Eq. 15)."""
    loss = functools.partial(losses.mgrpo_policy_loss, ratio_level=ratio_level)
    stage = stages.RLStage(algorithm="mgrpo", prompts_per_step=2, num_generations=2, loss=loss)
    rows = mgrpo_rows().policy
    lengths = rows["loss_mask"].sum(axis=1)
    log_ratios = np.resize(LOG_RATIOS, lengths.sum())
    model = tiny_model()
    value, _ = loss_of(stage, model, off_policy(rows, model, plain_logps, log_ratios))
    adv = np.concatenate([MAIN_ADVANTAGES, SUB_ADVANTAGES])
    terms = surrogate_terms(adv, lengths, log_ratios, ratio_level, eps_high=0.28)
    want = sum(t.mean() for t in terms if len(t)) / 12
    np.testing.assert_allclose(float(value), want, rtol=1e-4)
