"""`run_train.py --compile_only --topology=NAME` runs the real TPU compiler (libtpu) on every
program of a run, ahead of time on this CPU host: the quickstart's programs on a v5e 2x2,
M-GRPO's two trainers on a 2-host v5p slice, and a configuration that does not fit, which
exits 1 naming its largest buffer.

The quickstart is compiled at its own sizes (stages, rows, widths, microbatches, sampler)
with the tiny model shape: SmolLM2-135M's 30 unrolled layers take the compiler 11 minutes
here (its figures: benchmarks/results/tpu_plan_quickstart.json). Needs libtpu, which the
test extras install; skipped without it.
"""

import json
import os
import pathlib
import sys

import gin
import pytest

pytest.importorskip("libtpu", reason="libtpu (the TPU compiler) is not installed")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # One lock file per machine.

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import run_train  # noqa: E402

V5E_HBM = int(15.75 * 2**30)  # What libtpu states for a v5e chip ("available HBM (15.75G)").


def reset_gin():
    with gin.unlock_config():
        gin.clear_config(clear_constants=True)
    gin.config._set_config_is_locked(False)


def compile_only(args, run_dir) -> tuple[int, dict]:
    """(exit code, the written report) of run_train.main in this process."""
    reset_gin()
    old = os.getcwd()
    os.chdir(ROOT)
    code = 0
    try:
        run_train.main([*args, f"--gin_bindings=RUN_DIR='{run_dir}'", "--compile_only"])
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(old)
        reset_gin()
    with open(os.path.join(run_dir, "compile_only.json"), encoding="utf-8") as f:
        return code, json.load(f)


# A later turn of the quickstart's 16 episodes: a tool output of at most 400 characters + 128
# tokens of framing = 528 tokens, padded to 768; the kept cache and the new one hold
# 1,023 + 64 = 1,087 tokens, padded to 1,536 slots.
LATER_TURN = "16 rows, 1536 cached slots, 768 new prompt + 64 new tokens"


def test_every_quickstart_program_compiles_for_a_v5e_2x2(tmp_path, capsys):
    """Catches: a program of the run missing from the plan (the kept-cache turn among them),
    a program the TPU compiler refuses, sizes other than the quickstart's, the chip's HBM
    misread, the model's parameters counted from the wrong config, bytes that do not add
    up."""
    code, report = compile_only(
        ["--gin_file=gin/experiments/quickstart_cpu.gin", "--topology=v5e:2x2",
         "--model_shape=tiny"], tmp_path,
    )  # fmt: skip
    assert code == 0 and report["fits"]
    assert [(p["program"], p["shape"]) for p in report["programs"]] == [
        ("sft: train step", "4 rows x 512 tokens"),
        ("rl: update step", "16 rows x 1024 tokens, 4 microbatches"),
        ("rl: sampler (longest turn)", "16 rows, prompt 1024 + 64 new tokens"),
        ("rl: sampler (a later turn, kept cache)", LATER_TURN),
        ("eval: sampler (greedy, longest turn)", "16 rows, prompt 1024 + 64 new tokens"),
        ("eval: sampler (greedy, a later turn, kept cache)", LATER_TURN),
        ("eval: expert NLL scoring", "16 rows x 1024 tokens"),
    ]
    assert report["topology"]["chips"] == 4 and report["topology"]["hosts"] == 1
    assert report["topology"]["device_kind"] == "TPU v5 lite"
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    # gin/models/tiny.gin by hand: embedding 512x64, 2 layers of 37,120, final norm 64.
    assert report["model"]["parameters"] == 107_072
    for p in report["programs"]:
        assert p["hbm_bytes"] == V5E_HBM and p["fits"] and p["error"] is None
        total = p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
        assert p["total_bytes"] == total + p["code_bytes"]
        assert p["xla_flops"] > 0
    sft = report["programs"][0]
    # Data parallel: each chip holds the f32 parameters and both Adam moments.
    assert sft["argument_bytes"] >= 3 * 4 * 107_072
    # The state is donated: the outputs alias it.
    assert sft["alias_bytes"] >= 3 * 4 * 107_072
    out = capsys.readouterr().out
    assert "v5e:2x2 (v5e:2x2, 4 chips, 1 host), 15.75 GiB HBM a chip" in out
    assert out.count(" yes ") == 7  # Every program of the table fits.


def test_mgrpo_trainers_compile_on_a_two_host_v5p_slice(tmp_path):
    """gin/testing/mgrpo_distinct.gin (main and sub-agent as two models, 4 questions x K=4,
    d=2, episodes of up to 512 tokens) with FSDP over the 8 chips of v5p:2x2x2, whose
    devices belong to 2 hosts. Rollouts run on each host's chips: 2 of the 4 questions x 4 =
    8 rows on 4 chips. Catches a plan that only works on one host's devices, the
    sub-agent's trainer left out."""
    code, report = compile_only(
        ["--gin_file=gin/testing/mgrpo_distinct.gin", "--topology=v5p:2x2x2",
         "--gin_bindings=train_lib.train.mesh_shape=(1, -1, 1)",
         "--gin_bindings=rl.ResearchTask.max_context_tokens=512"], tmp_path,
    )  # fmt: skip
    assert code == 0 and report["fits"]
    assert report["topology"]["hosts"] == 2 and report["topology"]["chips"] == 8
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert [(p["program"], p["shape"]) for p in report["programs"]] == [
        ("rl: update step (main agent)", "16 rows x 512 tokens"),
        ("rl: update step (sub-agent)", "32 rows x 512 tokens"),
        ("rl: sampler (longest turn)", "8 rows, prompt 512 + 32 new tokens, on one host's 4 chips"),
        # 100 characters + 128 -> 256 new tokens; 511 + 32 -> 768 slots.
        (
            "rl: sampler (a later turn, kept cache)",
            "8 rows, 768 cached slots, 256 new prompt + 32 new tokens, on one host's 4 chips",
        ),
    ]
    assert report["programs"][0]["hbm_bytes"] > 90 * 2**30  # A v5p chip: 95.74 GiB.


def test_the_multihost_run_compiles_for_a_four_host_v5e_16(tmp_path):
    """gin/testing/multihost.gin (the run tests/integration/test_multihost.py spreads over two
    processes: SFT, GRPO, GRAO, M-GRPO with a shared model, evaluation) for v5e-16, 16 chips
    on 4 hosts, its data axis across hosts (mesh 4 x 4 x 1). Its batches are bound to multiples
    of 16 rows, as a run on that slice must have them. Rows by hand: SFT 16; RL 16 prompts x
    G=2 = 32 (GRAO's update also takes one reference row a prompt: 16);
    M-GRPO 32 main + 32 x 2 sub-agent targets = 96; evaluation 16 questions. Rollouts run on
    each host's 4 chips: a host's sampler 4 of the 16 prompts x G=2 = 8 rows; evaluation runs
    all 16 questions on every host. Catches a program
    of the run missing on a multi-host slice, rows or widths other than the run's, the hosts
    miscounted."""
    code, report = compile_only(
        ["--gin_file=gin/testing/multihost.gin", "--topology=v5e-16",
         "--gin_bindings=DATA_DIR='/nonexistent'",
         "--gin_bindings=train_lib.train.mesh_shape=(4, 4, 1)",
         "--gin_bindings=train_lib.SFTStage.batch_size=16",
         "--gin_bindings=train_lib.RLStage.prompts_per_step=16",
         "--gin_bindings=rl.ResearchTask.num_eval_questions=16"], tmp_path,
    )  # fmt: skip
    assert code == 0 and report["fits"]
    assert report["topology"]["hosts"] == 4 and report["topology"]["chips"] == 16
    assert report["mesh"] == {"data": 4, "fsdp": 4, "tensor": 1}
    sampler = "8 rows, prompt 1536 + 8 new tokens, on one host's 4 chips"
    # 100 characters + 128 -> 256 new tokens; 1,535 + 8 -> 2,048 slots.
    later = "256 new prompt + 8 new tokens, on one host's 4 chips"
    assert [(p["program"], p["shape"]) for p in report["programs"]] == [
        ("sft: train step", "16 rows x 1024 tokens"),
        ("grpo: update step", "32 rows x 1536 tokens"),
        ("grpo: sampler (longest turn)", sampler),
        ("grpo: sampler (a later turn, kept cache)", f"8 rows, 2048 cached slots, {later}"),
        ("grao: update step (+ references)", "32 rows x 1536 tokens"),
        ("grao: sampler (longest turn)", sampler),
        ("grao: sampler (a later turn, kept cache)", f"8 rows, 2048 cached slots, {later}"),
        ("mgrpo: update step (main + sub rows)", "96 rows x 1536 tokens"),
        ("mgrpo: sampler (longest turn)", sampler),
        ("mgrpo: sampler (a later turn, kept cache)", f"8 rows, 2048 cached slots, {later}"),
        (
            "eval: sampler (greedy, longest turn)",
            "16 rows, prompt 1536 + 8 new tokens, on one host's 4 chips",
        ),
        (
            "eval: sampler (greedy, a later turn, kept cache)",
            f"16 rows, 2048 cached slots, {later}",
        ),
        ("eval: expert NLL scoring", "16 rows x 1536 tokens"),
    ]


def test_a_run_that_does_not_fit_exits_1_naming_its_largest_buffer(tmp_path, capsys):
    """512 chats of 8,192 tokens on one v5e chip: the f32 logits of 512 x 8,192 tokens over
    the 1,024-token vocabulary (16 GiB) lead the largest buffers. (64 chats fitted once
    attention became splash attention on TPU: 5.4 GiB, the float32 scores gone.) Catches:
    exit 0 on a program that does not fit, the table left unprinted, the buffers unnamed."""
    code, report = compile_only(
        ["--gin_file=gin/testing/sft.gin", "--topology=v5e-1",
         "--gin_bindings=train_lib.SFTStage.batch_size=512",
         "--gin_bindings=train_lib.SFTStage.max_length=8192",
         "--gin_bindings=train_lib.train.evaluate=False"], tmp_path,
    )  # fmt: skip
    assert code == 1 and not report["fits"]
    (sft,) = report["programs"]
    assert sft["error"].startswith("does not fit: Ran out of memory on HBM")
    assert sft["temp_bytes"] > V5E_HBM
    assert sft["largest"][0].startswith("16.00 GiB f32[4194304,1024] temp: jit(step)/")
    out = capsys.readouterr().out
    assert "sft: train step  512 rows x 8192 tokens" in out and " NO " in out
    assert "f32[4194304,1024]" in out


def test_mixed_precision_compiles_for_tpu_with_its_master_copy(tmp_path):
    """bfloat16 parameters with a float32 master copy and bfloat16 moments, FSDP over
    v5e:2x2. Per chip the step's arguments hold at least 2 + 4 + 2 + 2 = 10 bytes a
    parameter over 4 chips (105,360 bytes for the 42,144 parameters; without the master
    copy 6 bytes, 63,216, plus 12,288 of batch). gin/testing/base.gin's model has
    1024 x 32 tied embeddings (32,768), a layer of q 32x32+32, k and v 32x16+16, o 32x32,
    MLP 3 x 32x64 and two norms of 32 (9,344), and a final norm (32). Catches: the
    master-weights state refused by the TPU compiler or its shardings, the train dtype not
    reaching a model made from a ModelConfig, the master copy missing from the compiled
    state."""
    code, report = compile_only(
        ["--gin_file=gin/testing/sft.gin", "--topology=v5e:2x2",
         "--gin_bindings=train_lib.SFTStage.batch_size=4",
         "--gin_bindings=train_lib.train.mesh_shape=(1, -1, 1)",
         "--gin_bindings=train_lib.train.evaluate=False",
         "--gin_bindings=train_lib.train.dtype='bfloat16'",
         "--gin_bindings=optim.make_optimizer.master_dtype='float32'",
         "--gin_bindings=optim.make_optimizer.moments_dtype='bfloat16'"], tmp_path,
    )  # fmt: skip
    assert code == 0 and report["fits"]
    assert report["model"]["dtype"] == "bfloat16" and report["model"]["parameters"] == 42144
    (sft,) = report["programs"]
    assert sft["argument_bytes"] >= 10 * 42144 / 4 + 4 * 1024 * 4 * 3 / 4


CRASH_HOOK = """
import os, signal
from medjax.training import aot

compile_program = aot.compile_program


def crash_on_the_sampler(program, *args, **kwargs):
    if program.name == "rl: sampler (longest turn)":
        os.kill(os.getpid(), signal.SIGSEGV)  # What libtpu does on some programs.
    return compile_program(program, *args, **kwargs)


aot.compile_program = crash_on_the_sampler
"""


def test_a_program_that_crashes_the_compiler_is_reported_and_the_rest_goes_on(
    tmp_path, monkeypatch, capsys
):
    """libtpu 0.0.42.1 dies (a stack overflow, signal 11) compiling some programs, e.g. the
    sampler for 64 rows of 1,024 + 1,024 tokens with 12 heads of 128 (a 3-minute compile
    here: benchmarks/results/tpu_plan.json has such crashes). Here the compiling process
    kills itself with SIGSEGV on the sampler (a sitecustomize hook in the child), so the
    supervising process meets a real signal: the crash is recorded against that program, the
    program before it keeps its result, a new process compiles the evaluation's programs
    after it, and the run exits 1. Catches: the whole command dying with no table, the crash
    blamed on the wrong program, programs after the crash left out or compiled twice."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    code, report = compile_only(
        [
            "--gin_file=gin/testing/grpo.gin",
            "--topology=v5e-1",
            "--gin_bindings=rl.ResearchTask.max_context_tokens=256",
        ],
        tmp_path / "run",
    )
    assert code == 1 and not report["fits"]
    assert [(p["program"], p["fits"]) for p in report["programs"]] == [
        ("rl: update step", True),
        ("rl: sampler (longest turn)", False),
        ("rl: sampler (a later turn, kept cache)", True),
        ("eval: sampler (greedy, longest turn)", True),
        ("eval: sampler (greedy, a later turn, kept cache)", True),
        ("eval: expert NLL scoring", True),
    ]
    sampler = report["programs"][1]
    assert sampler["total_bytes"] is None
    assert sampler["error"].startswith("the TPU compiler crashed on it (signal 11)")
    out = capsys.readouterr().out
    assert "rl: sampler (longest turn): the TPU compiler crashed on it (signal 11)" in out


def test_a_mesh_the_slice_cannot_hold_is_one_line(tmp_path, capfd):
    """mesh_shape (3, 1, 1) on the 8 chips of a v5e-8: the child stops before compiling
    with one line naming the slice and the mesh, and no report is written."""
    reset_gin()
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        with pytest.raises(SystemExit) as stop:
            run_train.main([
                "--gin_file=gin/testing/sft.gin", "--topology=v5e-8", "--compile_only",
                f"--gin_bindings=RUN_DIR='{tmp_path}'",
                "--gin_bindings=train_lib.train.mesh_shape=(3, 1, 1)",
            ])  # fmt: skip
    finally:
        os.chdir(old)
        reset_gin()
    assert stop.value.code == 1
    err = capfd.readouterr().err
    assert "run_train: error: compile_only v5e-8: make_mesh: data * fsdp * tensor = 3, but 8" in err
    assert not (tmp_path / "compile_only.json").exists()
