"""MedDialogRubrics as an RL task: the policy is the doctor.

The doctor interviews the knowledge-grounded patient (`envs.patient.KnowledgePatient`) of a
synthetic case (`med_dialog_rubrics`), one question per turn, says "End Inquiry" and gives a
diagnosis in `<answer>` (`eval.dialogue.doctor_agent`, the benchmark's own agent). The reward
of an interview is the benchmark's score:

    R = coverage_weight * weighted rubric coverage + diagnosis_weight * diagnosis correct

(coverage = the priority-weighted share of the case's must-ask items that the doctor's
questions meet, `eval.dialogue.score_case`). The expert is a scripted doctor of the
benchmark run through the same agent and budgets: "oracle" asks the rubric items by priority
and names the disease (it reads the rubric, which the policy never sees), "checklist" goes
through a generic history checklist. Its interviews are the SFT chats and GRAO's reference
answers.

    task = ConsultationTask(dataset="med_dialog_rubrics/tiny", max_turns=6)
    train_lib.train(run_dir, task=task, model=..., stages=[SFTStage(), RLStage("grao")])
"""

import dataclasses
import functools
import types
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from medjax import agents
from medjax.envs import patient as patient_lib
from medjax.eval import dialogue
from medjax.sampling import SamplingParams
from medjax.training import rl

EXPERTS = ("oracle", "checklist", "random")


@functools.cache
def _knowledge():
    """The HPO graph and its concept matcher (seconds to build), once per process."""
    from medjax.datasets import med_dialog_rubrics

    graph = med_dialog_rubrics.knowledge_graph()
    return graph, patient_lib.ConceptMatcher(graph)


@dataclasses.dataclass
class ConsultationEnvironment:
    """The graph, the patient and the judge, shared by every interview."""

    graph: Any
    patient: patient_lib.KnowledgePatient
    judge: dialogue.RubricJudge
    benchmark: list[dialogue.BenchmarkCase] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class ConsultationTask:
    """The doctor's task as the trainer runs it: cases, interview budgets and reward.

    Attributes:
      dataset: the `med_dialog_rubrics` config the cases come from.
      data_dir: the TFDS folder (built there on first use); None: TFDS's default.
      eval_split: held-out cases for evaluation ("validation" or "test").
      num_train_cases: train on the first N training cases (None: all).
      num_eval_questions: evaluate on the first N held-out cases (None: all).
      max_turns: questions before the doctor is asked for the diagnosis.
      max_new_tokens: tokens per question.
      final_turn_tokens: tokens of the diagnosis turn.
      max_context_tokens: the longest an interview may grow (None: unlimited).
      temperature: sampling temperature of rollouts (log-probs are taken at it).
      top_p: nucleus sampling of rollouts.
      expert: the scripted doctor whose interviews are the SFT chats and GRAO's references:
        "oracle", "checklist" or "random" (`eval.dialogue.BASELINES`); a tuple mixes them,
        case i taking expert[i % len(expert)].
      coverage_weight: weight of the weighted rubric coverage in the reward.
      diagnosis_weight: weight of a correct diagnosis in the reward.
    """

    dataset: str = "med_dialog_rubrics/tiny"
    data_dir: str | None = None
    eval_split: str = "validation"
    num_train_cases: int | None = None
    num_eval_questions: int | None = None
    max_turns: int = 8
    max_new_tokens: int = 32
    final_turn_tokens: int = 32
    max_context_tokens: int | None = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    expert: str | tuple[str, ...] = "oracle"
    coverage_weight: float = 1.0
    diagnosis_weight: float = 0.0

    # Patient replies are short; nothing is cut (the trainer's chat_ids reads this).
    max_observation_chars = None
    roles = (None,)
    result_keys: ClassVar[Mapping[str, str]] = types.MappingProxyType(
        {
            "mean_reward": "mean reward of the interviews (coverage_weight * coverage +"
            " diagnosis_weight * a correct diagnosis)",
            "coverage": "weighted rubric coverage: the weights of the must-ask items the doctor's"
            " turns met over the total weight",
            "precision": "share of the doctor's questions that met at least one rubric item",
            "recall": "share of the rubric items met",
            "diagnosis_accuracy": "share of cases whose <answer> matches the disease's name or an"
            " alias",
            "turns": "mean questions asked per interview",
            "expert_nll": "token-mean negative log-likelihood of the scripted expert's interviews"
            " of the same held-out cases (lower: closer to the expert)",
        }
    )

    def __post_init__(self):
        name = self.dataset.partition("/")[0]
        if name != "med_dialog_rubrics":
            raise ValueError(
                f"ConsultationTask.dataset {self.dataset!r}: expected med_dialog_rubrics[/config]."
            )
        experts = (self.expert,) if isinstance(self.expert, str) else tuple(self.expert)
        if not experts or any(e not in EXPERTS for e in experts):
            raise ValueError(f"ConsultationTask.expert {self.expert!r} is not one of {EXPERTS}.")

    # -- data ------------------------------------------------------------------------------

    def environment(self) -> ConsultationEnvironment:
        graph, matcher = _knowledge()
        return ConsultationEnvironment(
            graph, patient_lib.KnowledgePatient(graph, matcher),
            dialogue.RubricJudge(graph, matcher),
        )  # fmt: skip

    def load(self, env: ConsultationEnvironment) -> rl.TaskData:
        """Training cases with the expert's interview of each, and the held-out cases."""
        from medjax import datasets
        from medjax.datasets import med_dialog_rubrics

        def cases(split, limit):
            source = datasets.load(self.dataset, split, self.data_dir)
            examples = [med_dialog_rubrics.to_case(source[i]) for i in range(len(source))]
            return dialogue.cases_from_dataset(env.graph, examples[:limit])

        train, held_out = (
            cases("train", self.num_train_cases),
            cases(self.eval_split, self.num_eval_questions),
        )
        env.benchmark = train + held_out
        trajs, scores = self._expert_interviews(env, train)
        chats = [
            {"messages": t.messages, "reward": self._reward(s)}
            for t, s in zip(trajs, scores, strict=True)
        ]
        return rl.TaskData(chats, train, held_out)

    def _expert_interviews(self, env, records):
        experts = (self.expert,) if isinstance(self.expert, str) else tuple(self.expert)
        trajs = [None] * len(records)
        for k, name in enumerate(experts):
            mine = records[k :: len(experts)]
            doctor = dialogue.BASELINES[name](mine, env.graph)
            agent = self._agent(env, doctor, greedy=True)
            trajs[k :: len(experts)] = agents.run_episodes(agent, dialogue.queries(mine))
        return trajs, self._scores(env, trajs, records, 1)

    def expert_chats(
        self, env: ConsultationEnvironment, records: Sequence[dialogue.BenchmarkCase]
    ) -> list[list[dict[str, str]]]:
        """The expert doctor's interview of each case, under the policy's own budgets."""
        return [t.messages for t in self._expert_interviews(env, records)[0]]

    def sft_chats(self, env, chats, role: str | None) -> list[list[dict[str, str]]]:
        if role is not None:
            raise ValueError(f"ConsultationTask: SFTStage.role {role!r}: the doctor has no roles.")
        return [list(c["messages"]) for c in chats]

    # -- episodes and rewards --------------------------------------------------------------

    def _agent(self, env, backend, *, greedy: bool) -> agents.AgentSpec:
        sampling = SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, greedy=greedy,
        )  # fmt: skip
        return dialogue.doctor_agent(
            backend, env.benchmark, env.patient, max_turns=self.max_turns, sampling=sampling,
            max_context_tokens=self.max_context_tokens, final_turn_tokens=self.final_turn_tokens,
        )  # fmt: skip

    def rollout(self, env, backend, records, *, num_generations: int, **hierarchy):
        """G interviews per case, case-major."""
        if hierarchy.get("hierarchical"):
            raise ValueError("ConsultationTask: M-GRPO needs the research task's sub-agent.")
        agent = self._agent(env, backend, greedy=False)
        return agents.run_episodes(agent, dialogue.queries(records), num_rollouts=num_generations)

    def _scores(self, env, trajs, records, num_generations: int) -> list[dict[str, Any]]:
        return [
            dialogue.score_case(env.judge, records[i // num_generations], t, self.max_turns)
            for i, t in enumerate(trajs)
        ]

    def _reward(self, score: dict[str, Any]) -> float:
        return self.coverage_weight * score["coverage"] + self.diagnosis_weight * float(
            score["diagnosis_correct"]
        )

    def score(self, env, trajs, records, num_generations: int):
        """(rewards [N] float32, the step's reward statistics)."""
        scores = self._scores(env, trajs, records, num_generations)
        rewards = np.array([self._reward(s) for s in scores], np.float32)
        summary = dialogue.summarise(scores)
        stats = {
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            **{f"reward/{k}": float(summary[k]) for k in
               ("coverage", "precision", "recall", "diagnosis_accuracy", "turns")},
            "reward/answered": float(np.mean([t.answer is not None for t in trajs])),
        }  # fmt: skip
        return rewards, stats

    def reference_reward(self, chat) -> float:
        """GRAO's R(y): the reward of the expert's own interview (scored in `load`)."""
        return chat["reward"]

    def evaluate(self, env, backend, records, **hierarchy) -> dict[str, Any]:
        """Greedy interviews of the held-out cases: the benchmark's summary and mean reward."""
        if hierarchy.get("hierarchical"):
            raise ValueError("ConsultationTask: the doctor has no sub-agent to evaluate.")
        trajs = agents.run_episodes(
            self._agent(env, backend, greedy=True), dialogue.queries(records)
        )
        scores = self._scores(env, trajs, records, 1)
        summary = dialogue.summarise(scores)
        summary["mean_reward"] = float(np.mean([self._reward(s) for s in scores]))
        summary["answered"] = float(np.mean([t.answer is not None for t in trajs]))
        summary["format_errors"] = float(np.mean([t.format_errors for t in trajs]))
        summary["episodes"] = [
            {"case_id": s["case_id"], "coverage": s["coverage"], "answer": s["answer"],
             "diagnosis_correct": bool(s["diagnosis_correct"]), "turns": s["turns"]}
            for s in scores
        ]  # fmt: skip
        return summary
