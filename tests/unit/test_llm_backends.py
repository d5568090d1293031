"""medjax.llm.JaxPolicyBackend: one sampler call per turn, ids and log-probs that match the
model, text decoded from exactly the sampled ids."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import llm, models, sampling, scoring
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
