"""Each algorithm (SFT, GRPO, GRAO, M-GRPO) moves a tiny policy the way its reward says, run
through `train_lib.train` as a user runs it: rollouts, the algorithm's rows, scoring,
updates, checkpoints and evaluation are all the trainer's own.

The task: reply to a question; the reward is 1 when the reply's first token is a lowercase
letter (26 of the tokenizer's ~300 ids: about 9% of a random policy's mass). The measure is
that mass, P(letter first), averaged over held-out questions from a plain forward of the
policy, before and after training. A step that trained against its advantages lowers it
instead, and each test fails then: checked by hand with the signs flipped in
`rl.grpo_batch`, `rl.grao_batch` (the samples' and the reference's rewards; the samples'
alone for "grao-samples-only"), `rl.mgrpo_main_batch` (two models) or both M-GRPO batches
(one shared model), and `steps.sft_loss_fn`.
"""

import dataclasses
import functools
import string
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import agents, losses, train_lib
from medjax.envs import research
from medjax.models import ModelConfig
from medjax.models import tokenizer as tokenizer_lib
from medjax.sampling import SamplingParams
from medjax.training import optim, rl
from medjax.training.task import TaskData

pytestmark = pytest.mark.slow

TINY = ModelConfig(
    family="qwen2", vocab_size=0, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=2, num_kv_heads=1, qkv_bias=True, tie_word_embeddings=True,
)  # fmt: skip
QUESTIONS = [f"question {i}?" for i in range(12)]


def letter_ids(tokenizer) -> np.ndarray:
    return np.array([tokenizer.convert_tokens_to_ids(c) for c in string.ascii_lowercase])


@dataclasses.dataclass(frozen=True)
class FirstLetterTask:
    """The `training.task.Task` above, with M-GRPO's `sub_agent` and `reward`: the main agent
    is right ("yes") when its own reply and its one sub-agent's both start with a letter;
    the sub-agent's episode is well formed when its reply does. The expert replies
    `expert_reply` (SFT's chats, GRAO's reference answers)."""

    expert_reply: str = "a"
    dataset: str = "first_letter"
    eval_split: str = "validation"
    num_eval_questions: int | None = None
    max_observation_chars: int | None = None
    temperature: float = 1.0
    reward: research.RewardConfig = dataclasses.field(default_factory=research.RewardConfig)
    roles = (None,)
    result_keys = types.MappingProxyType(
        {
            "p_letter": "mean probability that the reply starts with a lowercase letter",
            "p_letter_sub": "the same for the sub-agent (M-GRPO) on its own prompts",
        }
    )

    def environment(self):
        return None

    def load(self, env) -> TaskData:
        chats = [self._chat(q, self.expert_reply) for q in QUESTIONS[:8]]
        records = [
            {"id": f"q{i}", "question": q, "answer": {"name": "yes", "aliases": ["yes"]}}
            for i, q in enumerate(QUESTIONS[:8])
        ]
        return TaskData(chats, records, [{"question": q} for q in QUESTIONS[8:]])

    @staticmethod
    def _chat(question, reply):
        return {
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": reply}],
        }  # fmt: skip

    def sft_chats(self, env, chats, role):
        return [c["messages"] for c in chats]

    def sub_agent(self, env, backend, *, greedy=False):
        return None

    def _episodes(self, backend, questions, num_generations, agent):
        chats = [[{"role": "user", "content": q}] for q in questions]
        prompts = backend.encode(chats)
        params = SamplingParams(max_new_tokens=2, temperature=self.temperature)
        replies = backend.generate(chats, params, num_samples=num_generations)
        letters = set(letter_ids(backend.tokenizer).tolist())
        out = []
        for i, reply in enumerate(replies):
            prompt, ids = prompts[i // num_generations], reply.token_ids
            first = ids[0] in letters
            out.append(agents.Trajectory(
                f"q{i // num_generations}", i % num_generations, agent,
                token_ids=prompt + ids, loss_mask=[0] * len(prompt) + [1] * len(ids),
                logps=[0.0] * len(prompt) + list(reply.logps),
                turns=[agents.Turn(reply.text, num_tokens=len(ids))],
                answer="yes" if first else "no", finish_reason="answer" if first else "no_answer",
            ))  # fmt: skip
        return out

    def rollout(self, env, backend, records, *, num_generations, sub_backend=None,
                hierarchical=False, remote_sub_agent=None):  # fmt: skip
        questions = [r["question"] for r in records]
        mains = self._episodes(backend, questions, num_generations, "main")
        if not hierarchical:
            return mains
        subs = self._episodes(sub_backend or backend, [f"sub {q}" for q in questions],
                              num_generations, "searcher")  # fmt: skip
        for main, s in zip(mains, subs, strict=True):
            right = main.answer == "yes" and s.finish_reason == "answer"
            main.answer, main.finish_reason = ("yes" if right else "no"), "answer"
            main.sub_trajectories = [s]
        return mains

    def score(self, env, trajs, records, num_generations):
        rewards = np.array([t.finish_reason == "answer" for t in trajs], np.float32)
        return rewards, {"reward/mean": float(rewards.mean()), **rl.episode_stats(trajs)}

    def reference_reward(self, chat):
        return float(chat["messages"][-1]["content"][0] in string.ascii_lowercase)

    def evaluate(self, env, backend, records, *, sub_backend=None, hierarchical=False):
        subs = [{"question": f"sub {r['question']}"} for r in records]
        return {
            "p_letter": p_letter(backend.model, backend.tokenizer, records),
            "p_letter_sub": p_letter((sub_backend or backend).model, backend.tokenizer, subs),
        }

    def expert_chats(self, env, records):
        return [self._chat(r["question"], self.expert_reply)["messages"] for r in records]


@nnx.jit
def last_logits(model, ids):
    return model(ids)[:, -1]


def p_letter(model, tokenizer, records) -> float:
    """Mean over records of P(first reply token is a letter), from a plain forward."""
    letters = letter_ids(tokenizer)
    total = 0.0
    for r in records:
        chat = [{"role": "user", "content": r["question"]}]
        ids = tokenizer_lib.apply_chat_template(tokenizer, chat, tokenize=True)
        logits = last_logits(model, jnp.asarray([ids]))[0]
        total += float(jax.nn.softmax(logits)[letters].sum())
    return total / len(records)


def train(tmp_path, *stages, task=FirstLetterTask()):
    results = train_lib.train(
        str(tmp_path / "run"), stages=list(stages), task=task, model=TINY,
        tokenizer_vocab_size=300, mesh_shape=(-1, 1, 1), interactive=False,
    )  # fmt: skip
    return results["before"], results[f"after_{stages[-1].name}"]


ADAM = functools.partial(optim.make_optimizer, 6e-2)
RL = dict(steps=10, prompts_per_step=8, num_generations=4, optimizer=ADAM, save_every=100)


def test_sft_raises_the_experts_first_token(tmp_path):
    """SFT on replies "a": P(letter first) from ~0.09 to above 0.5 in 10 steps."""
    before, after = train(tmp_path, train_lib.SFTStage(steps=10, batch_size=8, optimizer=ADAM))
    assert before["p_letter"] < 0.2 and after["p_letter"] > 0.5, (before, after)


WITHOUT_IMITATION = functools.partial(losses.grao_loss, use_imitation=False)


@pytest.mark.parametrize(
    "algorithm,options,expert",
    [
        ("grpo", {}, "a"),
        ("grao", {}, "a"),
        # The expert's "1" is not paid (R(y) = 0): only the samples' advantages can pass.
        # (With the imitation term on, GRAO pushes such a y down without bound and the tiny
        # policy's letters collapse too: P(letter) 0.09 -> 0.0004.)
        ("grao", {"loss": WITHOUT_IMITATION}, "1"),
        ("mgrpo", {}, "a"),
        ("mgrpo", {"shared_model": False}, "a"),
    ],
    ids=["grpo", "grao", "grao-samples-only", "mgrpo-shared", "mgrpo-two-models"],
)
def test_rl_raises_the_rewarded_mass(tmp_path, algorithm, options, expert):
    """10 RL steps of 8 questions x G=4: P(letter first) from ~0.09 to above 0.5 (it
    reaches 0.96-1.0; with the advantages' signs flipped it ends at 0.04 or below), for
    M-GRPO the sub-agent's too."""
    stage = train_lib.RLStage(algorithm=algorithm, **RL, **options)
    before, after = train(tmp_path, stage, task=FirstLetterTask(expert_reply=expert))
    keys = ["p_letter", "p_letter_sub"] if algorithm == "mgrpo" else ["p_letter"]
    for key in keys:
        assert before[key] < 0.2 and after[key] > 0.5, (key, before, after)
