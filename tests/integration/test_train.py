"""run_train.py end to end on the gin/testing configs: every algorithm runs and writes what a
run directory must hold; a SIGKILLed run resumes to exactly the metrics of an uninterrupted
one; a run resumes on another mesh shape; bad input fails with one clear line and touches
nothing.

Each run is a subprocess with two host CPU devices (data parallel over 2), on the tiny
KG-QA set built once into a temporary TFDS folder (conftest.py). M-GRPO (one process and
two) is in test_mgrpo_processes.py.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medjax.training import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Metrics that measure time or compilation, not learning: they differ between runs.
UNTIMED = ("time", "tokens_per_s")


def command(config, run_dir, data_dir, *bindings):
    cmd = [sys.executable, "run_train.py", f"--gin_file=gin/testing/{config}.gin"]
    cmd += [f"--gin_bindings=RUN_DIR='{run_dir}'", f"--gin_bindings=DATA_DIR='{data_dir}'"]
    return cmd + [f"--gin_bindings={b}" for b in bindings]


def run(env, config, run_dir, *bindings, check=True):
    out = subprocess.run(
        command(config, run_dir, env["data_dir"], *bindings),
        cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check and out.returncode != 0:
        raise AssertionError(f"run_train failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out


def kill_after_rl_checkpoint(env, config, run_dir, bindings, step=2):
    """Starts the run and SIGKILLs it as soon as its RL stage's checkpoint `step` commits."""
    proc = subprocess.Popen(
        command(config, run_dir, env["data_dir"], *bindings), cwd=ROOT, env=env["env"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    marker = run_dir / "rl" / "checkpoints" / str(step) / "commit_success.txt"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"the run ended before step {step} was saved"


def learning_metrics(path):
    return [
        {k: v for k, v in r.items() if not k.startswith(UNTIMED) and not k.startswith("compile")}
        for r in metrics.read_jsonl(path)
    ]


@pytest.mark.parametrize(
    "config,stage,loss_key,bindings",
    [
        ("sft", "sft", "loss", ()),
        ("grpo", "rl", "update/loss", ("train_lib.RLStage.kl_beta=0.04",
                                       "train_lib.RLStage.num_iterations=2")),
        ("grao", "rl", "update/loss", ()),
    ],
)  # fmt: skip
def test_every_algorithm_runs_and_writes_its_run_directory(
    env, tmp_path, config, stage, loss_key, bindings
):
    run_dir = tmp_path / "run"
    run(env, config, run_dir, *bindings)
    stage_dir = run_dir / stage
    records = metrics.read_jsonl(stage_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert np.isfinite(r[loss_key]), r
        assert r.get("update_skipped", r.get("update/update_skipped")) == 0
    events = metrics.read_event_scalars(stage_dir)
    assert [s for s, _ in events[loss_key]] == [1, 2]
    np.testing.assert_allclose(
        [v for _, v in events[loss_key]], [r[loss_key] for r in records], rtol=1e-6
    )
    assert sorted(os.listdir(stage_dir / "checkpoints")) == ["1", "2"]
    config_text = (run_dir / "config.gin").read_text()
    assert "train_lib.train.run_dir = %RUN_DIR" in config_text
    export = stage_dir / "export"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (export / name).exists(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results) == ["before", f"after_{stage}"]
    if config == "grpo":
        assert records[-1]["update/kl_mean"] >= 0  # A reference model was scored.


def test_the_doctor_task_trains_with_heldout_curves(env, tmp_path):
    """MedDialogRubrics' doctor (consultation.gin): SFT on the oracle's interviews, then GRAO
    with held-out evaluations every step; results use the benchmark's columns."""
    run_dir = tmp_path / "run"
    run(env, "consultation", run_dir, "train_lib.RLStage.heldout_every=1")
    sft = metrics.read_jsonl(run_dir / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft] == [1, 2] and all(np.isfinite(r["loss"]) for r in sft)
    records = metrics.read_jsonl(run_dir / "rl" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["heldout/coverage"] <= 1 and r["heldout/turns"] <= 3
        assert 0 <= r["reward/coverage"] <= 1 and r["reference/reward_mean"] > 0
        assert np.isfinite(r["update/loss"]) and r["update/grad_norm"] > 0
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results) == ["before", "after_sft", "after_rl"]
    assert results["after_rl"]["coverage"] == records[-1]["heldout/coverage"]
    assert "| point | mean_reward | coverage |" in (run_dir / "results.md").read_text()


def test_resume_after_sigkill_reproduces_the_uninterrupted_metrics(env, tmp_path):
    bindings = ("train_lib.RLStage.steps=4", "train_lib.train.evaluate=False")
    straight = tmp_path / "straight"
    run(env, "grpo", straight, *bindings)

    killed = tmp_path / "killed"
    kill_after_rl_checkpoint(env, "grpo", killed, bindings)
    assert not (killed / "rl" / "export").exists()

    out = run(env, "grpo", killed, *bindings)
    assert "resumed from step" in out.stdout
    assert learning_metrics(killed / "rl" / "metrics.jsonl") == learning_metrics(
        straight / "rl" / "metrics.jsonl"
    )


def test_resume_on_another_mesh_shape(env, tmp_path):
    """SFT for 4 steps on data parallel 2, then cut back to its step-2 checkpoint (the
    later checkpoints and the export removed, as a kill before step 3 committed leaves it)
    and resumed on FSDP 2: its metrics equal the uninterrupted run's, steps 1-2 exactly
    (kept), steps 3-4 to 1e-5 (the other mesh adds the same numbers in another order).
    Catches a resume that loses or mis-places the optimizer state, the step count or the
    data position on a new mesh."""
    run_dir = tmp_path / "run"
    common = ("train_lib.train.evaluate=False", "train_lib.SFTStage.steps=4",
              "train_lib.SFTStage.keep_checkpoints=4")  # fmt: skip
    run(env, "sft", run_dir, *common, "train_lib.train.mesh_shape=(2, 1, 1)")
    straight = learning_metrics(run_dir / "sft" / "metrics.jsonl")
    for step in ("3", "4"):
        shutil.rmtree(run_dir / "sft" / "checkpoints" / step)
    shutil.rmtree(run_dir / "sft" / "export")
    out = run(env, "sft", run_dir, *common, "train_lib.train.mesh_shape=(1, 2, 1)")
    assert "resumed from step 2" in out.stdout
    resumed = learning_metrics(run_dir / "sft" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[:2] == straight[:2]
    for again, first in zip(resumed[2:], straight[2:], strict=True):
        assert again.keys() == first.keys()
        for key in ("loss", "grad_norm", "num_tokens", "update_skipped"):
            np.testing.assert_allclose(again[key], first[key], rtol=1e-5, err_msg=key)


def snapshot(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_clean_failure(out, *phrases):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for phrase in phrases:
        assert phrase in out.stderr, out.stderr[-3000:]


def test_bad_gin_input_fails_with_one_line(env, tmp_path):
    out = subprocess.run(
        [sys.executable, "run_train.py", "--gin_file=gin/testing/nonexistent.gin"],
        cwd=ROOT, env=env["env"], capture_output=True, text=True,
    )  # fmt: skip
    assert_clean_failure(out, "run_train: error", "nonexistent.gin")
    out = run(env, "sft", tmp_path / "a", "train_lib.train.no_such_option=1", check=False)
    assert_clean_failure(out, "run_train: error", "no_such_option")
    # RUN_DIR left unset (the file sets it to None).
    out = subprocess.run(
        [sys.executable, "run_train.py", "--gin_file=gin/testing/sft.gin",
         f"--gin_bindings=DATA_DIR='{env['data_dir']}'"],
        cwd=ROOT, env=env["env"], capture_output=True, text=True,
    )  # fmt: skip
    assert_clean_failure(out, "run_train: error", "run_dir is required")


def test_bad_directories_and_data_fail_and_touch_nothing(env, tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    out = run(env, "sft", stranger, check=False)
    assert_clean_failure(out, "not a medjax run")
    assert snapshot(stranger) == {"notes.txt": b"mine"}

    # A run whose checkpoint folder holds something else.
    run_dir = tmp_path / "run"
    (run_dir / "sft" / "checkpoints").mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    (run_dir / "sft" / "checkpoints" / "weights.bin").write_bytes(b"\x00" * 8)
    before = snapshot(run_dir)
    out = run(env, "sft", run_dir, check=False)
    assert_clean_failure(out, "is not a checkpoint directory", "weights.bin")
    assert snapshot(run_dir) == before

    out = run(env, "sft", tmp_path / "b", "rl.ResearchTask.num_eval_questions=0", check=False)
    assert_clean_failure(out, "no held-out questions", "num_eval_questions is 0")
    assert not (tmp_path / "b").exists()

    out = run(env, "sft", tmp_path / "c", f"train_lib.train.init_from='{stranger}'", check=False)
    assert_clean_failure(out, "not a Hugging Face model folder", str(stranger))
    assert not (tmp_path / "c").exists()


def test_a_lora_run_exports_merged_and_peft_and_resumes_exactly(env, tmp_path):
    """gin/testing/lora.gin: SFT then GRPO with a KL term, rank-4 adapters. Killed after
    the RL stage's second checkpoint and resumed, it ends with the uninterrupted run's
    metrics: the resumed RL stage must rebuild the same base (the SFT export, merged) and
    the same new adapters' A, and restore the trained adapters over them. Catches: a
    checkpoint that relies on base weights it does not hold, adapters drawn differently on
    resume, an SFT stage whose adapters are lost from its export, a PEFT folder naming the
    wrong base."""
    bindings = ("train_lib.RLStage.steps=4", "train_lib.train.evaluate=False")
    straight = tmp_path / "straight"
    run(env, "lora", straight, *bindings)
    for stage, base in (("sft", None), ("rl", str(straight / "sft" / "export"))):
        adapter = straight / stage / "export" / "lora_adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
            4, 8.0, base
        )  # fmt: skip
        assert (adapter / "adapter_model.safetensors").exists()
    rl = metrics.read_jsonl(straight / "rl" / "metrics.jsonl")
    assert all(np.isfinite(r["update/kl_mean"]) for r in rl)
    assert rl[0]["update/kl_mean"] == 0  # New adapters (B = 0): the policy is its reference.

    killed = tmp_path / "killed"
    kill_after_rl_checkpoint(env, "lora", killed, bindings)
    out = run(env, "lora", killed, *bindings)
    assert "resumed from step" in out.stdout
    assert learning_metrics(killed / "rl" / "metrics.jsonl") == learning_metrics(
        straight / "rl" / "metrics.jsonl"
    )
