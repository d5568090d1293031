"""medjax.training.metrics: scalars written to metrics.jsonl and to TensorBoard event files and
read back exactly (float32 in TensorBoard), NaN/inf round trips, truncation and purge on resume,
silent non-writers, the plain progress lines, and corrupt event files."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.training import metrics

F32_TENTH = float(np.float32(0.1))  # 0.10000000149011612: what TensorBoard keeps of 0.1.


def event_files(logdir):
    return sorted(p for p in logdir.iterdir() if p.name.startswith("events.out.tfevents."))


def test_crc32c_rfc3720_vectors():
    # The check value of CRC-32C and the iSCSI test vectors of RFC 3720, appendix B.4.
    for crc in (metrics._crc32c_python, metrics.crc32c):
        assert crc(b"123456789") == 0xE3069283
        assert crc(bytes(32)) == 0x8A9136AA
        assert crc(b"\xff" * 32) == 0x62A8AB43
        assert crc(bytes(range(32))) == 0x46DD794E


def test_write_reads_back_from_jsonl_and_events(tmp_path):
    with metrics.MetricsWriter(tmp_path, total_steps=3, interactive=False) as writer:
        writer.start(0)
        writer.write(1, {"loss": 0.5, "reward_mean": 1, "eval/accuracy": np.float32(0.25)})
        writer.write(2, {"loss": 0.1, "reward_mean": np.int32(2), "eval/accuracy": 0.75})
        writer.write(
            jnp.asarray(3),
            {
                "loss": jnp.asarray(0.1, jnp.float32),
                "reward_mean": jnp.asarray([1.5], jnp.bfloat16),
                "eval/accuracy": True,
            },
        )
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == "metrics.jsonl"
    assert len(event_files(tmp_path)) == 1

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert list(json.loads(lines[0])) == ["step", "time", "eval/accuracy", "loss", "reward_mean"]
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == [0.5, 0.1, F32_TENTH]
    assert [r["reward_mean"] for r in records] == [1.0, 2.0, 1.5]
    assert [r["eval/accuracy"] for r in records] == [0.25, 0.75, 1.0]
    assert all(isinstance(r["reward_mean"], float) for r in records)
    assert records[0]["time"] <= records[1]["time"] <= records[2]["time"]

    assert metrics.read_event_scalars(tmp_path) == {
        "loss": [(1, 0.5), (2, F32_TENTH), (3, F32_TENTH)],
        "reward_mean": [(1, 1.0), (2, 2.0), (3, 1.5)],
        "eval/accuracy": [(1, 0.25), (2, 0.75), (3, 1.0)],
    }


def test_nonfinite_values_round_trip(tmp_path):
    with metrics.MetricsWriter(tmp_path, interactive=False) as writer:
        writer.write(7, {"a": math.nan, "b": np.float32(np.inf), "c": jnp.asarray(-jnp.inf)})
    line = (tmp_path / "metrics.jsonl").read_text()

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    raw = json.loads(line, parse_constant=no_constants)
    assert (raw["a"], raw["b"], raw["c"]) == ("nan", "inf", "-inf")
    (record,) = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf
    scalars = metrics.read_event_scalars(tmp_path)
    assert scalars["a"][0][0] == 7 and math.isnan(scalars["a"][0][1])
    assert scalars["b"] == [(7, math.inf)] and scalars["c"] == [(7, -math.inf)]


def test_truncate_after_and_resume(tmp_path):
    assert metrics.MetricsWriter(tmp_path, interactive=False).truncate_after(0) == 0
    assert list(tmp_path.iterdir()) == []

    with metrics.MetricsWriter(tmp_path, interactive=False) as writer:
        writer.start(0)
        for step in range(1, 6):
            writer.write(step, {"loss": step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # A crash in the middle of a line.

    with metrics.MetricsWriter(tmp_path, interactive=False) as writer:
        assert writer.truncate_after(3) == 3
        assert [r["step"] for r in metrics.read_jsonl(writer.jsonl_path)] == [1, 2, 3]
        assert writer.truncate_after(3) == 0
        writer.start(3)
        writer.write(4, {"loss": 40})
        writer.write(5, {"loss": 50})

    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
    # Both runs' files are there; the second one's purge mark hides the first one's 4 and 5.
    assert len(event_files(tmp_path)) == 2
    assert metrics.read_event_scalars(tmp_path) == {
        "loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    }


def test_non_writer_writes_and_shows_nothing(tmp_path, capfd):
    run_dir = tmp_path / "run"
    for interactive in (False, True):
        with metrics.MetricsWriter(
            run_dir, total_steps=10, is_writer=False, interactive=interactive
        ) as writer:
            writer.start(0)
            writer.write(1, {"loss": 1.0})
            assert writer.truncate_after(0) == 0
    assert not run_dir.exists()
    assert capfd.readouterr() == ("", "")


def test_plain_progress_lines(tmp_path, capfd):
    with metrics.MetricsWriter(tmp_path, total_steps=100, interactive=False, log_every=5) as w:
        w.start(0)
        for step in range(1, 11):
            w.write(step, {"loss": 0.1234, "reward_mean": 0.5, "other": 3.0})
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("train ")]
    assert [ln.split(" loss")[0] for ln in lines] == [
        "train step 1/100",
        "train step 5/100",
        "train step 10/100",
    ]
    pattern = r"train step 10/100 loss=0\.1234 reward_mean=0\.5 \([0-9.e+-]+ s/step, ETA \S+\)"
    assert re.fullmatch(pattern, lines[-1]), lines[-1]


def test_the_eta_leaves_out_compilation(tmp_path, capfd, monkeypatch):
    """Step 1 takes 50 s of which 42 s compile (JAX's compile-duration events), steps 2-4
    take 2 s each: the rate is 8 s then 2 s per step, the ETA 9 x 8 s then 6 x 2 s."""
    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    with metrics.MetricsWriter(tmp_path, total_steps=10, interactive=False, log_every=3) as w:
        w.start(0)
        clock[0] += 50.0
        jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 30)
        jax.monitoring.record_event_duration_secs("/jax/core/compile/jaxpr_trace_duration", 12)
        jax.monitoring.record_event_duration_secs("/jax/other/not_compiling", 5.0)
        w.write(1, {"loss": 1.0})
        for step in (2, 3, 4):
            clock[0] += 2.0
            w.write(step, {"loss": 1.0})
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("train ")]
    assert lines == [
        "train step 1/10 loss=1 (8 s/step + 42 s compiling, ETA 1m12s)",
        "train step 3/10 loss=1 (2 s/step, ETA 14s)",
    ]


def test_plain_progress_without_total_or_start_shows_sorted_keys(tmp_path, capfd):
    with metrics.MetricsWriter(tmp_path, interactive=False, desc="eval", subdir="eval") as w:
        w.write(4, {"b": 2.0, "a": 1.0, "d": 4.0, "c": 3.0})
    assert "eval step 4 a=1 b=2 c=3\n" in capfd.readouterr().err
    assert (tmp_path / "eval" / "metrics.jsonl").exists()
    assert metrics.read_event_scalars(tmp_path) == {}
    assert metrics.read_event_scalars(tmp_path / "eval")["d"] == [(4, 4.0)]


def test_progress_bar(tmp_path, capfd):
    with metrics.MetricsWriter(tmp_path, total_steps=10, interactive=True) as writer:
        writer.start(2)
        for step in range(3, 8):
            writer.write(step, {"loss": 0.25})
    err = capfd.readouterr().err
    assert "7/10" in err and "loss=0.25" in err


def test_bad_keys_and_values_raise(tmp_path):
    with metrics.MetricsWriter(tmp_path, interactive=False) as writer:
        for key in ("step", "time", "a b", "/loss", ""):
            with pytest.raises(ValueError, match="bad key"):
                writer.write(1, {key: 1.0})
        with pytest.raises(ValueError, match=r"shape \(2,\)"):
            writer.write(1, {"loss": jnp.zeros(2)})
        with pytest.raises(ValueError, match="one real number"):
            writer.write(1, {"loss": "high"})
    with pytest.raises(ValueError, match="closed"):
        writer.write(1, {"loss": 1.0})
    writer.close()


@pytest.mark.parametrize("where", ["length", "data", "truncated"])
def test_corrupt_event_file_raises_naming_the_file(tmp_path, where):
    with metrics.MetricsWriter(tmp_path, interactive=False) as writer:
        for step in range(1, 4):
            writer.write(step, {"loss": step})
    (path,) = event_files(tmp_path)
    data = bytearray(path.read_bytes())
    if where == "length":
        data[0] ^= 0x01  # The first record's length.
    elif where == "data":
        data[-6] ^= 0x01  # Inside the last record's Event proto.
    else:
        del data[-3:]
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(path.name) + ".*offset"):
        metrics.read_event_scalars(tmp_path)


def test_reward_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    """train_lib's plot (and the dialogue report's) must not switch pyplot's backend: in a
    notebook that would silence every later plt.show()."""
    import matplotlib

    from medjax.training import evaluation

    with metrics.MetricsWriter(tmp_path, subdir="rl", interactive=False) as writer:
        writer.start(0)
        for step in (1, 2):
            writer.write(step, {"reward/mean": 0.1 * step})
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        path = evaluation.plot_rewards(str(tmp_path), "rl")
        assert matplotlib.get_backend() == "svg"
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)
