"""Per-episode random streams (`JaxPolicyBackend.generate_ids(streams=...)`,
`agents.Query.stream`): a row's samples depend on its stream alone, not on the rows it is
batched with, so episodes split over processes (`medjax.multihost`) sample what one process
would."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import agents, sampling
from medjax.llm import JaxPolicyBackend
from medjax.sampling import SamplingParams
from tests.unit import test_kept_cache
from tests.unit.test_agents import lookup_tool

PARAMS = SamplingParams(max_new_tokens=12, temperature=1.0)
tiny = test_kept_cache.tiny  # The fixture: a tiny random qwen2 model and its BPE tokenizer.


def test_draw_takes_each_rows_uniform_from_its_own_key():
    """Row b's token is the first whose CDF exceeds u_b * total, u_b = uniform(keys[b]),
    computed here in numpy. Catches: one uniform shared by every row, or per-row keys
    ignored."""
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 6)), jnp.float32)
    keys = jax.random.split(jax.random.key(11), 4)
    out = np.asarray(sampling.draw(keys, logits))
    probs = np.exp(np.asarray(logits, np.float64))
    probs /= probs.sum(axis=1, keepdims=True)
    for b in range(4):
        u = float(jax.random.uniform(keys[b]))
        cdf = np.cumsum(probs[b])
        assert out[b] == int(np.searchsorted(cdf, u * cdf[-1], side="right")), b


def test_a_rows_samples_depend_on_its_stream_not_its_batch(tiny):
    """Prompt `a` sampled alone and between two prompts of other lengths (other padding,
    other rows): the same tokens and log-probs for the same stream. Catches: keys drawn per
    call or per row position (the control below: without streams they differ)."""
    model, tok = tiny
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(3, len(tok), n).tolist() for n in (5, 11, 3))
    alone = JaxPolicyBackend(model, tok, seed=7).generate_ids(
        [a], PARAMS, num_samples=2, streams=[41]
    )
    batched = JaxPolicyBackend(model, tok, seed=7).generate_ids(
        [b, a, c], PARAMS, num_samples=2, streams=[5, 41, 9]
    )
    assert [g.token_ids for g in alone] == [g.token_ids for g in batched[2:4]]
    for x, y in zip(alone, batched[2:4], strict=True):
        np.testing.assert_allclose(x.logps, y.logps, atol=1e-5)
    # The two samples of one stream, and another stream, draw differently.
    assert alone[0].token_ids != alone[1].token_ids
    other = JaxPolicyBackend(model, tok, seed=7).generate_ids([a], PARAMS, streams=[42])
    assert other[0].token_ids != alone[0].token_ids
    # Control: one key per call, a's samples change with its batch.
    plain_alone = JaxPolicyBackend(model, tok, seed=7).generate_ids([a], PARAMS, num_samples=2)
    plain_batched = JaxPolicyBackend(model, tok, seed=7).generate_ids(
        [b, a, c], PARAMS, num_samples=2
    )
    assert [g.token_ids for g in plain_alone] != [g.token_ids for g in plain_batched[2:4]]


def test_an_episode_samples_the_same_whichever_queries_share_its_run(tiny):
    """Query q2's two rollouts run with q1 and q3 (one batch per turn) and run alone (as a
    second process would run its share): the same tokens, turn after turn. Catches: streams
    named by the episode's place in the batch instead of its query, rollout and turn."""
    model, tok = tiny
    agent = agents.AgentSpec(
        "researcher", JaxPolicyBackend(model, tok, seed=3), system_prompt="Research.",
        tools=[lookup_tool()], max_turns=3, sampling=SamplingParams(max_new_tokens=16),
    )  # fmt: skip
    queries = [agents.Query(f"q{i}", f"Which gene {i}?") for i in (1, 2, 3)]
    together = agents.run_episodes(agent, queries, num_rollouts=2)
    agent = agents.AgentSpec(**{**agent.__dict__, "backend": JaxPolicyBackend(model, tok, seed=3)})
    alone = agents.run_episodes(agent, queries[1:2], num_rollouts=2)
    assert [t.token_ids for t in together[2:4]] == [t.token_ids for t in alone]
    for x, y in zip(together[2:4], alone, strict=True):
        np.testing.assert_allclose(x.logps, y.logps, atol=1e-5)
    assert together[2].token_ids != together[3].token_ids


def test_streams_of_another_count_than_the_prompts_are_refused(tiny):
    """Catches: a short list of streams silently padded with stream 0 (two episodes drawing
    the same tokens) instead of an error naming both counts."""
    model, tok = tiny
    backend = JaxPolicyBackend(model, tok, seed=7)
    with pytest.raises(ValueError, match="1 streams for 2 prompts"):
        backend.generate_ids([[5, 6], [7, 8]], PARAMS, streams=[1])
