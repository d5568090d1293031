"""medjax's GGUF loader on the real SmolLM2-135M-Instruct against transformers' own loading
of the same file (numbers in testdata/smollm2_*, written by make_smollm2_oracle.py)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import llm, models, sampling
from medjax.agents import tools
from medjax.models import smollm2
from medjax.models import tokenizer as tokenizer_lib

TESTDATA = pathlib.Path(__file__).parent / "testdata"
ORACLE = np.load(TESTDATA / "smollm2_oracle.npz")
TOKENS = json.loads((TESTDATA / "smollm2_tokens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
    return models.from_pretrained(smollm2.gguf_path(), dtype=jnp.float32)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.load_tokenizer(smollm2.gguf_path())


def test_config_from_metadata(model):
    c = model.config
    assert (c.family, c.vocab_size, c.hidden_size, c.intermediate_size) == (
        "llama",
        49152,
        576,
        1536,
    )
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.tie_word_embeddings and not c.qkv_bias and c.rope_theta == 100000.0
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert c.num_params == 134_515_008  # SmolLM2-135M's published count.


@pytest.mark.slow
@pytest.mark.parametrize("text", [0, 1])
def test_logits_equal_transformers(model, text):
    ids = jnp.asarray(ORACLE[f"text{text}_ids"])[None]
    logits = np.asarray(jax.jit(lambda m, x: m(x))(model, ids)[0], np.float64)
    np.testing.assert_allclose(
        logits[:, ORACLE["columns"]], ORACLE[f"text{text}_logits"], atol=1e-4, rtol=0
    )
    top = logits.max(-1, keepdims=True)
    logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    np.testing.assert_allclose(logsumexp, ORACLE[f"text{text}_logsumexp"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(logits.argmax(-1), ORACLE[f"text{text}_argmax"])


@pytest.mark.slow
def test_greedy_generation_equals_transformers(model, tok):
    prompts = [ORACLE[f"chat{i}_prompt"] for i in range(5)]
    width = max(len(p) for p in prompts)
    ids = np.zeros((5, width), np.int32)
    mask = np.zeros((5, width), np.int32)
    for i, p in enumerate(prompts):  # Left-padded, as the agent loop batches prompts.
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    params = sampling.SamplingParams(max_new_tokens=64, greedy=True, pad_id=2)
    out = sampling.sample(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), params)
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), ORACLE[f"chat{i}_greedy"])
    # The prompts are what our tokenizer and the file's chat template make of the questions.
    question = "What is the capital of France?"
    rendered = tokenizer_lib.apply_chat_template(
        tok, [{"role": "user", "content": question}], tokenize=True
    )
    assert rendered == list(ORACLE["chat0_prompt"])
    assert tok.decode(ORACLE["chat0_greedy"][:7]) == "The capital of France is Paris."


@pytest.mark.slow
def test_chat_reply_ends_at_end_of_turn(model, tok):
    # transformers' greedy reply to chat 0 is "The capital of France is Paris." then
    # <|im_end|> (id 2), after which it rambles on into a new turn.
    assert list(ORACLE["chat0_greedy"][7:10]) == [2, 198, 2]
    backend = llm.JaxPolicyBackend(model, tok)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    (reply,) = backend.generate([chat], sampling.SamplingParams(max_new_tokens=64, greedy=True))
    assert reply.text == "The capital of France is Paris."
    assert reply.token_ids == list(ORACLE["chat0_greedy"][:8])
    assert reply.finish_reason == "stop"


def test_tokenizer_equals_transformers(tok):
    for text, want in TOKENS["strings"].items():
        got = tok.encode(text, add_special_tokens=False)
        assert got == want, text
        assert tok.decode(got) == TOKENS["decoded"][text] == text
    special = TOKENS["special"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        special["bos"],
        special["eos"],
        special["pad"],
        special["unk"],
    )
    assert len(tok) == 49152
    # 17 control tokens, each one id anywhere in a text, dropped by skip_special_tokens.
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    assert tok.encode("a<file_sep>b", add_special_tokens=False) == [a, 5, b]
    assert tok.decode([a, 5, b], skip_special_tokens=True) == "ab"


def test_agent_format_tokenises_as_the_chat_template_expects(tok):
    messages = [
        {"role": "user", "content": "Which disease?"},
        {"role": "assistant", "content": TOKENS_CALL},
        {"role": "user", "content": TOKENS_RESPONSE},
    ]
    text = tokenizer_lib.apply_chat_template(tok, messages)
    assert text == TOKENS["chat_text"]
    assert tok.encode(text, add_special_tokens=False) == TOKENS["chat_ids"]
    # The template's default system prompt, then ChatML turns rendered verbatim.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # The agent loop's token trajectory: the prompt's ids, the sampled reply's ids (ended by
    # <|im_end|>), then the ids of what the template appends; they must equal the ids of the
    # whole rendered chat, so that what is trained on is what was sampled.
    head = tokenizer_lib.apply_chat_template(tok, messages[:1])
    ids = tok.encode(head, add_special_tokens=False)
    ids += [*tok.encode(TOKENS_CALL, add_special_tokens=False), tok.eos_token_id]
    sofar = head + TOKENS_CALL + "<|im_end|>"
    assert text.startswith(sofar)
    ids += tok.encode(text[len(sofar) :], add_special_tokens=False)
    assert ids == TOKENS["chat_ids"]
    # The tags survive decoding with special tokens skipped, so the turn parser finds them.
    reply_ids = [*tok.encode(TOKENS_CALL, add_special_tokens=False), tok.eos_token_id]
    reply = tok.decode(reply_ids, skip_special_tokens=True)
    assert reply == TOKENS_CALL
    search = tools.Tool(
        "search", "Searches.", {"type": "object", "properties": {"query": {"type": "string"}}}
    )
    parsed = tools.parse_reply(reply, [search])
    assert (parsed.tool, parsed.arguments, parsed.error) == ("search", {"query": "FBN1 gene"}, None)


TOKENS_CALL = '<tool_call>{"name": "search", "arguments": {"query": "FBN1 gene"}}</tool_call>'
TOKENS_RESPONSE = "<tool_response>[1] OMIM:154700 Marfan syndrome</tool_response>"
