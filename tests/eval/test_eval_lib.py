"""run_eval.py -> medjax.eval_lib.evaluate for the research task, end to end in a subprocess:
gin/eval/research_tiny.gin on a tiny random-weights Hugging Face folder made here, and a
missing checkpoint folder failing with a one-line message that names it."""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from medjax import models
from medjax.models import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = [
    "Which gene is behind slow acetylation? Search the knowledge base, then read.",
    '<tool_call>{"name": "search", "arguments": {"query": ["acetylation"]}}</tool_call>',
    "<answer>NAT2</answer>",
] * 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Qwen2-style model with random weights and its BPE tokenizer, as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny_policy")
    tok = tokenizer_lib.train_bpe(CORPUS, vocab_size=320)
    config = models.ModelConfig(
        family="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=48,
        num_layers=2, num_heads=4, num_kv_heads=2, qkv_bias=True,
    )  # fmt: skip
    models.save_pretrained(models.DecoderLM(config, rngs=nnx.Rngs(0)), folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def env(run_train_env):
    """The subprocess's environment and the tiny KG-QA data folder of the run's training
    tests (tests/conftest.py: one HPO cache, BM25 index and dataset build for the run)."""
    return run_train_env


def run_eval(args, env):
    return subprocess.run(
        [sys.executable, "run_eval.py", *args],
        env=env["env"], capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.slow  # Compiles the sampler; the dataset and index are the run's (conftest.py).
def test_research_gin_file_on_a_tiny_checkpoint(checkpoint, env, tmp_path):
    out = tmp_path / "report"
    bindings = {
        "checkpoint": repr(str(checkpoint)),
        "data_dir": repr(env["data_dir"]),
        "out_dir": repr(str(out)),
        "num_questions": "3",
        "max_new_tokens": "8",
        "max_turns": "2",
    }
    args = ["--gin_file=gin/eval/research_tiny.gin"]
    args += [f"--gin_bindings=eval_lib.evaluate.{k} = {v}" for k, v in bindings.items()]
    result = run_eval(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["num_questions"] == 3 and report["num_episodes"] == 3
    assert 0.0 <= report["accuracy"] <= 1.0
    assert len(report["episodes"]) == 3 and report["settings"]["split"] == "test"
    # Every turn sampled at most 8 tokens; at most 2 turns and a forced final one.
    assert 0 < report["mean_generated_tokens"] <= 3 * 8 and 1 <= report["mean_turns"] <= 3
    assert "| accuracy |" in (out / "report.md").read_text()
    operative = (out / "operative_config.gin").read_text()
    assert "max_new_tokens = 8" in operative and str(checkpoint) in operative


def test_checkpoint_backends_are_named_by_their_folder(checkpoint):
    from medjax import eval_lib

    name, backend = eval_lib.make_backend(f"checkpoint:{checkpoint}/", seed=0)
    assert name == f"checkpoint-{checkpoint.name}"
    assert backend.model.config.hidden_size == 32  # The fixture's model, loaded.
    with pytest.raises(eval_lib.EvalError, match=r"expected openai:BASE_URL:MODEL"):
        eval_lib.make_backend("openai:gpt")


def test_missing_checkpoint_is_a_one_line_error(env, tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    result = run_eval(["--task", "research", "--checkpoint", str(missing)], env)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    # The same through gin: a folder without config.json.
    empty = tmp_path / "empty"
    empty.mkdir()
    binding = f"--gin_bindings=eval_lib.evaluate.checkpoint = {str(empty)!r}"
    result = run_eval(["--gin_file=gin/eval/research_tiny.gin", binding], env)
    assert result.returncode != 0
    assert str(empty) in result.stderr and "config.json" in result.stderr
    assert "Traceback" not in result.stderr
