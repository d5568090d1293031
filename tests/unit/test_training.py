"""medjax.training: chat masks, batching, exact gradient accumulation, the non-finite guard,
and that SFT and GRPO steps learn tiny tasks (thresholds stated in each test)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medjax import losses, partitioning, sampling, scoring
from medjax.models import DecoderLM, ModelConfig
from medjax.models import tokenizer as tokenizer_lib
from medjax.training import data, evaluation, optim, rl, steps

TINY = ModelConfig(
    family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=2, num_kv_heads=1, qkv_bias=True, tie_word_embeddings=True,
)  # fmt: skip


def tiny_model(seed=0, config=TINY):
    mesh = partitioning.make_mesh(1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        model = DecoderLM(config, rngs=nnx.Rngs(seed))
    return partitioning.shard_module(model, mesh), mesh


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["the patient has a fever and a cough", "search read answer"] * 20
    return tokenizer_lib.train_bpe(corpus, 300)


def test_chat_ids_masks_exactly_the_assistant_contents(tokenizer):
    messages = [
        {"role": "system", "content": "You research."},
        {"role": "user", "content": "What causes fever?"},
        {"role": "assistant", "content": "<think>look</think><tool_call>{}</tool_call>"},
        {"role": "user", "content": "<tool_response>\nfever docs\n</tool_response>"},
        {"role": "assistant", "content": "<answer>a cough</answer>"},
    ]
    ids, mask = data.chat_ids(tokenizer, messages)
    # The whole chat, written out by hand in the template's format.
    text = (
        "<|im_start|>system\nYou research.<|im_end|>\n"
        "<|im_start|>user\nWhat causes fever?<|im_end|>\n"
        "<|im_start|>assistant\n<think>look</think><tool_call>{}</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nfever docs\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<answer>a cough</answer><|im_end|>\n"
    )
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    assert [tokenizer.decode(r) for r in runs] == [
        "<think>look</think><tool_call>{}</tool_call>",
        "<answer>a cough</answer>",
    ]


def test_truncate_observations_cuts_only_tool_responses():
    messages = [
        {"role": "user", "content": "x" * 50},
        {"role": "user", "content": "<tool_response>\n" + "y" * 50 + "\n</tool_response>"},
        {"role": "assistant", "content": "z" * 50},
    ]
    out = data.truncate_observations(messages, 20)
    assert out[0]["content"] == "x" * 50 and out[2]["content"] == "z" * 50
    # 20 characters: 4 kept, then the 16-character mark "\n[... truncated]".
    assert out[1]["content"] == "<tool_response>\nyyyy\n[... truncated]\n</tool_response>"
    assert data.truncate_observations(messages, None) == messages


@pytest.mark.parametrize(
    "length,width", [(1, 64), (64, 64), (65, 128), (256, 256), (257, 512), (1282, 1536)]
)
def test_bucket(length, width):
    assert data.bucket(length) == width


def test_index_stream_epochs_are_permutations_and_replay():
    stream = data.IndexStream(10, 5, seed=3)
    epoch0 = stream[0] + stream[1]
    epoch1 = stream[2] + stream[3]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    again = data.IndexStream(10, 5, seed=3)
    assert [again[s] for s in range(6)] == [stream[s] for s in range(6)]
    assert data.IndexStream(10, 5, seed=4)[0] != stream[0]
    with pytest.raises(ValueError, match="empty"):
        data.IndexStream(0, 5, seed=0)


def ragged_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, (4, 12)).astype(np.int32)
    attention = np.ones((4, 12), np.int32)
    attention[1, 8:] = 0
    attention[3, 5:] = 0
    loss_mask = attention.copy()
    loss_mask[:, :3] = 0  # A "prompt" of 3 tokens.
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def direct_sft_grads(graphdef, params, batch):
    def loss(p):
        model = nnx.merge(graphdef, p)
        logps = scoring.score_sequences(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        )
        # Token-mean NLL written out: -sum(logp * mask) / sum(mask).
        mask = batch["loss_mask"]
        return -(logps * mask).sum() / mask.sum()

    return jax.jit(jax.grad(loss))(params)  # Jitted: eager op-by-op grads took 11 s.


@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
def test_accumulated_step_equals_the_full_batch_gradient(num_microbatches):
    model, mesh = tiny_model()
    tx = optax.sgd(1.0)
    graphdef, state = steps.create_state(model, tx, 0, mesh)
    before = jax.tree.map(np.asarray, state.params)
    batch = {k: jnp.asarray(v) for k, v in ragged_batch().items()}
    expected = direct_sft_grads(graphdef, state.params, batch)
    step = steps.make_train_step(
        graphdef, tx, steps.sft_loss_fn, num_microbatches=num_microbatches,
        state_shardings=steps.shardings_of(state),
    )  # fmt: skip
    state, metrics = step(state, batch)
    # Rows hold 9, 5, 9 and 2 target tokens: the loss is their pooled mean.
    assert float(metrics["loss_denominator"]) == 25
    assert int(metrics["update_skipped"]) == 0 and int(state.step) == 1
    jax.tree.map(
        lambda b, a, g: np.testing.assert_allclose(b - a, g, rtol=2e-5, atol=1e-7),
        before, jax.tree.map(np.asarray, state.params), expected,
    )  # fmt: skip


@jax.custom_vjp
def scaled_gradient(x, factor):
    """x, whose gradient is multiplied by `factor`: a finite loss with a non-finite gradient."""
    return x


scaled_gradient.defvjp(
    lambda x, factor: (x, factor), lambda factor, g: (g * factor, jnp.zeros_like(factor))
)


def poisoned_sft_loss_fn(model, batch):
    """The SFT loss with every gradient multiplied by `batch["factor"]` (the value unchanged)."""
    value, metrics = steps.sft_loss_fn(model, batch)
    metrics = dict(
        metrics, loss_numerator=scaled_gradient(metrics["loss_numerator"], batch["factor"])
    )
    return value, metrics


@pytest.mark.parametrize("poison", ["nan advantage", "nan gradient", "inf gradient"])
def test_the_non_finite_guard_skips_the_update(poison):
    """A non-finite loss, or a finite loss whose gradient is NaN or inf, leaves parameters
    and optimizer state untouched (`update_skipped` 1); the next, finite step updates every
    parameter. Catches a guard that checks the loss alone, or lets the optimizer state take
    the bad gradient."""
    model, mesh = tiny_model()
    tx = optim.make_optimizer(1e-2)
    graphdef, state = steps.create_state(model, tx, 0, mesh)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    batch = {k: jnp.asarray(v) for k, v in ragged_batch().items()}
    if poison == "nan advantage":
        loss_fn = steps.policy_loss_fn(losses.grpo_loss)
        batch["advantages"] = jnp.array([1.0, np.nan, -1.0, 0.5])
        clean = dict(batch, advantages=jnp.array([1.0, -0.5, -1.0, 0.5]))
    else:
        loss_fn = poisoned_sft_loss_fn
        batch["factor"] = jnp.float32(np.nan if poison == "nan gradient" else np.inf)
        clean = dict(batch, factor=jnp.float32(1.0))
    step = steps.make_train_step(graphdef, tx, loss_fn, state_shardings=steps.shardings_of(state))
    state, metrics = step(state, batch)
    assert int(state.step) == 1 and int(metrics["update_skipped"]) == 1
    if poison == "nan advantage":
        assert not np.isfinite(float(metrics["loss"]))
    else:  # The loss itself is finite: only the gradient tells.
        assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    state, metrics = step(state, clean)
    assert int(metrics["update_skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    changed = jax.tree.map(
        lambda b, a: not np.array_equal(b, np.asarray(a)), before[0], state.params
    )
    assert all(jax.tree.leaves(changed))


def test_score_and_update_scores_the_reference_with_the_reference_parameters(tmp_path, plain_logps):
    """KL to a reference that differs from the policy equals the k3 estimate by hand from
    plain forwards of both models; a reference equal to the policy gives exactly 0. Catches
    the reference scored with the policy's parameters (KL always 0) or the reverse."""
    from medjax.training import runtime, stages

    run, policy = score_and_update_setup(tmp_path, beta=0.1)
    batch = rollout_batch()
    other, _ = tiny_model(seed=5)
    want_policy = plain_logps(policy.model(), batch["input_ids"], batch["loss_mask"])
    want_ref = plain_logps(other, batch["input_ids"], batch["loss_mask"])
    stage = stages.RLStage(kl_beta=0.1, prompts_per_step=1)
    bad = runtime.BadSteps(0, "rl", str(tmp_path))
    job = dict(batch)
    metrics, _, _ = runtime.score_and_update(
        run, stage, [(policy, job)], runtime.params_copy(other), bad, 0, None
    )
    mask = batch["loss_mask"] > 0
    np.testing.assert_allclose(job["ref_logps"][mask], want_ref[mask], rtol=1e-5, atol=1e-6)
    d = want_ref[mask] - want_policy[mask]
    kl = np.mean(np.exp(d) - d - 1)  # k3, token mean.
    assert kl > 0.01  # The two models really differ.
    np.testing.assert_allclose(metrics["update/kl_mean"], kl, rtol=1e-4)
    assert "old_logps" not in job  # One iteration: exactly on-policy.

    run, policy = score_and_update_setup(tmp_path, beta=0.1)
    job = dict(batch)
    metrics, _, _ = runtime.score_and_update(
        run, stage, [(policy, job)], runtime.params_copy(policy.model()), bad, 0, None
    )
    assert metrics["update/kl_mean"] == 0.0


def test_score_and_update_scores_old_logps_with_the_pre_update_policy(tmp_path, plain_logps):
    """With num_iterations 2 the old log-probs are the policy's before this step's updates
    (plain forward), not the sampler's stored ones nor the updated policy's. Catches old
    log-probs scored after an update, or left as sampled."""
    from medjax.training import runtime, stages

    run, policy = score_and_update_setup(tmp_path, beta=0.0)
    batch = rollout_batch()
    want_old = plain_logps(policy.model(), batch["input_ids"], batch["loss_mask"])
    stage = stages.RLStage(num_iterations=2, prompts_per_step=1)
    job = dict(batch)
    runtime.score_and_update(
        run, stage, [(policy, job)], None, runtime.BadSteps(0, "rl", str(tmp_path)), 0, None
    )
    mask = batch["loss_mask"] > 0
    np.testing.assert_allclose(job["old_logps"][mask], want_old[mask], rtol=1e-5, atol=1e-6)
    after = plain_logps(policy.model(), batch["input_ids"], batch["loss_mask"])
    assert np.abs(after[mask] - want_old[mask]).max() > 1e-3  # Two updates moved the policy.
    assert int(policy.state.step) == 2 and "ref_logps" not in job


def score_and_update_setup(tmp_path, *, beta):
    from medjax.training import runtime

    model, mesh = tiny_model()
    run = runtime.Run(
        str(tmp_path), task=None, env=None, data=None, tokenizer=None, mesh=mesh, seed=0,
        max_bad_steps=0, interactive=False, operative_config=None,
    )  # fmt: skip
    loss_fn = steps.policy_loss_fn(functools.partial(losses.grpo_loss, beta=beta))
    policy = runtime.Policy(run, model, optim.make_optimizer(1e-2), loss_fn, 1, 1.0)
    return run, policy


def rollout_batch():
    batch = ragged_batch()
    batch["advantages"] = np.array([1.0, -0.5, -1.0, 0.5], np.float32)
    batch["old_logps"] = np.full(batch["input_ids"].shape, -0.25, np.float32)  # As sampled.
    return batch


def test_sft_memorises_four_sequences():
    """Threshold: after 80 AdamW steps the loss is below 1/4 of its initial value (random
    initialisation starts near ln 64 = 4.16)."""
    model, mesh = tiny_model()
    tx = optim.make_optimizer(1e-2, max_grad_norm=1.0)
    graphdef, state = steps.create_state(model, tx, 0, mesh)
    step = steps.make_train_step(
        graphdef, tx, steps.sft_loss_fn, state_shardings=steps.shardings_of(state)
    )
    batch = {k: jnp.asarray(v) for k, v in ragged_batch().items()}
    history = []
    for _ in range(80):
        state, metrics = step(state, batch)
        history.append(float(metrics["loss"]))
    assert history[0] > 3.5
    assert history[-1] < history[0] / 4, history[::10]


def test_grpo_steps_raise_the_reward_of_a_deterministic_task():
    """Reward: the fraction of the 4 sampled tokens that equal 7 (chance: 1/64 per token).
    Threshold: the mean reward of the last 5 of 40 GRPO steps (8 prompts x G=8) is >= 0.5,
    from under 0.1 at the first."""
    model, mesh = tiny_model(seed=1)
    tx = optim.make_optimizer(3e-2, max_grad_norm=1.0)
    graphdef, state = steps.create_state(model, tx, 0, mesh)
    loss = steps.policy_loss_fn(losses.grpo_loss)
    step = steps.make_train_step(graphdef, tx, loss, state_shardings=steps.shardings_of(state))
    prompts = jnp.tile(jnp.array([[1, 2, 3]], jnp.int32), (8, 1))
    params = sampling.SamplingParams(max_new_tokens=4, temperature=1.0)
    key = jax.random.PRNGKey(0)
    rewards = []
    for s in range(40):
        out = sampling.sample(
            nnx.merge(graphdef, state.params), prompts, jnp.ones_like(prompts),
            jax.random.fold_in(key, s), params, num_samples=8,
        )  # fmt: skip
        completions = np.asarray(out.tokens)[:, :4]
        reward = (completions == 7).mean(axis=1).astype(np.float32)
        rewards.append(float(reward.mean()))
        ids = np.concatenate([np.repeat(np.asarray(prompts), 8, axis=0), completions], axis=1)
        loss_mask = np.zeros_like(ids)
        loss_mask[:, 3:] = 1
        batch = {
            "input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
            "advantages": np.asarray(losses.group_advantages(reward, 8)),
        }  # fmt: skip
        state, _ = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert rewards[0] < 0.1
    assert np.mean(rewards[-5:]) >= 0.5, rewards[::5]


def test_episode_rows_pad_missing_episodes():
    from medjax import agents
    from medjax.training import rl

    a = agents.Trajectory(
        "q", 0, "a", token_ids=[5, 6, 7], loss_mask=[0, 1, 1], logps=[0, -0.5, -1.0]
    )
    b = agents.Trajectory("q", 1, "a", token_ids=[8, 9], loss_mask=[0, 1], logps=[0, -2.0])
    rows = rl.episode_rows([a, None, b], pad_id=3)
    assert rows["input_ids"].tolist() == [[5, 6, 7] + [3] * 61, [3] * 64, [8, 9] + [3] * 62]
    assert rows["attention_mask"].sum(axis=1).tolist() == [3, 0, 2]
    assert rows["loss_mask"][:, :3].tolist() == [[0, 1, 1], [0, 0, 0], [0, 1, 0]]
    np.testing.assert_array_equal(
        rows["old_logps"][:, :3], [[0, -0.5, -1.0], [0, 0, 0], [0, -2.0, 0]]
    )
    assert rl.episode_rows([None], pad_id=3)["input_ids"].tolist() == [[3] * 64]


def test_a_run_killed_before_its_first_checkpoint_restarts_with_no_old_records(tmp_path):
    """The records of steps run before a kill that left no checkpoint are dropped on
    restart (they are run again), so metrics.jsonl never holds a step twice."""
    from medjax.training import checkpoints, metrics, runtime

    with metrics.MetricsWriter(tmp_path, subdir="rl", interactive=False) as writer:
        writer.start(0)
        writer.write(1, {"loss": 1.0})
    ckpt = checkpoints.Checkpointer(str(tmp_path / "rl" / "checkpoints"), save_every=1)
    with metrics.MetricsWriter(tmp_path, subdir="rl", interactive=False) as writer:
        state, start, meta = runtime.restore(ckpt, {"x": 1}, writer, "rl")
        assert (state, start, meta) == ({"x": 1}, 0, {})
        writer.start(start)
        writer.write(1, {"loss": 2.0})
    ckpt.close()
    records = metrics.read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0)]


def test_sub_rows_without_alignment_keep_each_rollout_own_subs():
    """M-GRPO's no-alignment ablation: every sub-trajectory once, in its rollout's row
    block, padding elsewhere; R_S and the pooled z-scores by hand."""
    from medjax import agents
    from medjax.training import rl

    def sub(i, answered):
        return agents.Trajectory(
            f"s{i}", 0, "searcher", token_ids=[10 + i, 20 + i], loss_mask=[0, 1],
            logps=[0.0, -1.0], answer="x" if answered else None,
            finish_reason="answer" if answered else "no_answer",
        )  # fmt: skip

    subs = [sub(0, True), sub(1, True), sub(2, False), sub(3, True)]
    owner = np.array([0, 0, 0, 2])  # Rollout 0 called three times, rollout 2 once.
    correct = np.array([1, 0, 0, 1], np.float32)  # 2 queries x K=2 rollouts.
    batch, stats = rl.mgrpo_sub_batch(
        subs, owner, correct, 2, None, jax.random.key(0), pad_id=3, sub_weights=(0.1, 0.9),
        align=False,
    )  # fmt: skip
    # d = 4 (3 rounded up to a power of two): rows [s0 s1 s2 pad | pad x4 | s3 pad x3 | pad x4].
    first = batch["input_ids"][:, 0].reshape(4, 4).tolist()
    assert first == [[10, 11, 12, 3], [3] * 4, [13, 3, 3, 3], [3] * 4]
    assert batch["loss_mask"].sum(axis=1).reshape(4, 4).tolist() == [
        [1, 1, 1, 0], [0] * 4, [1, 0, 0, 0], [0] * 4,
    ]  # fmt: skip
    # R_S = 0.1 format + 0.9 its rollout's correctness (0 when the format is invalid):
    # query 0: s0 1.0, s1 1.0, s2 0 -> mean 2/3, population std sqrt(2)/3; query 1: s3 alone.
    z = (1 - 2 / 3) / (np.sqrt(2) / 3)
    np.testing.assert_allclose(
        batch["advantages"].reshape(4, 4),
        [[z, z, -2 * z, 0], [0] * 4, [0] * 4, [0] * 4], atol=1e-5,
    )  # fmt: skip
    assert stats["sub/duplicated"] == stats["sub/dropped"] == 0
    assert stats["sub/target_count"] == 4 and stats["sub/rollouts_without_subs"] == 2
    aligned, stats = rl.mgrpo_sub_batch(
        subs, owner, correct, 2, 2, jax.random.key(0), pad_id=3, sub_weights=(0.1, 0.9)
    )
    assert aligned["loss_mask"].sum(axis=1).reshape(4, 2).sum(axis=1).tolist() == [2, 0, 2, 0]
    assert stats["sub/duplicated"] == 1 and stats["sub/dropped"] == 1


def test_results_md_explains_every_column(tmp_path):
    """results.md: the table by hand, then a line per column saying what it measures."""
    keys = rl.ResearchTask.result_keys
    results = {
        "before": {k: 0.0 for k in keys} | {"time_s": 3.0},
        "after_sft": {k: 0.25 for k in keys},
    }
    table = evaluation.write_results(str(tmp_path), results, rl_stages=(), keys=keys)
    assert table["after_sft"] == {k: 0.25 for k in keys}  # time_s is not a column.
    text = (tmp_path / "results.md").read_text()
    header = "| point | accuracy | mean_reward | answered | format_valid | format_errors |"
    assert header + " mean_tool_calls | expert_nll |" in text
    assert "| after_sft | " + " | ".join(["0.2500"] * 7) + " |" in text
    columns = text.split("Columns:\n\n")[1].splitlines()
    assert [line.split(":")[0] for line in columns] == ["- point"] + [f"- {k}" for k in keys]
    assert columns[1] == (
        "- accuracy: share of questions whose final <answer> matches the gold entity's name or"
        " an alias (normalised exact match)."
    )
    assert json.loads((tmp_path / "results.json").read_text()) == table


def test_scoring_in_microbatches_gives_each_row_its_own_log_probs():
    # Four ragged rows scored whole, then in 2 and 4 microbatches: the same [B, T] log-probs
    # row for row (the microbatches come back in order). Against a direct score_sequences
    # call, not the score function itself. Catches rows of one microbatch written into
    # another's place, or the reshape mixing rows and tokens.
    model, mesh = tiny_model()
    graphdef, params = nnx.split(model, nnx.Param)
    b = {k: jnp.asarray(v) for k, v in ragged_batch().items()}
    args = (b["input_ids"], b["attention_mask"], b["loss_mask"])
    want = np.asarray(scoring.score_sequences(model, *args))
    for m in (1, 2, 4):
        got = steps.make_score_fn(graphdef, mesh=mesh, num_microbatches=m)(params, *args)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0, err_msg=str(m))
