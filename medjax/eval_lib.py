"""Evaluations behind `run_eval.py`, callable from a notebook as they are.

    from medjax import eval_lib
    summary = eval_lib.evaluate("research", checkpoint="/ckpt/qwen2.5-0.5b-instruct",
                                num_questions=50, out_dir="/tmp/eval")
    summary = eval_lib.evaluate("dialogue", doctors="random,checklist,oracle", cases=20)

Two tasks:
- "research": the researcher agent (`medjax.eval.research`) on the questions of a
  `med_kg_qa` split, the policy a local Hugging Face folder (`checkpoint`) or an
  OpenAI-compatible endpoint (`endpoint` + `model`, API key from $OPENAI_API_KEY); writes
  `report.json` (summary, run settings and every episode) and `report.md`.
- "dialogue": the MedDialogRubrics benchmark (`medjax.eval.dialogue`): each doctor of
  `doctors` interviews the synthetic cases (or a `med_dialog_rubrics` config, or the
  released .xlsx with an LLM patient and judge panel); writes the per-doctor transcripts,
  `summary.json`, `report.md` and plots.

A backend spec (dialogue doctors, patient and judges) is `openai:BASE_URL:MODEL` or
`checkpoint:DIR`; doctors may also be the scripted baselines `random`, `checklist`, `oracle`.

Bad options raise `EvalError`; a checkpoint folder that is missing or cannot be loaded raises
`CheckpointError` naming it. Both are `ValueError`s, which `run_eval.py` turns into a
one-line message.
"""

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from medjax.models.checkpoint import CheckpointError

TASKS = ("research", "dialogue")
# Policy turns per episode when `max_turns` is None: the researcher's default budget, and
# the dialogue benchmark's 12 questions (the length of its coverage-by-turn curve).
DEFAULT_MAX_TURNS = {"research": 8, "dialogue": 12}

__all__ = ["TASKS", "CheckpointError", "EvalError", "evaluate", "make_backend"]


class EvalError(ValueError):
    """An evaluation option that cannot work (unknown task, backend spec, dataset, ...)."""


def evaluate(
    task: str = "research",
    *,
    out_dir: str = "eval_out",
    checkpoint: str | None = None,
    endpoint: str | None = None,
    model: str | None = None,
    dataset: str = "med_kg_qa/tiny",
    split: str = "test",
    data_dir: str | None = None,
    num_questions: int | None = None,
    num_rollouts: int = 1,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    max_turns: int | None = None,
    max_context_tokens: int | None = None,
    hierarchical: bool = False,
    reward_config=None,
    seed: int = 0,
    cases: int = 20,
    doctors: str = "random,checklist,oracle",
    config: str | None = None,
    xlsx: str | None = None,
    patient: str | None = None,
    judges: str | None = None,
    voting: str = "majority",
    operative_config: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """Runs one evaluation and writes its report to `out_dir`.

    Args:
      task: "research" or "dialogue".
      out_dir: the report folder, created if needed.
      checkpoint: research: the policy, a Hugging Face folder (config.json, safetensors,
        tokenizer files with a chat template).
      endpoint, model: research: the policy, an OpenAI-compatible server's base URL
        ("http://127.0.0.1:8000/v1") and model name; exclusive with `checkpoint`.
      dataset: research: a `med_kg_qa` config ("med_kg_qa/tiny", "med_kg_qa").
      split: the dataset split (research; dialogue with `config`).
      data_dir: the TFDS data folder; the dataset is built there when missing.
      num_questions: research: evaluate the first N questions of the split (None: all).
      num_rollouts: research: episodes per question.
      greedy, temperature, max_new_tokens: research: per-turn sampling (`max_new_tokens` also
        bounds the forced final turn).
      max_turns: policy turns per episode (the main agent's when hierarchical); None:
        `DEFAULT_MAX_TURNS[task]`.
      max_context_tokens: research, checkpoint policy: the longest an episode may grow.
      hierarchical: research: M-GRPO's main agent delegating to a sub-agent (same policy).
      reward_config: research: a `research.RewardConfig`; None: its defaults.
      seed: the sampler's seed (research, checkpoint) / the synthetic cases' (dialogue).
      cases: dialogue: how many synthetic cases (without `config` or `xlsx`).
      doctors: dialogue: comma-separated doctors (baselines or backend specs).
      config: dialogue: take the cases from this `med_dialog_rubrics` config ("tiny").
      xlsx: dialogue: the released MedDialogRubrics .xlsx (needs `patient` and `judges`).
      patient: dialogue: the LLM patient's backend spec (with `xlsx`).
      judges: dialogue: comma-separated backend specs of an LLM judge panel.
      voting: dialogue: the panel's rule ("majority", "unanimous", "liberal").
      operative_config: returns the configuration text to save as
        `out_dir/operative_config.gin` (run_eval passes `gin.operative_config_str`).

    Returns:
      The summary: research, `medjax.eval.research.evaluate`'s metrics without the episodes;
      dialogue, {doctor: `dialogue.summarise` metrics}.

    Raises:
      EvalError: an unknown task, dataset or backend spec; no policy, or two.
      CheckpointError: a checkpoint folder that is missing or cannot be loaded.
    """
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}.")
    turns = DEFAULT_MAX_TURNS[task] if max_turns is None else max_turns
    if task == "research":
        summary = _research(
            out_dir=out_dir, checkpoint=checkpoint, endpoint=endpoint, model=model,
            dataset=dataset, split=split, data_dir=data_dir, num_questions=num_questions,
            num_rollouts=num_rollouts, greedy=greedy, temperature=temperature,
            max_new_tokens=max_new_tokens, max_turns=turns,
            max_context_tokens=max_context_tokens, hierarchical=hierarchical,
            reward_config=reward_config, seed=seed,
        )  # fmt: skip
    else:
        summary = _dialogue(
            out_dir=out_dir, cases=cases, doctors=doctors, config=config, split=split,
            data_dir=data_dir, xlsx=xlsx, patient=patient, judges=judges, voting=voting,
            max_turns=turns, seed=seed,
        )  # fmt: skip
    if operative_config is not None:
        (pathlib.Path(out_dir) / "operative_config.gin").write_text(operative_config())
    return summary


# -- backends -------------------------------------------------------------------------------


def load_policy(path: str | os.PathLike, *, seed: int = 0):
    """A `JaxPolicyBackend` of the Hugging Face folder `path` (weights and tokenizer) or of
    a GGUF file.

    Raises:
      CheckpointError: `path` is neither a folder nor a .gguf file, lacks config.json or
        tokenizer files, or its tensors do not match its config; the message names it.
    """
    from medjax.llm import JaxPolicyBackend
    from medjax.models import checkpoint as checkpoint_lib
    from medjax.models import tokenizer as tokenizer_lib

    if not (pathlib.Path(path).is_dir() or checkpoint_lib.is_gguf(path)):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a directory; expected a Hugging Face model folder"
            " (config.json, *.safetensors, tokenizer files) or a .gguf file."
        )
    try:
        model = checkpoint_lib.from_pretrained(path)
        tokenizer = tokenizer_lib.load_tokenizer(path)
    except FileNotFoundError as e:  # No config.json, or no tokenizer files.
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from e
    return JaxPolicyBackend(model, tokenizer, seed=seed)


def make_backend(spec: str, *, seed: int = 0) -> tuple[str, Any]:
    """(name, backend) of `openai:BASE_URL:MODEL` ("openai-MODEL") or `checkpoint:PATH`, a
    Hugging Face folder or GGUF file ("checkpoint-" and the folder's or file's name).

    Raises:
      EvalError: another kind of spec, or an openai spec without a URL or model.
      CheckpointError: see `load_policy`.
    """
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        from medjax.llm import OpenAICompatibleBackend

        base_url, _, model = rest.rpartition(":")
        if not base_url or not model:
            raise EvalError(f"backend {spec!r}: expected openai:BASE_URL:MODEL.")
        return f"openai-{model}", OpenAICompatibleBackend(base_url, model)
    if kind == "checkpoint":
        name = f"checkpoint-{os.path.basename(os.path.normpath(rest))}"
        return name, load_policy(rest, seed=seed)
    raise EvalError(
        f"unknown backend {spec!r}; use random/checklist/oracle (doctors),"
        " openai:BASE_URL:MODEL or checkpoint:DIR."
    )


def _policy(checkpoint: str | None, endpoint: str | None, model: str | None, seed: int):
    if (checkpoint is None) == (endpoint is None):
        raise EvalError(
            "research: give the policy as exactly one of checkpoint (a Hugging Face folder)"
            " or endpoint (an OpenAI-compatible base URL, with model)."
        )
    if checkpoint is not None:
        return load_policy(checkpoint, seed=seed)
    if not model:
        raise EvalError(f"research: endpoint {endpoint!r} needs a model name.")
    from medjax.llm import OpenAICompatibleBackend

    return OpenAICompatibleBackend(endpoint, model)


def _check_dataset(name: str, data_dir: str | None) -> None:
    from medjax import datasets

    try:
        datasets.builder(name, data_dir=data_dir)
    except ValueError as e:  # An unknown dataset or config, naming the known ones.
        raise EvalError(str(e)) from e


# -- research ---------------------------------------------------------------------------------


def _research(
    *, out_dir, checkpoint, endpoint, model, dataset, split, data_dir, num_questions,
    num_rollouts, greedy, temperature, max_new_tokens, max_turns, max_context_tokens,
    hierarchical, reward_config, seed,
) -> dict[str, Any]:  # fmt: skip
    from medjax import datasets
    from medjax.datasets import med_kg_qa

    if dataset.partition("/")[0] != "med_kg_qa":
        raise EvalError(f"research: dataset {dataset!r} is not a med_kg_qa config.")
    _check_dataset(dataset, data_dir)
    if num_questions is not None and num_questions < 1:
        raise EvalError(f"research: num_questions={num_questions} must be >= 1 (or None).")
    # The policy before the dataset and index: a bad checkpoint fails in seconds.
    backend = _policy(checkpoint, endpoint, model, seed)

    from medjax.envs import research
    from medjax.eval import research as eval_research
    from medjax.sampling import SamplingParams

    source = datasets.load(dataset, split=split, data_dir=data_dir)
    count = len(source) if num_questions is None else min(num_questions, len(source))
    records = [med_kg_qa.to_record(source[i]) for i in range(count)]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy)
    agent_kwargs = {
        "max_turns": max_turns, "sampling": sampling, "final_turn_tokens": max_new_tokens,
        "max_context_tokens": max_context_tokens,
    }  # fmt: skip
    # The graph the dataset was synthesised from (built once per process).
    env = research.build_environment(med_kg_qa.knowledge_graph())
    report = eval_research.evaluate(
        env, backend, records, num_rollouts=num_rollouts,
        reward_config=reward_config or research.RewardConfig(), agent_kwargs=agent_kwargs,
        hierarchical=hierarchical,
    )  # fmt: skip
    settings = {
        "policy": checkpoint if checkpoint is not None else f"{endpoint} ({model})",
        "dataset": dataset, "split": split, "num_rollouts": num_rollouts, "greedy": greedy,
        "temperature": temperature, "max_new_tokens": max_new_tokens, "max_turns": max_turns,
        "max_context_tokens": max_context_tokens, "hierarchical": hierarchical, "seed": seed,
    }  # fmt: skip
    summary = {k: v for k, v in report.items() if k != "episodes"}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = {**summary, "settings": settings, "episodes": report["episodes"]}
    (out / "report.json").write_text(json.dumps(full, indent=1, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(_research_markdown(summary, settings))
    return summary


def _research_markdown(summary: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary["finish_reasons"].items()))
    lines = [
        "# Research QA report",
        "",
        f"Policy `{settings['policy']}` on {settings['dataset']} ({settings['split']}):"
        f" {summary['num_questions']} questions x {settings['num_rollouts']} rollouts.",
        "",
        "| accuracy | reward | format valid | tool calls | turns | tokens | format errors |",
        "|---|---|---|---|---|---|---|",
        f"| {summary['accuracy']:.3f} | {summary['mean_reward']:.3f} |"
        f" {summary['format_valid']:.3f} | {summary['mean_tool_calls']:.2f} |"
        f" {summary['mean_turns']:.2f} | {summary['mean_generated_tokens']:.1f} |"
        f" {summary['format_errors']:.2f} |",
        "",
        f"Finish reasons: {reasons}.",
        "",
    ]
    return "\n".join(lines)


# -- dialogue ---------------------------------------------------------------------------------


def _doctor(spec: str, benchmark, graph, seed: int):
    from medjax.eval import dialogue

    if spec in dialogue.BASELINES:
        if graph is None:
            raise EvalError(f"dialogue: the scripted doctor {spec!r} needs synthetic cases.")
        return spec, dialogue.BASELINES[spec](benchmark, graph)
    return make_backend(spec, seed=seed)


def _dialogue(
    *, out_dir, cases, doctors, config, split, data_dir, xlsx, patient, judges, voting,
    max_turns, seed,
) -> dict[str, Any]:  # fmt: skip
    from medjax.eval import dialogue

    patient_backend = judge = graph = None
    if judges:
        judge = dialogue.JudgePanel(
            [make_backend(s.strip(), seed=seed)[1] for s in judges.split(",")], voting
        )
    if xlsx:
        from medjax.datasets import meddialog_xlsx

        if not patient or judge is None:
            raise EvalError("dialogue: xlsx needs patient and judges (LLM backends).")
        benchmark = dialogue.cases_from_xlsx(meddialog_xlsx.load_xlsx(xlsx))
        patient_backend = dialogue.RecordPatient(make_backend(patient, seed=seed)[1], benchmark)
    else:
        from medjax.knowledge import graph as graph_lib
        from medjax.knowledge import hpo

        graph = graph_lib.KnowledgeGraph(hpo.load())
        if config:
            from medjax import datasets
            from medjax.datasets import med_dialog_rubrics

            _check_dataset(f"med_dialog_rubrics/{config}", data_dir)
            source = datasets.load(f"med_dialog_rubrics/{config}", split=split, data_dir=data_dir)
            examples = [med_dialog_rubrics.to_case(source[i]) for i in range(len(source))]
            benchmark = dialogue.cases_from_dataset(graph, examples)
        else:
            benchmark = dialogue.build_cases(graph, cases, seed=seed)
    results = {}
    for spec in doctors.split(","):
        name, doctor = _doctor(spec.strip(), benchmark, graph, seed)
        results[name] = dialogue.run(
            doctor, benchmark, graph, max_turns=max_turns, patient=patient_backend, judge=judge
        )
    return dialogue.write_report(out_dir, results)
