"""`RLStage.grouped_scoring`: each question's G episodes scored as one packed row, the prompt
they share encoded once (`rl.shared_prefix_rows` -> `scoring.score_packed`).

The layout is worked out by hand; the log-probs are checked against plain forwards of the
whole episodes (`plain_logps`, float64, no medjax scoring code), and the loss, gradients
and a microbatched optimizer step against the whole-episode rows the update otherwise
takes.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_training import tiny_model

from medjax import losses, scoring
from medjax.training import rl, runtime, stages, steps

PAD = 0


def rows_of(episodes, width):
    """Right-padded [B, width] rows of (ids, loss_mask) pairs."""
    out = {
        "input_ids": np.full((len(episodes), width), PAD, np.int32),
        "attention_mask": np.zeros((len(episodes), width), np.int32),
        "loss_mask": np.zeros((len(episodes), width), np.int32),
    }
    for r, (ids, mask) in enumerate(episodes):
        out["input_ids"][r, : len(ids)] = ids
        out["attention_mask"][r, : len(ids)] = 1
        out["loss_mask"][r, : len(ids)] = mask
    return out


def test_shared_prefix_rows_by_hand():
    """Group 0: its rows agree on 4 tokens but the policy wrote the 4th (loss from 3), so the
    prefix is 3 tokens, not 4. Group 1: its rows part after 1 token, before any scored one.
    Only scored tokens are kept in the [B, K] rows. Catches a prefix that swallows a scored
    token (its log-prob would be lost), a continuation cut one token off, positions that do
    not continue the prefix's, a first continuation token predicted from anything but the
    prefix's last token, or old log-probs left behind when their tokens move."""
    batch = rows_of(
        [
            ([7, 8, 9, 4, 5, 6], [0, 0, 0, 1, 1, 0]),
            ([7, 8, 9, 4, 2], [0, 0, 0, 1, 1]),
            ([7, 3, 1, 5], [0, 0, 0, 1]),
            ([7, 8, 2, 2, 9], [0, 0, 0, 0, 1]),
        ],
        width=8,
    )
    batch["advantages"] = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
    batch["old_logps"] = np.arange(32, dtype=np.float32).reshape(4, 8) / 10
    out = rl.shared_prefix_rows(batch, 2, pad_id=PAD)
    assert set(out) == {"input_ids", "loss_mask", "advantages", "old_logps", *rl.PACKED_KEYS}
    # Rows need 3 + 3 + 2 = 8 and 1 + 3 + 4 = 8 tokens: one bucket of 64; K = 64 too.
    assert out["packed_ids"].shape == (2, 64) and out["input_ids"].shape == (4, 64)
    head = {k: out[k][:, :9] for k in rl.PACKED_KEYS if k != "predict_index"}
    np.testing.assert_array_equal(
        head["packed_ids"], [[7, 8, 9, 4, 5, 6, 4, 2, PAD], [7, 3, 1, 5, 8, 2, 2, 9, PAD]]
    )
    np.testing.assert_array_equal(
        head["packed_segments"], [[0, 0, 0, 1, 1, 1, 2, 2, -1], [0, 1, 1, 1, 2, 2, 2, 2, -1]]
    )
    np.testing.assert_array_equal(
        head["packed_positions"], [[0, 1, 2, 3, 4, 5, 3, 4, -1], [0, 1, 2, 3, 1, 2, 3, 4, -1]]
    )
    # The scored tokens 4, 5 | 4, 2 | 5 | 9 sit at packed 3, 4 | 6, 7 | 3 | 7.
    np.testing.assert_array_equal(out["predict_index"][0, :, :3], [[2, 3, 0], [2, 6, 0]])
    np.testing.assert_array_equal(out["predict_index"][1, :, :3], [[2, 0, 0], [6, 0, 0]])
    np.testing.assert_array_equal(
        out["input_ids"][:, :3], [[4, 5, 0], [4, 2, 0], [5, 0, 0], [9, 0, 0]]
    )
    np.testing.assert_array_equal(
        out["loss_mask"][:, :3], [[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]]
    )
    # Row r's old log-prob at column c was (8 r + c) / 10.
    np.testing.assert_allclose(
        out["old_logps"][:, :3], [[0.3, 0.4, 0], [1.1, 1.2, 0], [1.9, 0, 0], [2.8, 0, 0]]
    )
    np.testing.assert_array_equal(out["advantages"], batch["advantages"])
    assert not out["loss_mask"][:, 3:].any() and not out["old_logps"][:, 3:].any()
    # Wider widths asked for (those a trainer compiled for) pad and change nothing else.
    wide = rl.shared_prefix_rows(batch, 2, pad_id=PAD, min_widths=(128, 96))
    assert wide["packed_ids"].shape == (2, 128) and wide["predict_index"].shape == (2, 2, 96)
    fills = {"packed_segments": -1, "packed_positions": -1}  # Else PAD (0) or 0.
    for key, value in out.items():
        cut = tuple(slice(0, n) for n in value.shape)
        np.testing.assert_array_equal(wide[key][cut], value)
        extra = np.ones(wide[key].shape, bool)
        extra[cut] = False
        assert (wide[key][extra] == fills.get(key, 0)).all(), key


def test_shared_prefix_rows_refuses_rows_of_different_questions():
    batch = rows_of([([7, 8, 1], [0, 0, 1]), ([6, 8, 1], [0, 0, 1])], width=4)
    with pytest.raises(ValueError, match="rows 0-1 share no first token"):
        rl.shared_prefix_rows(batch, 2, pad_id=PAD)
    with pytest.raises(ValueError, match="2 rows do not form groups of 3"):
        rl.shared_prefix_rows(batch, 3, pad_id=PAD)


def episodes(seed, num_prompts=2, group=3, width=40):
    """Multi-turn-like episodes: per question a prompt of 5-9 tokens, then per episode a
    reply the policy wrote, a tool output it did not (loss 0) and a second reply; lengths
    differ, padding to `width`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_prompts):
        prompt = list(rng.integers(1, 64, rng.integers(5, 10)))
        for _ in range(group):
            a, tool, b = (list(rng.integers(1, 64, n)) for n in rng.integers(2, 9, 3))
            mask = [0] * len(prompt) + [1] * len(a) + [0] * len(tool) + [1] * len(b)
            out.append((prompt + a + tool + b, mask))
    return rows_of(out, width)


def grpo_batch(model, plain_logps, seed=1):
    """Rows with advantages, old log-probs ratios 0.74-1.35 from the policy's, and reference
    log-probs 0.3 below them."""
    batch = episodes(seed)
    rng = np.random.default_rng(seed + 10)
    own = plain_logps(model, batch["input_ids"], batch["loss_mask"])
    mask = batch["loss_mask"] > 0
    batch["advantages"] = rng.normal(size=len(mask)).astype(np.float32)
    batch["old_logps"] = np.where(mask, own - rng.uniform(-0.3, 0.3, own.shape), 0.0).astype(
        np.float32
    )
    batch["ref_logps"] = np.where(mask, own - 0.3, 0.0).astype(np.float32)
    return batch


def test_score_packed_equals_plain_forwards_of_whole_episodes(plain_logps):
    """Every scored token of the packed rows gets the log-prob a plain float64 forward of its
    whole episode gives it (within 1e-5). Catches a continuation attending to another
    episode of its group, positions that restart from 0, or an off-by-one predict index."""
    model, _ = tiny_model()
    batch = episodes(seed=3)
    want = plain_logps(model, batch["input_ids"], batch["loss_mask"])
    packed = rl.shared_prefix_rows(batch, 3, pad_id=PAD)
    score = nnx.jit(lambda m, b: scoring.score_packed(m, *(b[k] for k in keys)))
    keys = (*rl.PACKED_KEYS, "input_ids", "loss_mask")  # score_packed's argument order.
    got = np.asarray(score(model, packed))
    mask = batch["loss_mask"] > 0
    assert packed["loss_mask"].sum() == mask.sum()
    for r in range(len(got)):
        n = mask[r].sum()
        np.testing.assert_allclose(got[r, :n], want[r, mask[r]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[packed["loss_mask"] == 0], 0.0)
    # Each group of 3 shares a prompt of at least 5 tokens, encoded once instead of 3 times.
    assert (packed["packed_segments"] >= 0).sum() <= batch["attention_mask"].sum() - 2 * 2 * 5


def test_score_packed_names_the_array_of_the_wrong_shape():
    model, _ = tiny_model()
    packed = rl.shared_prefix_rows(episodes(seed=3), 3, pad_id=PAD)
    args = {k: packed[k] for k in (*rl.PACKED_KEYS, "input_ids", "loss_mask")}
    bad = {
        "packed_segments": ("`segment_ids` has shape (2, 1)", packed["packed_segments"][:, :1]),
        "predict_index": ("`predict_index` has shape", packed["predict_index"][0]),
        "input_ids": ("`targets` has shape (6, 3)", packed["input_ids"][:, :3]),
        "loss_mask": ("`target_mask` has shape (5, 64)", packed["loss_mask"][:5]),
    }
    for key, (message, value) in bad.items():
        with pytest.raises(ValueError, match=re.escape(f"score_packed: {message}")):
            scoring.score_packed(model, *{**args, key: value}.values())


@pytest.mark.parametrize(
    "options",
    [dict(beta=0.04), dict(importance_sampling_level="sequence"), dict(loss_type="dapo")],
    ids=["grpo+kl", "gspo", "dapo"],
)
def test_grouped_loss_and_gradients_equal_whole_episode_rows(options, plain_logps):
    """The GRPO loss (with KL, GSPO's sequence ratio, DAPO's token pooling) and every
    parameter's gradient from packed rows equal those of the whole-episode rows within
    1e-5. Catches old or reference log-probs not moved with their tokens (the ratios and
    KL would pair the wrong tokens) or a token scored twice or not at all."""
    model, _ = tiny_model()
    batch = grpo_batch(model, plain_logps)
    packed = rl.shared_prefix_rows(batch, 3, pad_id=PAD)
    loss_fn = steps.policy_loss_fn(functools.partial(losses.grpo_loss, **options))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def value_and_grad(params, rows):
        fn = lambda p: loss_fn(nnx.merge(graphdef, p), rows)  # noqa: E731
        return jax.value_and_grad(fn, has_aux=True)(params)

    (want, want_metrics), want_grads = value_and_grad(params, batch)
    (got, got_metrics), got_grads = value_and_grad(params, packed)
    assert abs(float(want)) > 1e-3
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-7)
    for key in ("loss_numerator", "loss_denominator", "entropy_mean"):
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, atol=1e-7)
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got_grads, want_grads
    )


def test_grouped_step_in_microbatches_equals_whole_episode_rows(plain_logps):
    """Two microbatches (a question each, its [P, L] row and [G, C] rows split together)
    through the jitted train step: the same metrics and new parameters as the whole-episode
    rows. Catches a microbatch that pairs one question's packed row with another's
    continuations."""
    model, _ = tiny_model()
    batch = grpo_batch(model, plain_logps)
    packed = rl.shared_prefix_rows(batch, 3, pad_id=PAD)
    loss_fn = steps.policy_loss_fn(functools.partial(losses.grpo_loss, beta=0.04))
    results = []
    for rows in (batch, packed):
        m, mesh = tiny_model()
        graphdef, state = steps.create_state(m, optax.sgd(0.5), 0, mesh)
        step = steps.make_train_step(
            graphdef, optax.sgd(0.5), loss_fn, num_microbatches=2,
            state_shardings=steps.shardings_of(state),
        )  # fmt: skip
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in rows.items()})
        results.append((jax.tree.map(np.asarray, state.params), jax.device_get(metrics)))
    (want_params, want), (got_params, got) = results
    for key in ("loss", "grad_norm", "kl_mean", "loss_denominator"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7)
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
        got_params, want_params,
    )  # fmt: skip


def test_score_and_update_packs_the_rows_when_asked(tmp_path, plain_logps, monkeypatch):
    """score_and_update with grouped_scoring repacks the rows once per step and trains to the
    parameters the whole-episode rows give. Catches the setting not reaching the update."""
    calls = []
    real = rl.shared_prefix_rows
    monkeypatch.setattr(
        rl, "shared_prefix_rows", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    results = []
    for grouped in (False, True):
        model, mesh = tiny_model()
        run = runtime.Run(
            str(tmp_path), task=None, env=None, data=None, tokenizer=None, mesh=mesh, seed=0,
            max_bad_steps=0, interactive=False, operative_config=None,
        )  # fmt: skip
        policy = runtime.Policy(
            run, model, optax.sgd(0.5), steps.policy_loss_fn(losses.grpo_loss), 1, 1.0
        )
        stage = stages.RLStage(prompts_per_step=2, num_generations=3, grouped_scoring=grouped)
        job = grpo_batch(model, plain_logps)
        metrics, _, _ = runtime.score_and_update(
            run, stage, [(policy, job)], None, runtime.BadSteps(0, "rl", str(tmp_path)), 0, None
        )
        results.append((jax.tree.map(np.asarray, policy.state.params), metrics))
    assert calls == [3]
    wide = policy.packed_widths
    # A narrower batch next is padded to the widths compiled for: no second program.
    rows = grpo_batch(policy.model(), plain_logps)
    narrow = {k: v[:, :20] if v.ndim == 2 else v for k, v in rows.items()}
    narrow["attention_mask"][:, :20] = 1
    narrow["loss_mask"][:, :12] = 0
    assert real(narrow, 3, pad_id=PAD)["packed_ids"].shape[1] < wide[0]
    runtime.score_and_update(
        run, stage, [(policy, narrow)], None, runtime.BadSteps(0, "rl", str(tmp_path)), 1, None
    )
    assert policy.packed_widths == wide and policy.step_fn._cache_size() == 1
    (want_params, want), (got_params, got) = results
    np.testing.assert_allclose(got["update/loss"], want["update/loss"], rtol=1e-5, atol=1e-7)
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
        got_params, want_params,
    )  # fmt: skip


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(algorithm="mgrpo"), "grouped_scoring True does nothing with algorithm .mgrpo."),
        (dict(prompts_per_step=3, num_microbatches=2, num_generations=2),
         "prompts_per_step 3 does not split into num_minibatches 1 of num_microbatches 2"),
        (dict(loss=functools.partial(losses.grpo_loss, loss_type="dr_grpo")),
         "needs the loss's max_completion_length bound"),
    ],
)  # fmt: skip
def test_grouped_scoring_settings_that_cannot_run_stop_the_stage(settings, message):
    with pytest.raises(runtime.TrainError, match=message):
        stages.RLStage(grouped_scoring=True, **settings)
