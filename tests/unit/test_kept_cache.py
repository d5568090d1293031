"""The KV cache kept across an agent's turns (`JaxPolicyBackend(keep_cache=True)`,
`sampling.sample_continuing`): rows packed by hand, each turn prefilling only what it adds,
and samples equal to those of a backend that prefills every whole prompt again."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import agents, llm, models, sampling
from medjax.models import smollm2
from medjax.models import tokenizer as tokenizer_lib
from medjax.models.transformer import KVCache
from tests.servers import tiny_model
from tests.unit.test_agents import lookup_tool
from tests.unit.test_llm_backends import CORPUS


@pytest.fixture(scope="module")
def tiny():
    tok = tokenizer_lib.train_bpe(CORPUS, vocab_size=320)
    return tiny_model(tok), tok


def test_kept_rows_packs_each_rows_kept_tokens_to_the_front_by_hand():
    """Row 0 holds positions 0, 1 in slots 0, 1 and 2, 3 in slots 3, 4 (slot 2 a padding
    column of a later chunk); row 1 holds 0, 1, 2 in slots 1-3. New row 0 keeps 2 tokens of
    row 1, new row 1 three of row 0, new row 2 none. Catches a gather in slot order (row 0's
    third token is in slot 3, not 2), a wrong source row, or kept slots past `keep`."""
    # Slot s of row r holds 10 r + s.
    k = (10 * jnp.arange(2.0)[:, None] + jnp.arange(5.0)[None]).reshape(1, 2, 1, 5, 1)
    cache = KVCache(
        k=k, v=-k, positions=jnp.asarray([[0, 1, -1, 2, 3], [-1, 0, 1, 2, -1]], jnp.int32),
        index=jnp.int32(5), lengths=jnp.asarray([4, 3], jnp.int32),
    )  # fmt: skip
    out = sampling._kept_rows(cache, jnp.asarray([1, 0, 0]), jnp.asarray([2, 3, 0]), slots=7)
    assert out.positions.tolist() == [
        [0, 1, -1, -1, -1, -1, -1], [0, 1, 2, -1, -1, -1, -1], [-1] * 7,
    ]  # fmt: skip
    assert out.lengths.tolist() == [2, 3, 0] and int(out.index) == 3
    assert out.k.shape == (1, 3, 1, 7, 1)
    assert out.k[0, 0, 0, :2, 0].tolist() == [11, 12]  # Row 1's positions 0, 1.
    assert out.k[0, 1, 0, :3, 0].tolist() == [0, 1, 3]  # Row 0's positions 0, 1, 2.
    assert out.v[0, 1, 0, :3, 0].tolist() == [0, -1, -3]


def _turns(backend, params, prompts, rng, vocab, *, num_samples, cut):
    """Three calls as an agent makes them: the prompts (G samples each), then each row's
    prompt + reply + a few appended tokens, one episode dropped each turn; with `cut`, the
    first episode keeps only half its reply (a stop-string cut) and the second has its
    token 5 changed (a history that re-tokenises differently). Returns each call's
    generations, each later call's prompts and the backend's counts of that call."""
    gens = backend.generate_ids(prompts, params, num_samples=num_samples)
    history = [list(prompts[i // num_samples]) for i in range(len(gens))]
    outs, calls, stats = [gens], [], []
    for turn in range(2):
        nxt = []
        for i, gen in enumerate(gens):
            reply = gen.token_ids[: len(gen.token_ids) // 2] if cut and i == 0 else gen.token_ids
            nxt.append(history[i] + reply + rng.integers(3, vocab, 3 + 2 * i + turn).tolist())
        if cut and turn == 0:
            nxt[1][5] = 3 + (nxt[1][5] - 2) % (vocab - 3)
        history = nxt[:-1]  # The last episode finished.
        before = dict(backend.stats)
        gens = backend.generate_ids(history, params)
        stats.append({k: backend.stats[k] - before[k] for k in before})
        outs.append(gens)
        calls.append(history)
    return outs, calls, stats


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut"])
def test_kept_cache_samples_equal_prefilling_every_prompt(tiny, greedy, cut):
    """Three turns of 3 prompts x G=2 (then 5 and 4 episodes): tokens equal and log-probs
    within 1e-5 of a backend that prefills each whole prompt, same seed. Turn 2 prefills
    only what each episode's row lacks: its appended tokens, and with a cut, the rest from
    the cut (episode 0) or from the changed token (episode 1, which keeps 5 tokens).
    Catches a row continued from the wrong source, positions that restart at 0, a cache
    holding tokens past a cut, and a backend that re-prefills everything."""
    model, tok = tiny
    vocab = model.config.vocab_size
    params = sampling.SamplingParams(max_new_tokens=9, temperature=0.9, greedy=greedy)
    prompts = [np.random.default_rng(p).integers(3, vocab, 20 + 7 * p).tolist() for p in range(3)]
    kept = llm.JaxPolicyBackend(model, tok, seed=4)
    plain = llm.JaxPolicyBackend(model, tok, seed=4, keep_cache=False)
    outs_k, calls, stats = _turns(kept, params, prompts, np.random.default_rng(9), vocab,
                                  num_samples=2, cut=cut)  # fmt: skip
    outs_p, calls_p, _ = _turns(plain, params, prompts, np.random.default_rng(9), vocab,
                                num_samples=2, cut=cut)  # fmt: skip
    assert calls == calls_p
    for call_k, call_p in zip(outs_k, outs_p, strict=True):
        assert [g.token_ids for g in call_k] == [g.token_ids for g in call_p]
        for a, b in zip(call_k, call_p, strict=True):
            np.testing.assert_allclose(a.logps, b.logps, atol=1e-5)
            assert a.finish_reason == b.finish_reason and a.text == b.text
    # Turn 2's episode i (i < 5) continues row i: prompt i // 2 and its reply.
    keep = [len(prompts[i // 2]) + len(outs_k[0][i].token_ids) for i in range(5)]
    if cut:
        keep[0] = len(prompts[0]) + len(outs_k[0][0].token_ids) // 2
        keep[1] = 5
    turn2 = calls[0]
    assert stats[0] == dict(
        prefilled_tokens=sum(len(p) for p in turn2) - sum(keep), reused_tokens=sum(keep)
    )


def test_turn_two_prefills_exactly_the_appended_tokens(tiny):
    """Hand count: 2 prompts of 30 and 40 tokens, G=1; turn 2 appends 4 and 6 tokens to
    prompt + reply: 10 tokens prefilled, 70 + both replies reused. A third call with prompts
    no row shares (another first token) prefills them whole."""
    model, tok = tiny
    vocab = model.config.vocab_size
    rng = np.random.default_rng(1)
    prompts = [[5, *rng.integers(6, vocab, 29).tolist()], [4, *rng.integers(6, vocab, 39).tolist()]]
    backend = llm.JaxPolicyBackend(model, tok, seed=0)
    params = sampling.SamplingParams(max_new_tokens=6, greedy=True)
    gens = backend.generate_ids(prompts, params)
    assert backend.stats == dict(prefilled_tokens=70, reused_tokens=0)
    replies = [len(g.token_ids) for g in gens]
    nxt = [
        p + g.token_ids + [7] * (4 + 2 * i)
        for i, (p, g) in enumerate(zip(prompts, gens, strict=True))
    ]
    backend.generate_ids(nxt, params)
    assert backend.stats == dict(prefilled_tokens=80, reused_tokens=70 + sum(replies))
    backend.generate_ids([[3, *p[1:]] for p in prompts], params)
    assert backend.stats["prefilled_tokens"] == 150


def test_new_weights_drop_the_kept_cache(tiny):
    """After the weights change (as after an update) the next call's samples are those of a
    fresh backend on the new weights: the stale keys and values are not reused."""
    model, tok = tiny
    model = nnx.clone(model)
    vocab = model.config.vocab_size
    prompts = [np.random.default_rng(5).integers(3, vocab, 25).tolist()]
    params = sampling.SamplingParams(max_new_tokens=5, greedy=True)
    backend = llm.JaxPolicyBackend(model, tok, seed=0)
    gen = backend.generate_ids(prompts, params)[0]
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 1.5, state))
    follow = [prompts[0] + gen.token_ids + [7, 8]]
    again = backend.generate_ids(follow, params)[0]
    fresh = llm.JaxPolicyBackend(model, tok, seed=0, keep_cache=False)
    fresh.generate_ids(prompts, params)  # Same key stream as `backend`.
    expected = fresh.generate_ids(follow, params)[0]
    assert again.token_ids == expected.token_ids
    np.testing.assert_allclose(again.logps, expected.logps, atol=1e-6)
    assert backend.stats["reused_tokens"] == 0


def test_an_agent_run_compiles_a_bounded_set_of_programs(tiny):
    """An agent's episodes run twice with the same shapes: the second run compiles no new
    sampler program (rows, chunk widths and cache slots come from buckets), and the first
    compiles at most one per call."""
    model, tok = tiny
    params = sampling.SamplingParams(max_new_tokens=8, temperature=1.0)

    def run(seed):
        backend = llm.JaxPolicyBackend(model, tok, seed=seed)
        agent = agents.AgentSpec(
            "doctor", backend, tools=[lookup_tool()], sampling=params, max_turns=3,
            final_turn_tokens=8,
        )  # fmt: skip
        queries = [agents.Query(f"q{i}", "What causes fever?" * (i + 1)) for i in range(3)]
        before = sampling.compile_count()
        trajs = agents.run_episodes(agent, queries, num_rollouts=2)
        return sampling.compile_count() - before, backend, trajs

    first, backend, _ = run(0)
    assert backend.stats["reused_tokens"] > 0
    assert first <= backend.calls
    second, _, _ = run(0)
    assert second == 0


@pytest.fixture(scope="module")
def smollm():
    path = smollm2.gguf_path()
    return models.from_pretrained(path, dtype=jnp.float32), tokenizer_lib.load_tokenizer(path)


@pytest.fixture(scope="module")
def smollm_f64():
    """SmolLM2 in float64 (loaded with float64 on: without it jnp.float64 is float32)."""
    with jax.enable_x64(True):
        model = models.from_pretrained(smollm2.gguf_path(), dtype=jnp.float64)
    assert model.embed_tokens[...].dtype == jnp.float64
    return model


def _log_softmax_rows(model, token_ids, temperature):
    """[T - 1, V]: row t is log p(. | token_ids[: t + 1])."""
    logits = model(jnp.asarray([token_ids]))[0, :-1] / temperature
    return jax.nn.log_softmax(logits, axis=-1)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_smollm2_tool_episodes_equal_with_and_without_the_kept_cache(
    smollm, smollm_f64, greedy, x64
):
    """SmolLM2-135M-Instruct as a tool-using agent, 2 questions x G=2, 3 turns, float32.

    Tokens: equal to the re-prefill path's (same seed). A sampled draw can still differ
    where its uniform falls in the CDF's last ~1e-4 of mass, which float32 cannot resolve
    (each of the ~49k tail tokens there has p < 1e-6, below the CDF's rounding near 1): the
    test allows a first difference only at a token that both paths drew with log p < -12.
    Log-probs: each path's differ from a float64 forward of the same tokens by the float32
    model's own rounding (measured 1.8e-5 on both; the two paths differ by up to 1.7e-5,
    the keys and values of earlier turns coming from decode steps rather than one
    prefill), so the kept path is held to be as exact as the re-prefill path: its largest
    error against float64 within 1.25x the other's, and under 5e-5. A stale or misplaced
    key, or a position off by one, moves log-probs by 1e-2 or more. The kept cache
    prefilled less than half the tokens the other did."""
    model, tok = smollm
    params = sampling.SamplingParams(max_new_tokens=24, temperature=0.8, greedy=greedy)

    def run(keep_cache):
        backend = llm.JaxPolicyBackend(model, tok, seed=11, keep_cache=keep_cache)
        agent = agents.AgentSpec(
            "doctor", backend, tools=[lookup_tool()], sampling=params, max_turns=3,
            final_turn_tokens=24,
        )  # fmt: skip
        queries = [
            agents.Query("q0", "What causes fever? Look it up first."),
            agents.Query("q1", "Which organ does hepatitis affect? Use the lookup tool."),
        ]
        with jax.enable_x64(False):
            return agents.run_episodes(agent, queries, num_rollouts=2), backend.stats

    kept, stats_k = run(True)
    plain, stats_p = run(False)
    assert sum(len(t.turns) for t in kept) > len(kept)  # Several turns an episode.
    errors = {True: [], False: []}
    for a, b in zip(kept, plain, strict=True):
        same = [x == y for x, y in zip(a.token_ids, b.token_ids, strict=False)]
        n = same.index(False) if False in same else len(same)
        if n < len(a.token_ids) or n < len(b.token_ids):
            assert not greedy and a.logps[n] < -12 and b.logps[n] < -12, (n, a.logps[n])
        # One float64 forward for both: their first n tokens are the same, so row t < n
        # (the distribution of token t + 1) is the same for both.
        longer = a if len(a.token_ids) > n else b
        rows = _log_softmax_rows(smollm_f64, longer.token_ids[: n + 1], 0.8)
        for keep, traj in ((True, a), (False, b)):
            ids = jnp.asarray(traj.token_ids[1 : n + 1])
            truth = np.asarray(jnp.take_along_axis(rows[: len(ids)], ids[:, None], -1)[:, 0])
            mine = np.asarray(traj.logps[1 : n + 1])
            own = np.asarray(traj.loss_mask[1 : n + 1], bool)
            errors[keep].append(np.abs(mine - truth)[own])
    worst = {keep: float(np.concatenate(e).max()) for keep, e in errors.items()}
    assert worst[True] <= 1.25 * worst[False] and worst[True] < 5e-5, worst
    assert stats_k["prefilled_tokens"] < stats_p["prefilled_tokens"] / 2


def test_sample_continuing_names_what_is_wrong(tiny):
    """Shapes that disagree, and a cache too small for the kept tokens + chunk + budget,
    are refused naming the arrays and the numbers (a silent dynamic_update_slice would clamp
    the write into the wrong slots)."""
    model, _ = tiny
    cache = model.init_cache(2, 16)
    params = sampling.SamplingParams(max_new_tokens=4, greedy=True)
    ids, mask = jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), jnp.int32)
    key = jax.random.key(0)
    with pytest.raises(
        ValueError, match=r"`keep` \(3,\) must be \[P, W\], \[P, W\], \[P\] and \[P\]"
    ):
        sampling.sample_continuing(
            model, cache, [0, 1], [0, 0, 0], ids, mask, key, params, slots=16
        )
    # max(keep) 10 + W 3 + 4 new tokens = 17 > 16 slots.
    with pytest.raises(ValueError, match=r"slots=16 cannot hold .* = 17 tokens nor the cache's 16"):
        sampling.sample_continuing(model, cache, [0, 1], [10, 2], ids, mask, key, params, slots=16)
    with pytest.raises(ValueError, match=r"slots=8 cannot hold .* = 9 tokens nor the cache's 16"):
        sampling.sample_continuing(model, cache, [0, 1], [2, 2], ids, mask, key, params, slots=8)
