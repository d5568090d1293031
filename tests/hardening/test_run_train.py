"""run_train.py refuses what cannot run before it writes anything, in one line naming the
stage and field (or the gin file and line, or the checkpoint file); a rerun of a run
directory with other settings names them; a full disk stops the run in one line.

Most cases call `run_train.main` in this process (gin parsed anew each time): a bad
setting stops before any model is built, so each takes well under a second. The slow ones
run training in a subprocess with two host devices, as tests/integration/ does.
"""

import errno
import json
import os
import pathlib
import resource
import subprocess
import sys

import gin
import pytest

from medjax import paths
from medjax.knowledge import hpo
from medjax.training import disk, validate

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import run_train  # noqa: E402


def reset_gin():
    """An empty, unlocked gin config (run_train.main finalizes, which locks it)."""
    with gin.unlock_config():
        gin.clear_config(clear_constants=True)
    gin.config._set_config_is_locked(False)


@pytest.fixture(autouse=True)
def fresh_gin():
    reset_gin()
    yield
    reset_gin()


@pytest.fixture
def data(run_train_env):
    """The tiny KG-QA sets and subprocess environment tests/integration/ uses (one build)."""
    return run_train_env


def argv(config, run_dir, *bindings, data_dir="/nonexistent/tfds"):
    out = [f"--gin_file=gin/testing/{config}.gin" if "/" not in config else f"--gin_file={config}"]
    out += [f"--gin_bindings=RUN_DIR='{run_dir}'", f"--gin_bindings=DATA_DIR='{data_dir}'"]
    return out + [f"--gin_bindings={b}" for b in bindings]


def fails(args, monkeypatch=None) -> str:
    """The one-line error `run_train.main(args)` stops with."""
    reset_gin()
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        with pytest.raises(SystemExit) as stop:
            run_train.main(args)
    finally:
        os.chdir(old)
    message = stop.value.code
    assert isinstance(message, str), message
    assert message.startswith("run_train: error: "), message
    assert "\n" not in message, message
    return message


def snapshot(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


SFT = "SFTStage 'sft'"
RL = "RLStage 'rl'"
# (config, binding, phrases the error names). Each is wrong in one field.
BAD_SETTINGS = [
    ("sft", "train_lib.SFTStage.steps=-1", (SFT, "steps -1", ">= 1")),
    ("sft", "train_lib.SFTStage.steps=0", (SFT, "steps 0")),
    ("sft", "train_lib.SFTStage.steps='two'", (SFT, "steps 'two'", "not an integer")),
    ("sft", "train_lib.SFTStage.steps=True", (SFT, "steps True", "not an integer")),
    ("sft", "train_lib.SFTStage.steps=2.0", (SFT, "steps 2.0")),
    ("sft", "train_lib.SFTStage.batch_size=0", (SFT, "batch_size 0")),
    ("sft", "train_lib.SFTStage.max_length=1", (SFT, "max_length 1")),
    ("sft", "train_lib.SFTStage.num_microbatches=0", (SFT, "num_microbatches 0")),
    ("sft", "train_lib.SFTStage.num_microbatches=3", (SFT, "batch_size 2", "num_microbatches 3")),
    ("sft", "train_lib.SFTStage.save_every=0", (SFT, "save_every 0")),
    ("sft", "train_lib.SFTStage.keep_checkpoints=0", (SFT, "keep_checkpoints 0")),
    ("sft", "train_lib.SFTStage.heldout_every=-1", (SFT, "heldout_every -1")),
    ("sft", "train_lib.SFTStage.optimizer=3", (SFT, "optimizer 3", "not callable")),
    ("sft", "train_lib.SFTStage.role='doctor'", (SFT, "role 'doctor'")),
    ("sft", "train_lib.SFTStage.role=()", (SFT, "role ()")),
    ("sft", "train_lib.SFTStage.name='../up'", ("SFTStage '../up'", "name '../up'")),
    ("sft", "train_lib.SFTStage.name='eval'", ("SFTStage 'eval'", "folder the run uses")),
    ("grpo", "train_lib.RLStage.algorithm='ppo'", (RL, "algorithm 'ppo'", "'grpo'")),
    ("grpo", "train_lib.RLStage.steps=-3", (RL, "steps -3")),
    ("grpo", "train_lib.RLStage.prompts_per_step=0", (RL, "prompts_per_step 0")),
    ("grpo", "train_lib.RLStage.num_generations=1", (RL, "num_generations 1", ">= 2")),
    ("grpo", "train_lib.RLStage.num_iterations=0", (RL, "num_iterations 0")),
    ("grpo", "train_lib.RLStage.num_minibatches=3", (RL, "4 rows", "num_minibatches 3")),
    ("grpo", "train_lib.RLStage.num_microbatches=8", (RL, "num_microbatches 8")),
    ("grpo", "train_lib.RLStage.kl_beta=-0.1", (RL, "kl_beta -0.1")),
    ("grpo", "train_lib.RLStage.kl_beta='big'", (RL, "kl_beta 'big'")),
    ("grpo", "train_lib.RLStage.loss=5", (RL, "loss 5")),
    ("grpo", "train_lib.RLStage.advantage_scale='median'", (RL, "advantage_scale 'median'")),
    ("grpo", "train_lib.RLStage.advantage_ddof=-1", (RL, "advantage_ddof -1")),
    ("grpo", "train_lib.RLStage.shared_model=1", (RL, "shared_model 1", "True or False")),
    ("grpo", "train_lib.RLStage.sub_target_count=0", (RL, "sub_target_count 0")),
    ("grpo", "train_lib.RLStage.hops=(3, 1)", (RL, "hops (3, 1)")),
    ("grpo", "train_lib.RLStage.hops=(1, 'x')", (RL, "hops (1, 'x')")),
    ("grpo", "train_lib.RLStage.reference='/no/ref'", (RL, "reference /no/ref", "config.json")),
    ("grpo", "train_lib.RLStage.sub_optimizer='adam'", (RL, "sub_optimizer 'adam'")),
    ("sft", "train_lib.train.seed=-1", ("train: seed -1",)),
    ("sft", "train_lib.train.seed=0.5", ("train: seed 0.5",)),
    ("sft", "train_lib.train.tokenizer_vocab_size=100", ("train: tokenizer_vocab_size 100",)),
    ("sft", "train_lib.train.dtype='int32'", ("train: dtype 'int32'",)),
    ("sft", "train_lib.train.dtype='float33'", ("train: dtype 'float33'",)),
    ("sft", "train_lib.train.mesh_shape=(0, 1, 1)", ("train: mesh_shape (0, 1, 1)",)),
    ("sft", "train_lib.train.mesh_shape=(3, 1, 1)", ("train: mesh_shape (3, 1, 1)", "devices")),
    ("sft", "train_lib.train.scan_layers='yes'", ("train: scan_layers 'yes'",)),
    ("sft", "train_lib.train.remat='dots'", ("train: remat 'dots'", "'save_dots'")),
    ("sft", "train_lib.train.attention='flash'", ("train: attention 'flash'", "'splash'")),
    ("sft", "train_lib.train.attention='cudnn'", ("train: attention='cudnn' runs on gpu",
                                                  "not on this run's cpu devices")),
    ("sft", "train_lib.train.lora=8", ("train: lora 8", "LoraConfig")),
    ("sft", "train_lib.train.dtype='float64'", ("train: dtype 'float64'", "'bfloat16'")),
    ("sft", "optim.make_optimizer.master_dtype='f32'", ("SFTStage 'sft': optimizer:",
                                                        "master_dtype 'f32'")),
    ("sft", "train_lib.train.evaluate='yes'", ("train: evaluate 'yes'",)),
    ("sft", "train_lib.train.max_bad_steps=-1", ("train: max_bad_steps -1",)),
    ("sft", "train_lib.train.interactive=2", ("train: interactive 2",)),
    ("sft", "train_lib.train.chat_template='llama'", ("train: chat_template 'llama'",)),
    ("sft", "train_lib.train.init_from='/nonexistent/model'", ("init_from", "/nonexistent/model")),
    ("sft", "train_lib.train.model=None", ("train: give model",)),
    ("sft", "train_lib.train.stages=[]", ("train: no stages",)),
    ("sft", "train_lib.train.stages=[1]", ("train: stages[0] 1",)),
]  # fmt: skip


@pytest.mark.parametrize("config,binding,phrases", BAD_SETTINGS)
def test_a_bad_setting_stops_in_one_line_before_anything_is_written(
    tmp_path, config, binding, phrases
):
    run_dir = tmp_path / "run"
    message = fails(argv(config, run_dir, binding))
    for phrase in phrases:
        assert phrase in message, message
    assert "Traceback" not in message
    assert not run_dir.exists()


def test_a_bad_setting_of_an_existing_run_leaves_it_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "sft").mkdir(parents=True)
    (run_dir / "run.json").write_text('{"stages": ["sft"]}')
    before = snapshot(run_dir)
    message = fails(argv("sft", run_dir, "train_lib.SFTStage.batch_size=-2"))
    assert "SFTStage 'sft': batch_size -2" in message
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_the_command_line_prints_one_line_and_no_traceback(data, tmp_path):
    """The reported case end to end: a string for steps used to crash after ~45 s."""
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "run_train.py", *argv("sft", run_dir, "train_lib.SFTStage.steps='two'",
                                               data_dir=data["data_dir"])],
        cwd=ROOT, env=data["env"], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        "run_train: error: SFTStage 'sft': steps 'two' is not an integer >= 1."
    ]
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------
# Gin syntax errors.


def test_a_gin_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'gin/testing/sft.gin'\n\ntrain_lib.SFTStage steps 3\n")
    message = fails([f"--gin_file={bad}"])
    assert f"{bad}, line 3" in message, message

    # An error inside an included file names that file, not the one that includes it.
    outer = tmp_path / "outer.gin"
    outer.write_text(f"include '{bad}'\n")
    message = fails([f"--gin_file={outer}"])
    assert f"{bad}, line 3" in message, message

    # A bracket left open is found at the end of the file.
    unclosed = tmp_path / "unclosed.gin"
    unclosed.write_text("include 'gin/testing/sft.gin'\ntrain_lib.SFTStage.steps = (3\n")
    message = fails([f"--gin_file={unclosed}"])
    assert f"{unclosed}, line 3" in message and "left open" in message, message

    message = fails(["--gin_file=gin/testing/sft.gin", "--gin_bindings=train_lib.SFTStage.steps=["])
    assert "--gin_bindings='train_lib.SFTStage.steps=['" in message, message

    # A binding on a module the file never imports (dynamic registration needs the import).
    unimported = tmp_path / "unimported.gin"
    unimported.write_text(
        "from __gin__ import dynamic_registration\ninclude 'gin/testing/sft.gin'\n"
        "train_lib.SFTStage.steps = 3\n"
    )
    message = fails([f"--gin_file={unimported}"])
    assert f"{unimported}" in message and "'train_lib' was not provided by an import" in message


# ---------------------------------------------------------------------------------------
# A truncated checkpoint to start from.


def tiny_policy(folder, *, missing_rows=0):
    """Writes a 1-layer policy with its tokenizer to `folder` (a run's `init_from`); its
    embedding has `missing_rows` fewer rows than the tokenizer has tokens. Returns the
    tokenizer."""
    from flax import nnx

    from medjax.models import checkpoint, tokenizer
    from medjax.models.config import ModelConfig
    from medjax.models.transformer import DecoderLM

    tok = tokenizer.train_bpe(["the patient has a fever"] * 20, validate.MIN_VOCAB_SIZE + 8)
    config = ModelConfig(
        family="llama", vocab_size=len(tok) - missing_rows, hidden_size=16,
        intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
        max_position_embeddings=256,
    )  # fmt: skip
    checkpoint.save_pretrained(DecoderLM(config, rngs=nnx.Rngs(0)), str(folder))
    tok.save_pretrained(str(folder))
    return tok


def test_a_truncated_init_from_checkpoint_names_the_file(data, tmp_path):
    folder = tmp_path / "policy"
    tiny_policy(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    run_dir = tmp_path / "run"
    # This tokenizer spends ~2,300 tokens on a prompt: budgets that hold it, so that the
    # budget checks (before the weights are read) pass and the weights are read.
    budgets = ("train_lib.SFTStage.max_length=4096", "rl.ResearchTask.max_context_tokens=4096")
    args = argv("sft", run_dir, f"train_lib.train.init_from='{folder}'", *budgets,
                data_dir=data["data_dir"])  # fmt: skip
    message = fails(args)
    assert "init_from" in message and str(folder) in message, message
    assert not run_dir.exists()


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(data, tmp_path):
    """A checkpoint whose tokenizer has more tokens than its embedding has rows: the ids past
    the rows would be clamped by the embedding lookup (no error on CPU or TPU) and train the
    wrong rows. Catches the pairing going unchecked."""
    folder = tmp_path / "policy"
    tok = tiny_policy(folder, missing_rows=3)

    run_dir = tmp_path / "run"
    budgets = ("train_lib.SFTStage.max_length=4096", "rl.ResearchTask.max_context_tokens=4096")
    args = argv("sft", run_dir, f"train_lib.train.init_from='{folder}'", *budgets,
                data_dir=data["data_dir"])  # fmt: skip
    message = fails(args)
    assert message == (
        f"run_train: error: init_from {folder}: the tokenizer has {len(tok)} tokens, but the"
        f" model's vocab_size is {len(tok) - 3}."
    ), message
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------
# Disk full.


def test_no_space_left_while_writing_is_one_line_naming_the_run(data, tmp_path, monkeypatch):
    """The first write of a run (run.json) fails as on a full disk: write() raises ENOSPC."""
    real_write_text = paths.write_text

    def full_write_text(path, text):
        if os.fspath(path).endswith("run.json"):
            # As write() raises it: an OSError that names no file.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_text(path, text)

    monkeypatch.setattr(paths, "write_text", full_write_text)
    run_dir = tmp_path / "run"
    args = argv("sft", run_dir, "train_lib.train.mesh_shape=(8, 1, 1)", data_dir=data["data_dir"])
    message = fails(args)
    assert f"{run_dir}/run.json: no space left on device" in message, message


def test_a_full_disk_under_the_hpo_cache_costs_a_reparse_not_the_run(tmp_path, monkeypatch, caplog):
    """The parsed-HPO cache (written by the first run on a machine) failing with ENOSPC: the
    release is still returned, a warning names the cache file, and no partial file stays."""
    from tests.hardening.test_agent_parser import write_release

    def full(file, **arrays):
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hpo.np, "savez", full)
    release, cache = write_release(tmp_path / "release"), tmp_path / "cache"
    data = hpo.load(release, cache=cache)
    assert data.disease_names == {"OMIM:100": "Kappa syndrome", "OMIM:200": "Lambda disease"}
    assert list(cache.iterdir()) == []
    (record,) = [r for r in caplog.records if r.name == "medjax.knowledge.hpo"]
    assert f"not caching the parsed release at {cache}/hpo-" in record.getMessage()
    assert "No space left on device" in record.getMessage()


@pytest.mark.slow
def test_a_disk_filling_up_mid_run_is_one_error_line(data, tmp_path):
    """A real write failure of every writer in the process (orbax's threads included): a
    100 kB file size limit, which the first checkpoint exceeds. Python ignores SIGXFSZ, so
    the writes fail with EFBIG as they would with ENOSPC on a full disk."""
    run_dir = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    # The limit holds for every file: keep the shared compilation cache out of it.
    env = {k: v for k, v in data["env"].items() if not k.startswith("JAX_COMPILATION_CACHE")}
    # An empty cache, as on a machine's first run: the caches' writes fail too.
    env["MEDJAX_CACHE"] = str(tmp_path / "cache")
    out = subprocess.run(
        [sys.executable, "run_train.py", *argv("sft", run_dir, "train_lib.train.evaluate=False",
                                               data_dir=data["data_dir"])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit,
    )  # fmt: skip
    assert out.returncode != 0
    # No traceback at all: not orbax's logged write failures, not the "Event loop is closed"
    # of tensorstore's threads (sys.unraisablehook), not the trainer's own.
    assert "Traceback" not in out.stderr and "Event loop" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if not line.startswith("sft step ")]
    # The first run on a machine also caches the parsed HPO release and the BM25 index,
    # which fail alike: a one-line warning each, and the run goes on.
    warnings = [line for line in lines if line.startswith("WARNING:medjax.knowledge.")]
    assert len(warnings) == 2, out.stderr[-3000:]
    assert "not caching the parsed release at" in warnings[0], warnings
    assert "not caching the BM25 index at" in warnings[1], warnings
    errors = [line for line in lines if line not in warnings and not line.startswith("DEBUG:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith(f"run_train: error: {run_dir}/sft/checkpoints/"), errors[0]
    assert "no space left" in errors[0]


# ---------------------------------------------------------------------------------------
# A rerun with other settings.


def test_settings_differences_name_each_key_with_old_and_new_values():
    old = {"seed": 0, "model.hidden_size": 32, "sft.steps": 2, "gin:LR": "0.1", "rl.steps": 4}
    new = {"seed": 0, "model.hidden_size": 64, "sft.steps": 4, "gin:LR": "0.2", "rl.steps": 5}
    assert validate.differences(old, new, unfinished=["rl"]) == [
        "gin:LR: '0.1' -> '0.2'", "model.hidden_size: 32 -> 64", "sft.steps: 2 -> 4",
    ]  # fmt: skip
    # Gin bindings on one side only (a notebook resuming a command-line run): values only.
    assert validate.differences(old, {**old, "gin:LR": "x"}, ["rl"]) == ["gin:LR: '0.1' -> 'x'"]
    no_gin = {k: v for k, v in old.items() if not k.startswith("gin:")}
    assert validate.differences(old, no_gin) == []
    assert validate.differences({"a": 1}, {"b": 1}) == ["a: 1 -> (unset)", "b: (unset) -> 1"]
    # A run recorded before scan_layers existed was started unscanned: it resumes unscanned
    # and stops, naming the setting, when asked to resume scanned.
    assert validate.differences({"seed": 0}, {"seed": 0, "scan_layers": False}) == []
    assert validate.differences({"seed": 0}, {"seed": 0, "scan_layers": True}) == [
        "scan_layers: False -> True"
    ]


def test_gin_bindings_join_continuation_lines_and_skip_the_run_dir_macro():
    text = (
        "from __gin__ import dynamic_registration\n# Macros:\nLR = 0.1\nRUN_DIR = '/a'\n\n"
        "# Parameters for train_lib.train:\n"
        "train_lib.train.run_dir = %RUN_DIR\ntrain_lib.train.stages = \\\n"
        "    [@train_lib.SFTStage(),\n     @train_lib.RLStage()]\n"
    )
    assert validate.gin_bindings(text) == {
        "LR": "0.1",
        "train_lib.train.run_dir": "%RUN_DIR",
        "train_lib.train.stages": "[@train_lib.SFTStage(), @train_lib.RLStage()]",
    }


@pytest.mark.slow
def test_a_rerun_with_other_settings_names_them_and_the_same_settings_finish(data, tmp_path):
    run_dir = tmp_path / "run"
    base = ("train_lib.train.evaluate=False", "train_lib.SFTStage.steps=1")
    cmd = [sys.executable, "run_train.py", *argv("sft", run_dir, *base, data_dir=data["data_dir"])]
    first = subprocess.run(cmd, cwd=ROOT, env=data["env"], capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = json.loads((run_dir / "run.json").read_text())["settings"]
    assert recorded["model.hidden_size"] == 32 and recorded["sft.batch_size"] == 2
    before = snapshot(run_dir)

    def rerun(*bindings):
        return fails(argv("sft", run_dir, *base, *bindings, data_dir=data["data_dir"]))

    message = rerun("config.ModelConfig.hidden_size=64")
    assert f"run_dir {run_dir} was started with other settings" in message, message
    assert "model.hidden_size: 32 -> 64" in message
    message = rerun("sft/optim.make_optimizer.learning_rate=0.5", "train_lib.train.seed=3")
    assert "gin:sft/optim.make_optimizer.learning_rate: '0.001' -> '0.5'" in message, message
    assert "seed: 0 -> 3" in message
    # The stage finished: more steps would silently reuse its export.
    message = rerun("train_lib.SFTStage.steps=2")
    assert "sft.steps: 1 -> 2" in message, message
    assert snapshot(run_dir) == before

    # A rerun with the same settings (on another mesh, too) resumes and finishes: the
    # resume tests of tests/integration/test_train.py run exactly that.


# ---------------------------------------------------------------------------------------
# The shipped configurations pass the checks.


class _ValidatedError(Exception):
    """Raised where train() starts work, once every check has passed."""


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (ROOT / "gin" / "experiments").glob("*.gin"))
)
def test_every_shipped_experiment_passes_validation(config, tmp_path, monkeypatch):
    def started(self):
        raise _ValidatedError

    monkeypatch.setattr(disk.NoSpaceLogFilter, "install", started)
    checkpoint = tmp_path / "checkpoint"  # What the real-scale runs' CHECKPOINT names.
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    args = [f"--gin_file=gin/experiments/{config}", f"--gin_bindings=RUN_DIR='{tmp_path}/run'",
            f"--gin_bindings=CHECKPOINT='{checkpoint}'",
            f"--gin_bindings=train_lib.train.run_dir='{tmp_path}/run'"]  # fmt: skip
    reset_gin()
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        with pytest.raises(_ValidatedError):
            run_train.main(args)
    finally:
        os.chdir(old)
    assert not (tmp_path / "run").exists()
