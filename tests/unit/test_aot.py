"""The ahead-of-time plan without the TPU compiler: Cloud TPU names to topologies, the
compiler's messages parsed, model FLOPs by hand, and the programs a run's stages give (their
names, sizes and batch fields), checked against numbers worked out here. The compiles
themselves are in tests/integration/test_compile_only.py.
"""

import dataclasses
import importlib.util
import os
import pathlib
import sys

import gin
import jax
import jax.numpy as jnp
import pytest

from medjax import partitioning, topologies
from medjax.models.config import LoraConfig, ModelConfig
from medjax.training import aot, rl
from medjax.training.stages import RLStage, SFTStage

ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, qkv_bias=True)  # fmt: skip
SMOLLM2 = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)  # fmt: skip


@pytest.mark.parametrize(
    "name, topology, chips, hosts, per_host",
    [
        ("v5e-8", "v5e:2x4", 8, 1, (2, 4, 1)),
        ("v5litepod-16", "v5e:4x4", 16, 4, (2, 2, 1)),
        ("v5e-1", "v5e:1x1", 1, 1, (1, 1, 1)),
        ("v6e-8", "v6e:2x4", 8, 1, (2, 4, 1)),
        ("v5p-8", "v5p:2x2x1", 4, 1, (2, 2, 1)),  # Cores: 2 a chip.
        ("v5p-16", "v5p:2x2x2", 8, 2, (2, 2, 1)),
        ("v4-8", "v4:2x2x1", 4, 1, (2, 2, 1)),
        ("v4-32", "v4:2x2x4", 16, 4, (2, 2, 1)),
        ("v5e:2x2", "v5e:2x2", 4, 1, (2, 2, 1)),
        ("v5p:2x2x2", "v5p:2x2x2", 8, 2, (2, 2, 1)),
    ],
)
def test_cloud_tpu_names(name, topology, chips, hosts, per_host):
    """Catches: v5p-N read as chips (it counts TensorCores), a 16-chip v5e slice on one
    host, a topology string mangled."""
    t = topologies.resolve(name)
    assert (t.topology, t.chips, t.hosts, t.chips_per_host) == (topology, chips, hosts, per_host)


@pytest.mark.parametrize("bad", ["v5e-6", "v4-6", "v5p-4", "tpu-8", "v5e:2x2x2", "v5p:2x2"])
def test_bad_topology_names_are_refused(bad):
    with pytest.raises(topologies.TopologyError, match=repr(bad)):
        topologies.resolve(bad)


def test_available_hbm_from_the_compiler_message():
    """The figure libtpu states (v5e) in bytes; catches a unit read as 1000s."""
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO"
        " temporaries (100.00G) exceeds available HBM (15.75G)."
    )
    assert topologies.parse_available(message) == 15.75 * 2**30
    assert topologies.parse_available("INTERNAL: something else") is None


def test_missing_libtpu_is_one_line_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a)
    )
    with pytest.raises(topologies.MissingLibtpuError, match=r'pip install -e "\.\[tpu\]"'):
        topologies.require_libtpu()
    sys.path.insert(0, str(ROOT))
    import run_train

    old = os.getcwd()
    os.chdir(ROOT)
    try:
        with pytest.raises(SystemExit) as stop:
            run_train.main([
                "--gin_file=gin/testing/sft.gin", "--compile_only", "--topology=v5e-8",
            ])  # fmt: skip
    finally:
        os.chdir(old)
        with gin.unlock_config():
            gin.clear_config(clear_constants=True)
        gin.config._set_config_is_locked(False)
    message = str(stop.value.code)
    assert message.startswith("run_train: error: --compile_only:") and "\n" not in message
    assert 'pip install -e ".[tpu]"' in message


def test_model_flops_by_hand():
    """TINY: weights a token meets = 2 x (64x16x12 + 3x64x128) + 64x512 = 106,496; attention
    4 x 2 layers x 4 heads x 16 = 512 FLOPs per (query, key). Catches the LM head left out,
    the backward pass not counted (x3), non-causal attention, a decode step attending to
    a cache that does not grow."""
    assert aot._matmul_weights(TINY) == 106_496
    # 2 rows x 4 tokens: (2 x 106,496 x 4 + 512 x 10) x 3 x 2.
    assert aot.model_flops(TINY, "train", 2, 4) == 5_142_528
    assert aot.model_flops(TINY, "score", 2, 4) == 1_714_176
    # Prefill of 4 tokens, the LM head on the last: 2 x 73,728 x 4 + 512 x 10 + 2 x 64 x 512;
    # 2 decode steps: 2 x 2 x 106,496 + 512 x (5 + 6).
    assert aot.model_flops(TINY, "sample", 2, 4, 2) == 2 * (660_480 + 431_616)
    # SmolLM2-135M: every weight but the norms meets a token (6N per trained token).
    assert aot._matmul_weights(SMOLLM2) == 134_479_872


def test_lora_and_remat_flops_by_hand():
    """TINY with rank-2 adapters on q_proj (64 -> 64) and v_proj (64 -> 32): 2 x (2 x 128 +
    2 x 96) = 896 adapter weights a token meets. A LoRA step's frozen weights get no weight
    gradient (2x their forward, not 3x); the adapters and attention 3x. Catches LoRA counted
    as full fine-tuning (5,142,528), adapters left out, the wrong targets' shapes; and remat
    recomputing the LM head ("full"), or the projections under "save_dots"."""
    lora = TINY.replace(lora=LoraConfig(rank=2, target_modules=("q_proj", "v_proj")))
    assert aot._adapter_weights(lora) == 896
    # 2 rows x 4 tokens: weights 2 x 4 x 106,496 = 851,968; adapters 2 x 4 x 896 = 7,168;
    # attention 512 x 10 = 5,120: 2 x (2 x 851,968 + 3 x 7,168 + 3 x 5,120).
    assert aot.model_flops(lora, "train", 2, 4) == 3_481_600
    assert aot.model_flops(lora, "score", 2, 4) == 2 * (851_968 + 7_168 + 5_120)
    assert aot.remat_flops(TINY, 2, 4) == 0
    # "full": the layers' forward again, 2 x 4 x 73,728 + 5,120, per row.
    assert aot.remat_flops(TINY.replace(remat="full"), 2, 4) == 2 * (589_824 + 5_120)
    assert aot.remat_flops(TINY.replace(remat="save_dots"), 2, 4) == 2 * 5_120
    assert aot.remat_flops(TINY.replace(remat="offload_dots"), 2, 4) == 2 * 5_120


def _plan():
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return aot.Plan(TINY, mesh, *aot.abstract_model(TINY, mesh))


TASK = rl.ResearchTask(max_context_tokens=1536, max_new_tokens=8, num_eval_questions=3)


def _listing(stages, evaluate=True, task=TASK):
    notes = []
    return [(p.name, p.shape) for p in aot.programs(_plan(), stages, task, evaluate, notes)]


# A later turn with tool outputs not cut (max_observation_chars None): up to the whole context
# (1,535 tokens, padded to 1,536) appended to a kept cache of 1,535 + 8 = 1,543 tokens (2,048
# slots).
LATER = "{rows} rows, 2048 cached slots, 1536 new prompt + 8 new tokens"


def test_the_kept_cache_turn_continues_a_cache_of_the_run_sizes():
    """Outputs cut at 300 characters: 300 + 128 = 428 new tokens, padded to 512; the kept
    cache [layers, rows, kv heads, 2048 slots, head dim] sharded by rows, one key a row (the
    episodes' streams). Catches a cache laid out slots before heads, a scalar key (the
    program a run without streams compiles), the chunk sized by the whole context."""
    task = rl.ResearchTask(max_context_tokens=1536, max_new_tokens=8, max_observation_chars=300)
    stage = RLStage(prompts_per_step=4, num_generations=4)
    later = aot.programs(_plan(), [stage], task, False, [])[2]
    assert (later.name, later.shape) == (
        "rl: sampler (a later turn, kept cache)",
        "16 rows, 2048 cached slots, 512 new prompt + 8 new tokens",
    )
    _, args = later.build()
    cache, key, chunk = args[2], args[7], args[5]
    assert cache.k.shape == (TINY.num_layers, 16, TINY.num_kv_heads, 2048, TINY.head_dim)
    assert cache.positions.shape == (16, 2048) and chunk.shape == (16, 512)
    assert key.shape == (16,)


def test_grpo_programs_at_the_run_sizes():
    """16 episodes in 2 minibatches of 2 microbatches, old and reference log-probs scored on
    all 16 in the stage's 2 microbatches; the sampler's longest turn: 16 rows (ladder), a
    prompt of 1,536 (the ladder's step above 1,535), 8 new tokens; evaluation: 3 questions
    -> 4 rows. Catches
    minibatches not dividing the rows, scoring left out when num_iterations > 1, the
    evaluation sized by the training batch."""
    stage = RLStage(prompts_per_step=4, num_generations=4, num_minibatches=2,
                    num_microbatches=2, num_iterations=2, kl_beta=0.1)  # fmt: skip
    assert _listing([stage]) == [
        ("rl: update step", "8 rows x 1536 tokens, 2 microbatches"),
        ("rl: old and reference log-probs", "16 rows x 1536 tokens, 2 microbatches"),
        ("rl: sampler (longest turn)", "16 rows, prompt 1536 + 8 new tokens"),
        ("rl: sampler (a later turn, kept cache)", LATER.format(rows=16)),
        ("eval: sampler (greedy, longest turn)", "4 rows, prompt 1536 + 8 new tokens"),
        ("eval: sampler (greedy, a later turn, kept cache)", LATER.format(rows=4)),
        ("eval: expert NLL scoring", "3 rows x 1536 tokens"),
    ]
    update = aot.programs(_plan(), [stage], TASK, False, [])[0]
    _, (_, batch) = update.build()
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "input_ids": ((8, 1536), jnp.int32), "attention_mask": ((8, 1536), jnp.int32),
        "loss_mask": ((8, 1536), jnp.int32), "old_logps": ((8, 1536), jnp.float32),
        "ref_logps": ((8, 1536), jnp.float32), "advantages": ((8,), jnp.float32),
    }  # fmt: skip
    assert update.flops == aot.model_flops(TINY, "train", 8, 1536)


def test_on_policy_grpo_scores_nothing():
    stage = RLStage(prompts_per_step=2, num_generations=4)
    names = [n for n, _ in _listing([SFTStage(batch_size=2, max_length=700), stage], False)]
    assert names == [
        "sft: train step", "rl: update step", "rl: sampler (longest turn)",
        "rl: sampler (a later turn, kept cache)",
    ]  # fmt: skip
    # SFT rows are cut at max_length: 700, not the 768 bucket.
    assert _listing([SFTStage(batch_size=2, max_length=700)], False)[0][1] == "2 rows x 700 tokens"


def test_grao_programs_carry_the_references():
    """P=4 questions x G=4 in 2 minibatches: 8 sample rows and 2 reference rows per update;
    its FLOPs count the 10 rows. Catches the references left out of the batch."""
    stage = RLStage(algorithm="grao", prompts_per_step=4, num_generations=4, num_minibatches=2)
    update = aot.programs(_plan(), [stage], TASK, False, [])[0]
    _, (_, batch) = update.build()
    assert batch["ref_input_ids"].shape == (2, 1536) and batch["ref_rewards"].shape == (2,)
    assert batch["rewards"].shape == (8,) and "old_logps" not in batch
    assert update.flops == aot.model_flops(TINY, "train", 10, 1536)


def test_mgrpo_rows_main_and_aligned_sub_rows():
    """K=4 rollouts of 2 questions, d=3 aligned sub-trajectories each: one model trains on
    8 + 24 rows; two models on 8 and 24."""
    shared = RLStage(algorithm="mgrpo", prompts_per_step=2, num_generations=4,
                     sub_target_count=3)  # fmt: skip
    assert _listing([shared], False)[0] == ("rl: update step (main + sub rows)",
                                            "32 rows x 1536 tokens")  # fmt: skip
    distinct = RLStage(algorithm="mgrpo", prompts_per_step=2, num_generations=4,
                       sub_target_count=3, shared_model=False)  # fmt: skip
    assert _listing([distinct], False)[:2] == [
        ("rl: update step (main agent)", "8 rows x 1536 tokens"),
        ("rl: update step (sub-agent)", "24 rows x 1536 tokens"),
    ]


def test_unbounded_context_is_refused():
    task = rl.ResearchTask(max_context_tokens=None)
    with pytest.raises(ValueError, match="max_context_tokens is None"):
        _listing([RLStage()], False, task)


def test_largest_buffers_from_a_buffer_assignment(tmp_path):
    """A buffer assignment in XLA's dump format: the largest HBM values first, on-chip
    scratch (color 1) left out, each named by its HLO op's JAX op_name."""
    (tmp_path / "module_0000.jit_step.after_optimizations-buffer-assignment.txt").write_text(
        "allocation 0: size 1024, parameter 1, shape |f32[256]| at ShapeIndex {}:\n"
        " value: <3 w.1 @0> (size=1024,offset=0): f32[256]{0}\n"
        "allocation 1: size 4294967296, preallocated-temp:\n"
        " value: <7 logits_fusion @0> (size=4294967296,offset=0): f32[1048576,1024]{1,0}\n"
        " value: <8 reduce.3{1} @0> (size=2097152,offset=0): f32[524288]{0}\n"
        "allocation 2: size 999999999999, color 1, preallocated-temp:\n"
        " value: <9 vmem_copy @0> (size=999999999999,offset=0): f32[8,128]{1,0}\n"
    )
    (tmp_path / "module_0000.jit_step.after_optimizations.txt").write_text(
        '  %logits_fusion = f32[1048576,1024]{1,0} fusion(%a), metadata={op_name="jit(step)/'
        'jvp()/dot_general" stack_frame_id=3}\n'
    )
    assert aot.largest_buffers(str(tmp_path), count=3) == [
        "4.00 GiB f32[1048576,1024] temp: jit(step)/jvp()/dot_general",
        "0.00 GiB f32[524288] temp: reduce.3{1}",
        "0.00 GiB f32[256] argument: w.1",
    ]


def test_progress_file_to_report(tmp_path):
    """What a supervising process reads back: program 0 compiled, program 1 crashed its
    process (signal 11), program 2 started in a process that left no result. Catches a
    crash blamed on the wrong program, results out of order, a resume that repeats or skips
    a program."""
    path = str(tmp_path / "progress.jsonl")
    progress = aot.Progress(path)
    progress.write(header={"model": {"parameters": 7, "dtype": "float32"}, "mesh": {"data": 1},
                           "notes": ["n"], "run_dir": "/runs/a", "programs": 4})  # fmt: skip
    start = dict(hbm_bytes=100, model_flops=2.0, seconds_at_peak=0.5)
    progress.write(start=0, program="sft: train step", shape="4 rows x 8 tokens", **start)
    done = aot.Result("sft: train step", "4 rows x 8 tokens", total_bytes=60, hbm_bytes=100,
                      fits=True)  # fmt: skip
    progress.write(result=0, fields=dataclasses.asdict(done))
    progress.write(start=1, program="rl: sampler", shape="16 rows", **start)
    progress.write(crashed=1, signal=11)
    progress.write(start=2, program="eval: sampler", shape="4 rows", **start)
    assert aot.Progress.resume_at(path) == 3 and aot.Progress.count(path) == 4
    report, run_dir = aot.Progress.report(path, topologies.resolve("v5e-8"))
    assert run_dir == "/runs/a" and report.notes == ["n"] and not report.fits
    assert [(r.program, r.fits, r.error) for r in report.results] == [
        ("sft: train step", True, None),
        ("rl: sampler", False, "the TPU compiler crashed on it (signal 11); see its log above"),
        ("eval: sampler", False, "the TPU compiler crashed on it (no result); see its log above"),
    ]
    assert report.results[1].model_flops == 2.0 and report.results[1].total_bytes is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--compile_only"], "--compile_only needs --topology"),
        (["--topology=v5e-8"], "--topology and --model_shape go with --compile_only"),
        (["--compile_only", "--topology=v5e-6"], "v5e slices have [1, 4, 8, 16"),
    ],
)
def test_compile_only_flags_are_checked_first(flags, message, capsys):
    """Catches a topology without --compile_only silently training, and a bad slice name
    reaching gin or the compiler."""
    sys.path.insert(0, str(ROOT))
    import run_train

    with pytest.raises(SystemExit) as stop:
        run_train.main(["--gin_file=gin/testing/sft.gin", *flags])
    assert message in str(stop.value.code) + capsys.readouterr().err
