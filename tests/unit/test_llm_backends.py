"""medjax.llm.JaxPolicyBackend: one sampler call per turn, ids and log-probs that match the
model, text decoded from exactly the sampled ids."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import llm, models, sampling, scoring
from medjax.llm import stops
from medjax.models import tokenizer as tokenizer_lib

CORPUS = [
    "The patient reports a headache and fever for three days.",
    "Does the pain get worse at night? Any nausea or vomiting?",
    '<think>Consider migraine.</think><tool_call>{"name": "search"}</tool_call>',
    "<answer>Migraine without aura</answer> End Inquiry",
] * 8


@pytest.fixture(scope="module")
def backend():
    tok = tokenizer_lib.train_bpe(CORPUS, vocab_size=320)
    config = models.ModelConfig(
        family="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=48,
        num_layers=2, num_heads=4, num_kv_heads=2, qkv_bias=True,
    )  # fmt: skip
    return llm.JaxPolicyBackend(models.DecoderLM(config, rngs=nnx.Rngs(0)), tok, seed=1)


CHATS = [
    [
        {"role": "system", "content": "You are a doctor."},
        {"role": "user", "content": "I have a headache."},
    ],
    [{"role": "user", "content": "Fever?"}],
]


def test_protocol_and_one_call_per_turn(backend):
    assert isinstance(backend, llm.TextBackend)
    params = sampling.SamplingParams(max_new_tokens=7, temperature=1.0)
    calls = backend.calls
    outs = backend.generate(CHATS, params, num_samples=3)
    assert backend.calls == calls + 1
    assert len(outs) == 6
    for out in outs:
        assert len(out.token_ids) == len(out.logps) <= 7
        assert out.text == backend.tokenizer.decode(out.token_ids, skip_special_tokens=False)
        assert out.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in out.logps)


def test_rows_and_prompt_lengths_are_padded_to_their_buckets(backend, monkeypatch):
    """9 prompts of up to 600 tokens sample as 12 rows of 768 columns (1.5x buckets past 8
    rows and 512 tokens); 3 prompts of 5 tokens as 4 rows of 8."""
    shapes, sample = [], sampling.sample

    def spy(model, prompt_ids, prompt_mask, *args, **kwargs):
        shapes.append(tuple(prompt_ids.shape))
        return sample(model, prompt_ids, prompt_mask, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    params = sampling.SamplingParams(max_new_tokens=1, greedy=True)
    # Prefilling whole prompts (the second call's would continue the first's kept rows).
    backend = llm.JaxPolicyBackend(backend.model, backend.tokenizer, seed=1, keep_cache=False)
    # Each prompt starts with its own token: no shared prefix.
    outs = backend.generate_ids([[6 + i] + [5] * (599 - i) for i in range(9)], params)
    backend.generate_ids([[6 + i] + [5] * 4 for i in range(3)], params)
    assert shapes == [(12, 768), (4, 8)] and len(outs) == 9


def test_shared_prefix_length_by_hand():
    length = llm.jax_backend.shared_prefix_length
    assert length([[1, 2, 3, 4], [1, 2, 3, 5]], quantum=1) == 3
    assert length([[1, 2, 3, 4], [1, 2, 3, 5]], quantum=2) == 2
    assert length([[1, 2, 3], [1, 2, 3]], quantum=1) == 2  # Each keeps a token of its own.
    assert length([[1, 2, 3], [2, 2, 3]], quantum=1) == 0
    assert length([[1, 2, 3]], quantum=1) == 0


def test_a_shared_prefix_is_prefilled_once_with_the_same_samples(backend, monkeypatch):
    """Three prompts sharing their first 150 tokens: the backend prefills 128 of them once
    (64-token steps) and each row only its rest; tokens and log-probs are those of a backend
    that prefills every whole prompt (same model, same seed)."""
    rng = np.random.default_rng(0)
    vocab = backend.model.config.vocab_size
    shared = rng.integers(3, vocab, 150).tolist()
    prompts = [shared + rng.integers(3, vocab, n).tolist() for n in (4, 9, 17)]
    calls, sample = [], sampling.sample

    def spy(model, prompt_ids, *args, prefix_ids=None, **kwargs):
        calls.append((prompt_ids.shape, None if prefix_ids is None else prefix_ids.shape))
        return sample(model, prompt_ids, *args, prefix_ids=prefix_ids, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    # Each call prefills whole prompts (no KV cache kept from the call before).
    kw = dict(seed=3, keep_cache=False)
    shared_on = llm.JaxPolicyBackend(backend.model, backend.tokenizer, **kw)
    shared_off = llm.JaxPolicyBackend(backend.model, backend.tokenizer, share_prefix=False, **kw)
    for params in (
        sampling.SamplingParams(max_new_tokens=12, greedy=True),
        sampling.SamplingParams(max_new_tokens=12, temperature=0.9),
    ):
        on = shared_on.generate_ids(prompts, params, num_samples=2)
        off = shared_off.generate_ids(prompts, params, num_samples=2)
        assert [o.token_ids for o in on] == [o.token_ids for o in off]
        for a, b in zip(on, off, strict=True):
            np.testing.assert_allclose(a.logps, b.logps, atol=1e-5)
    # 3 rows pad to 4; the rest of each prompt (26 to 39 tokens) to 64 columns, the whole
    # prompts (154 to 167) to 256.
    assert calls[0] == ((4, 64), (1, 128)) and calls[1] == ((4, 256), None)


def test_logps_equal_scoring_and_eos_is_cut_from_text(backend):
    tok = backend.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # Greedy, so the EOS case is deterministic; make the greedy 3rd token an EOS id.
    first = backend.generate(CHATS[:1], sampling.SamplingParams(max_new_tokens=5, greedy=True))[0]
    stop_id = first.token_ids[2]
    params = sampling.SamplingParams(max_new_tokens=5, greedy=True, eos_ids=(eos, stop_id))
    out = backend.generate(CHATS[:1], params)[0]
    cut = first.token_ids.index(stop_id) + 1
    assert out.token_ids == first.token_ids[:cut] and out.finish_reason == "stop"
    assert out.text == tok.decode(out.token_ids[:-1], skip_special_tokens=False)
    prompt = backend.encode(CHATS[:1])[0]
    scored = scoring.score_completions(
        backend.model,
        jnp.asarray([prompt]),
        jnp.ones((1, len(prompt)), jnp.int32),
        jnp.asarray([out.token_ids]),
        jnp.ones((1, len(out.token_ids)), jnp.int32),
    )
    np.testing.assert_allclose(out.logps, np.asarray(scored[0]), atol=1e-5)


def test_prompt_is_the_chat_template(backend):
    prompt = backend.encode(CHATS[1:])[0]
    assert backend.tokenizer.decode(prompt, skip_special_tokens=False) == (
        "<|im_start|>user\nFever?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert backend.generate([], sampling.SamplingParams()) == []


def _first_hit(tok, ids, stop):
    """The hand way: decode growing prefixes until the stop string shows up."""
    for n in range(1, len(ids) + 1):
        if stop in tok.decode(ids[:n], skip_special_tokens=False):
            return n
    return None


def test_stop_strings_stop_at_the_token_that_completes_them(backend):
    tok = backend.tokenizer
    free = sampling.SamplingParams(max_new_tokens=16, temperature=1.0)
    # Backends with one seed draw the same tokens, so a stop can only cut the first draw.
    first = llm.JaxPolicyBackend(backend.model, tok, seed=5).generate(CHATS[1:], free)[0]
    pieces = [tok.decode([i], skip_special_tokens=False) for i in first.token_ids]
    # A stop string across a token boundary: the last character of one token's text and
    # the first of the next, from the 4th token on.
    i = next(k for k in range(3, len(pieces) - 1) if pieces[k] and pieces[k + 1])
    stop = pieces[i][-1] + pieces[i + 1][0]
    expected = _first_hit(tok, first.token_ids, stop)
    assert 1 < expected <= i + 2
    params = dataclasses.replace(free, stop_strings=(stop,))
    out = llm.JaxPolicyBackend(backend.model, tok, seed=5).generate(CHATS[1:], params)[0]
    assert out.token_ids == first.token_ids[:expected] and out.finish_reason == "stop"
    assert stop in out.text
    np.testing.assert_allclose(out.logps, first.logps[:expected], atol=1e-6)


def test_stop_sequences_of_a_stop_string():
    tok = tokenizer_lib.train_bpe(CORPUS, vocab_size=320)
    seqs = stops.stop_sequences(tok, ["End Inquiry", "</answer>"])
    encode = lambda s: tuple(tok.encode(s, add_special_tokens=False))  # noqa: E731
    assert encode("End Inquiry") in seqs and encode("</answer>") in seqs
    # After a space the words tokenise differently; the lead itself is left out.
    spaced = encode(" End Inquiry")
    assert spaced != encode("End Inquiry")
    lead = encode(" ")
    assert (spaced[len(lead) :] if spaced[: len(lead)] == lead else spaced) in seqs
    ids = list(encode("<answer>Migraine without aura</answer> End Inquiry"))
    assert stops.stop_string_cut(tok, ids, ["</answer>"]) == ids.index(encode("</answer>")[0]) + 1
    assert stops.stop_string_cut(tok, ids, ["Inquiry"]) == len(ids)
    assert stops.stop_string_cut(tok, ids, ["absent"]) is None
