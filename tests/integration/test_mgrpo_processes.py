"""Decoupled M-GRPO end to end: the main and sub-agent trainers as two real OS processes
(run_train.py with gin/testing/mgrpo_main.gin and mgrpo_sub.gin) exchanging statistics
through a file store and a real Redis server.

- In lockstep, two processes compute exactly what one process computes (the same
  rollouts, rewards, advantages, updates: metrics and final weights equal).
- SIGKILL of the sub process and later of the main one: both resume, and the sub trainer's
  applied rollout statistics equal the published ones exactly (no loss, no duplicates).

Both processes start from one tiny policy the fixture teaches to call `delegate` (a model
initialised at random never calls a tool, so no request would reach the sub-agent).
"""

import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from medjax import agents, datasets, partitioning, store
from medjax.datasets import med_kg_qa
from medjax.envs import research
from medjax.models import DecoderLM, ModelConfig
from medjax.models import checkpoint as checkpoint_lib
from medjax.models import tokenizer as tokenizer_lib
from medjax.training import data, decoupled, metrics, rl, steps

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
UNTIMED = ("time", "tokens_per_s", "compile", "decoupled")


@pytest.fixture(scope="module")
def policy(env, shared_tmp, optimized_xla_module):
    """A 0.1M-parameter policy that delegates: SFT on chats where the main agent delegates
    and then answers, and the searcher answers or fails (a Hugging Face folder). Built
    once per run: xdist workers that get tests of this module share it."""
    path = shared_tmp / "delegating_policy"
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").exists():
            _train_delegating_policy(env, path)
    return str(path)


def _train_delegating_policy(env, path):
    chats = datasets.load("med_kg_qa_trajectories/tiny", "train", env["data_dir"])
    chats = [med_kg_qa.to_trajectory(chats[i]) for i in range(len(chats))]
    texts = [m["content"] for c in chats for m in c["messages"]]
    # 2,048 tokens: the searcher's system prompt is ~480 tokens (947 with 512), so prompts fit
    # the 512 and 1,024 length buckets and the rollouts' prefill stays small.
    tok = tokenizer_lib.train_bpe(texts, 2048)
    task = rl.ResearchTask()
    main = task.agent(None, None, hierarchical=True, remote_sub_agent=lambda calls: [])
    searcher = task.sub_agent(research.build_environment(), None)
    system = {a.name: agents.system_prompt(a) for a in (main, searcher)}
    rows = []
    for i in range(8):
        question = data.research_record(chats[i])["question"]
        call = {"name": "delegate", "arguments": {"task": "find it"}}
        rows.append([
            {"role": "system", "content": system["main"]},
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"<tool_call>{json.dumps(call)}</tool_call>"},
            {"role": "user", "content": "<tool_response>\nfound\n</tool_response>"},
            {"role": "assistant", "content": "<answer>x</answer>"},
        ])  # fmt: skip
        rows.append([
            {"role": "system", "content": system["searcher"]},
            {"role": "user", "content": "find it"},
            # Half the searcher's replies answer, half are format errors: its rewards vary.
            {"role": "assistant", "content": "<answer>found</answer>" if i % 2 else "hmm"},
        ])  # fmt: skip
    ids = [data.chat_ids(tok, r) for r in rows]
    batch = data.pad_rows(ids, data.bucket(max(len(i) for i, _ in ids)), pad_id=tok.pad_token_id)
    batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    config = ModelConfig(
        family="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
        num_layers=1, num_heads=2, num_kv_heads=1, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=4096,
    )  # fmt: skip
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        model = DecoderLM(config, rngs=nnx.Rngs(0))
    tx = optax.adam(1e-2)
    graphdef, state = steps.create_state(model, tx, 0, mesh)
    step_fn = steps.make_train_step(graphdef, tx, steps.sft_loss_fn)
    for _ in range(60):
        state, m = step_fn(state, batch)
    assert float(m["loss"]) < 0.5, float(m["loss"])  # The chats are learnt.
    tmp = path.with_name(path.name + ".tmp")
    checkpoint_lib.save_pretrained(nnx.merge(graphdef, state.params), tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)


def command(config, run_dir, env, policy, store_url, *bindings):
    cmd = [sys.executable, "run_train.py", f"--gin_file=gin/testing/{config}.gin"]
    cmd += [f"--gin_bindings=RUN_DIR='{run_dir}'", f"--gin_bindings=DATA_DIR='{env['data_dir']}'"]
    cmd += [f"--gin_bindings=train_lib.train.init_from='{policy}'"]
    if store_url is not None:
        cmd += [f"--gin_bindings=STORE='{store_url}'"]
    return cmd + [f"--gin_bindings={b}" for b in bindings]


def start(config, run_dir, env, policy, store_url, *bindings):
    log = open(f"{run_dir}.log", "a")  # noqa: SIM115 - closed when the process ends.
    return subprocess.Popen(
        command(config, run_dir, env, policy, store_url, *bindings), cwd=ROOT,
        env=env["env"], stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc, run_dir, timeout=400):
    code = proc.wait(timeout=timeout)
    log = pathlib.Path(f"{run_dir}.log").read_text()
    assert code == 0, f"{run_dir} failed ({code}):\n{log[-4000:]}"


def learning(path, keys=None):
    out = []
    for r in metrics.read_jsonl(path):
        r = {k: v for k, v in r.items() if not k.startswith(UNTIMED)}
        out.append(r if keys is None else {k: v for k, v in r.items() if k in keys})
    return out


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_applied_equals_published(s: store.Store, sub_run: pathlib.Path, num_steps: int):
    published = [s.get(decoupled.step_key(i)) for i in range(num_steps)]
    applied = [s.get(decoupled.applied_key(i)) for i in range(num_steps)]
    assert all(p is not None for p in published) and all(a is not None for a in applied)
    assert s.get(decoupled.step_key(num_steps)) is None
    for p, a in zip(published, applied, strict=True):
        assert a["step"] == p["step"] and a["epoch"] == p["epoch"]
        assert [{k: v for k, v in r.items() if k != "applied_sub_ids"} for r in a["rollouts"]] == p[
            "rollouts"
        ]
    # The applied set the sub's last checkpoint holds: every published rollout, once.
    ckpt = sub_run / "rl" / "checkpoints"
    last = max(int(d) for d in os.listdir(ckpt))
    meta = json.loads((ckpt / str(last) / "meta" / "metadata").read_text())
    keys = [r["key"] for p in published for r in p["rollouts"]]
    assert meta["applied"] == keys and len(set(keys)) == len(keys)
    return published


def test_two_processes_compute_what_one_process_computes(env, policy, tmp_path):
    one = tmp_path / "one"
    out = subprocess.run(
        command("mgrpo_distinct", one, env, policy, None), cwd=ROOT, env=env["env"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    url = f"file://{tmp_path / 'store'}"
    sub = start("mgrpo_sub", tmp_path / "sub", env, policy, url)
    main = start("mgrpo_main", tmp_path / "main", env, policy, url)
    finish(main, tmp_path / "main")
    finish(sub, tmp_path / "sub")

    reference = learning(one / "rl" / "metrics.jsonl")
    main_records = learning(tmp_path / "main" / "rl" / "metrics.jsonl")
    sub_records = learning(tmp_path / "sub" / "rl" / "metrics.jsonl")
    assert [r["step"] for r in main_records] == [1, 2, 3] == [r["step"] for r in sub_records]
    # The rollouts delegated, the sub-agent's episodes were trained on, both policies moved.
    assert sum(r["sub/count_mean"] for r in sub_records) > 0
    assert any(r["update/grad_norm"] > 0 for r in main_records)
    assert any(r["update/grad_norm"] > 0 for r in sub_records)
    # Main side: every statistic of the one-process run, same values (the update metrics of
    # the one-process run average main and sub updates, so they are compared via weights).
    for ref, got in zip(reference, main_records, strict=True):
        shared = {k for k in got if not k.startswith(("update/", "sub/"))}
        assert {k: ref[k] for k in shared} == {k: got[k] for k in shared}
    for ref, got in zip(reference, sub_records, strict=True):
        subs = {k for k in got if k.startswith("sub/")}
        assert {k: ref[k] for k in subs} == {k: got[k] for k in subs}
    for name, (a, b) in {
        "main": (one / "rl" / "export", tmp_path / "main" / "rl" / "export"),
        "sub": (one / "rl" / "export_sub", tmp_path / "sub" / "rl" / "export"),
    }.items():
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_array_equal(wa[k], wb[k], err_msg=f"{name} {k}")
    published = assert_applied_equals_published(
        store.open_store(url), tmp_path / "sub", num_steps=3
    )
    assert sum(len(r["sub_ids"]) for p in published for r in p["rollouts"]) > 0


def wait_until(predicate, what, timeout=300, poll=0.01):
    deadline = time.time() + timeout
    while not (value := predicate()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return value


def test_sigkill_of_either_process_loses_and_repeats_nothing(env, policy, redis_server, tmp_path):
    """Redis store. The sub process is killed right after it applied a step (its async
    checkpoint may or may not have landed) and restarted; later the main process is killed
    and restarted. The main trainer may run 2 steps ahead of the sub trainer."""
    url = f"{redis_server}?namespace=faults"
    s = store.open_store(url)
    num_steps = 7
    bindings = (f"train_lib.RLStage.steps={num_steps}", "decoupled.Decoupled.max_sub_lag=2")
    sub_dir, main_dir = tmp_path / "sub", tmp_path / "main"
    sub = start("mgrpo_sub", sub_dir, env, policy, url, *bindings)
    main = start("mgrpo_main", main_dir, env, policy, url, *bindings)

    def applied():
        return (s.get("sub/progress") or {}).get("applied_steps", 0)

    wait_until(lambda: applied() >= 1, "the sub trainer's first step")
    sub.send_signal(signal.SIGKILL)
    sub.wait()
    killed_at = applied()
    # The main run goes on: the calls of its next step fail fast and are counted.
    failures = wait_until(
        lambda: (s.get("main/progress") or {}).get("delegate_failures", 0), "a failed delegate"
    )
    t0 = time.time()
    sub = start("mgrpo_sub", sub_dir, env, policy, url, *bindings)
    wait_until(lambda: applied() > killed_at, "the restarted sub trainer's next step")
    sub_recovery_s = time.time() - t0

    wait_until(lambda: s.get(decoupled.step_key(4)), "main step 4")
    main.send_signal(signal.SIGKILL)
    main.wait()
    published_before = len(s.list("main/steps/"))
    seen = len(pathlib.Path(f"{sub_dir}.log").read_text())
    wait_until(
        lambda: "waiting for main step" in pathlib.Path(f"{sub_dir}.log").read_text()[seen:],
        "the sub's status line while the main process is down", timeout=60,
    )  # fmt: skip
    t0 = time.time()
    main = start("mgrpo_main", main_dir, env, policy, url, *bindings)
    wait_until(lambda: len(s.list("main/steps/")) > published_before, "a new main step")
    main_recovery_s = time.time() - t0
    finish(main, main_dir)
    finish(sub, sub_dir)

    published = assert_applied_equals_published(s, sub_dir, num_steps)
    for run_dir in (main_dir, sub_dir):  # Both policies updated.
        records = metrics.read_jsonl(run_dir / "rl" / "metrics.jsonl")
        assert [r["step"] for r in records] == list(range(1, num_steps + 1))
        assert any(r["update/grad_norm"] > 0 for r in records)
    assert [p["epoch"] for p in published][-1] == 2  # Steps after the restart: epoch 2.
    assert (s.get("main/epoch") or {})["epoch"] == 2
    assert failures > 0
    assert "resumed from step" in pathlib.Path(f"{main_dir}.log").read_text()
    sub_log = pathlib.Path(f"{sub_dir}.log").read_text()
    assert sub_log.count("sub-agent serving") == 2
    print(
        f"\nsub killed after {killed_at} applied steps; {failures} delegate calls failed;"
        f" sub recovery {sub_recovery_s:.1f} s; main recovery {main_recovery_s:.1f} s;"
        f" {len(published)} steps, {sum(len(p['rollouts']) for p in published)} rollout"
        f" statistics, {sum(len(r['sub_ids']) for p in published for r in p['rollouts'])}"
        " sub-trajectories referenced"
    )


def test_main_only_training_freezes_the_sub_agent(env, policy, tmp_path):
    """The co-training baselines' switches (one process, distinct models): a frozen
    sub-agent started from its own folder, no trajectory alignment, hard questions only,
    and held-out evaluations of the main agent over its sub-agent."""
    run_dir = tmp_path / "run"
    out = subprocess.run(
        command(
            "mgrpo_distinct", run_dir, env, policy, None, "train_lib.RLStage.steps=2",
            "train_lib.RLStage.train_sub=False", f"train_lib.RLStage.sub_init_from='{policy}'",
            "train_lib.RLStage.sub_alignment=False", "train_lib.RLStage.hops=(4, 6)",
            "train_lib.RLStage.heldout_every=2",
        ),
        cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    records = metrics.read_jsonl(run_dir / "rl" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sub/duplicated"] == r["sub/dropped"] == 0 for r in records)
    assert all(4 <= r["data/hops_mean"] <= 6 for r in records)
    assert "heldout/accuracy" in records[1] and "heldout/accuracy" not in records[0]
    start, frozen = weights(policy), weights(run_dir / "rl" / "export_sub")
    assert start.keys() == frozen.keys()
    for k in start:
        np.testing.assert_array_equal(start[k], frozen[k], err_msg=k)
    main = weights(run_dir / "rl" / "export")
    assert any(not np.array_equal(start[k], main[k]) for k in start)
