"""medjax.llm.serve through the official `openai` client, against a tiny model served on
127.0.0.1: the request fields it refuses (a BadRequestError naming each), top_logprobs against
a log-softmax of a separate forward pass, a matched stop string left out of `content` (and
given back in `stop_reason`), UTF-8 `bytes` of the tokens of multi-byte characters, and the
CLI's one-line errors in a subprocess."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import openai
import pytest

from medjax import llm
from medjax.llm import serve
from medjax.llm.base import Generation
from medjax.models import tokenizer as tokenizer_lib
from medjax.sampling import SamplingParams
from tests import servers
from tests.servers import running

REPO = pathlib.Path(__file__).resolve().parents[2]
CORPUS = [
    "The patient reports a headache and fever for three days.",
    "Does the pain get worse at night? Any nausea or vomiting?",
    "<answer>Migraine without aura</answer> End Inquiry",
] * 8
CHAT = [{"role": "user", "content": "Fever?"}]
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    return servers.tiny_model(tok)


def client_of(server):
    # The server takes any key when it has no --api-key-env; the client insists on one.
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(tok, model):
    """An OpenAI client of the tiny model's server (seeded requests replay)."""
    base = SamplingParams(max_new_tokens=8, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    server = serve.make_server(
        llm.JaxPolicyBackend(model, tok, serving=True),
        base_params=base,
        backend_for_seed=lambda seed: llm.JaxPolicyBackend(model, tok, seed=seed, serving=True),
    )
    with running(server):
        yield client_of(server)


class Scripted:
    """Replies with fixed generations; counts the calls that reached it."""

    def __init__(self, tokenizer, *generations):
        self.tokenizer = tokenizer
        self.generations = list(generations)
        self.calls = 0

    def generate(self, conversations, params, *, num_samples=1):
        self.calls += 1
        return self.generations[:num_samples]


def create(client, **kwargs):
    return client.chat.completions.create(model="medjax", messages=CHAT, **kwargs)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        # The tools would not even reach the prompt, and "required" cannot be honoured.
        ({"tools": [TOOL], "tool_choice": "required"}, "tools"),
        ({"tools": [TOOL]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1.0}, "frequency_penalty"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"top_logprobs": 3}, "top_logprobs"),  # Without logprobs=True.
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"store": True}, "store"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"extra_body": {"min_p": 0.1}}, "min_p"),  # Unknown to this server.
        ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Fever?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "c1", "type": "function",
                         "function": {"name": "lookup", "arguments": "{}"}},
                    ]},
                ]
            },
            "messages[1].tool_calls",
        ),
        ({"messages": [{"role": "user", "content": "Hi", "name": "ann"}]}, "messages[0].name"),
    ],
)  # fmt: skip
def test_unserved_fields_are_a_bad_request_naming_the_field(tok, kwargs, param):
    # Catches: a field answered 200 and silently ignored (tools not in the prompt, free text
    # for a JSON format, an empty top_logprobs list, penalties dropped).
    backend = Scripted(tok, Generation("x", [5], [-0.5], "length"))
    with running(serve.make_server(backend)) as server:
        client = client_of(server)
        body = {"messages": CHAT} | kwargs
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="medjax", **body)
    assert err.value.status_code == 400
    error = err.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param) and "\n" not in error["message"]
    assert backend.calls == 0


def test_fields_at_their_no_op_values_are_served(served):
    # Catches: a refusal of values that ask for nothing (0.0 compared as a float, a round-
    # tripped message's null tool_calls), which would break ordinary clients.
    messages = [
        {"role": "user", "content": "Fever?"},
        {"role": "assistant", "content": "Since when?", "tool_calls": None, "refusal": None},
        {"role": "user", "content": "Two days."},
    ]
    reply = served.chat.completions.create(
        model="medjax", messages=messages, temperature=0, max_tokens=2,
        presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tool_choice="none",
        response_format={"type": "text"}, modalities=["text"], user="clinic-7", store=False,
        service_tier="auto", parallel_tool_calls=None, extra_body={"tools": []},
    )  # fmt: skip
    (choice,) = reply.choices
    assert choice.finish_reason in ("stop", "length") and len(choice.model_extra["token_ids"]) > 0


def _forward_top(model, ids, start, count, temperature, k):
    """Independent of the server's program: one eager forward of the whole sequence, then a
    float64 log-softmax in numpy; [(ids, log-probs)] of the k best at positions start ..
    start + count - 1."""
    logits = np.asarray(model(np.asarray([ids], np.int32)))[0].astype(np.float64) / temperature
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    out = []
    for position in range(start, start + count):
        order = np.argsort(-logp[position], kind="stable")[:k]
        out.append((order.tolist(), logp[position, order].tolist()))
    return out


@pytest.mark.parametrize("temperature, top_k", [(0, None), (0.5, 1)])
def test_top_logprobs_equal_a_log_softmax_of_a_separate_forward(
    tok, model, served, temperature, top_k
):
    # Catches: top_logprobs left empty; the reply's positions shifted by one (the hidden
    # state at t predicts t + 1); the temperature not applied (or applied twice); top-k
    # taken after the sampler's top-k filter; the chosen token missing from first place.
    # top_k=1 draws the argmax at any temperature, so the first place is the chosen token.
    extra = {} if top_k is None else {"extra_body": {"top_k": top_k}}
    reply = create(
        served, temperature=temperature, max_tokens=5, logprobs=True, top_logprobs=4, **extra
    )
    (choice,) = reply.choices
    ids = choice.model_extra["token_ids"]
    entries = choice.logprobs.content
    assert len(ids) == len(entries) >= 1
    prompt = tokenizer_lib.apply_chat_template(tok, CHAT, tokenize=True)
    applied = temperature or 1.0  # Greedy log-probs are untempered.
    expected = _forward_top(model, prompt + ids[:-1], len(prompt) - 1, len(ids), applied, 4)
    for token_id, entry, (best_ids, best_logps) in zip(ids, entries, expected, strict=True):
        top = entry.top_logprobs
        assert len(top) == 4
        assert best_ids[0] == token_id  # The chosen token is the argmax.
        assert [t.token for t in top] == [tok.decode([i]) for i in best_ids]
        np.testing.assert_allclose([t.logprob for t in top], best_logps, atol=1e-4)
        np.testing.assert_allclose(entry.logprob, best_logps[0], atol=1e-4)
        assert top[0].bytes == entry.bytes


def _clean_stop(tok, ids):
    """A two-token stop string from the middle of a reply: whole characters, not blank."""
    for i in range(1, len(ids) - 2):
        text = tok.decode(ids[i : i + 2], skip_special_tokens=False)
        if text.strip() and "\ufffd" not in text:
            return text
    raise AssertionError(f"no usable stop string in {ids}")


def test_a_matched_stop_string_is_left_out_and_given_back_in_stop_reason(tok, served):
    # Catches: the stop string kept in content (OpenAI leaves it out), text the stopping
    # token carried past it kept, finish_reason "length", and no way to get the string back.
    first = create(served, temperature=1.0, seed=11, max_tokens=12).choices[0]
    whole = first.message.content
    ids = first.model_extra["token_ids"]
    assert len(ids) >= 6, ids
    stop = _clean_stop(tok, ids)
    at = whole.index(stop)
    # The same seed samples the same tokens up to the stop.
    cut = create(served, temperature=1.0, seed=11, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == whole[:at]
    assert cut.finish_reason == "stop" and cut.model_extra["stop_reason"] == stop
    kept = create(
        served, temperature=1.0, seed=11, max_tokens=12, stop=stop,
        extra_body={"include_stop_str_in_output": True},
    ).choices[0]  # fmt: skip
    assert kept.message.content == whole[: at + len(stop)]
    assert kept.finish_reason == "stop" and kept.model_extra["stop_reason"] == stop
    # Without a match, stop_reason is null and the content whole.
    assert first.model_extra["stop_reason"] is None and first.finish_reason == "length"


def test_logprob_bytes_of_multi_byte_characters_are_their_utf8(tok):
    # Catches: bytes null, or the UTF-8 of U+FFFD (ef bf bd) for a token holding part of a
    # character instead of its own bytes.
    text = "中é fever"
    token_ids = tok.encode(text, add_special_tokens=False)
    # Unseen in the corpus, each character falls into its byte tokens: 3 + 2.
    assert len(token_ids) >= 7
    backend = Scripted(tok, Generation(text, token_ids, [-0.5] * len(token_ids), "length"))
    with running(serve.make_server(backend)) as server:
        reply = create(client_of(server), logprobs=True)
    entries = reply.choices[0].logprobs.content
    assert b"".join(bytes(e.bytes) for e in entries) == text.encode("utf-8")
    assert [bytes(e.bytes) for e in entries[:5]] == [bytes([b]) for b in "中é".encode()]
    assert all(e.token == "\ufffd" for e in entries[:5])  # OpenAI's form for a partial char.
    assert reply.choices[0].message.content == text


def test_real_model_bytes_decode_to_the_content(served):
    # Catches: bytes that do not add up to the reply (a token's bytes from its decoded text).
    choice = create(served, temperature=1.0, seed=5, max_tokens=12, logprobs=True).choices[0]
    assert choice.finish_reason == "length"  # No EOS token to leave out of the content.
    joined = b"".join(bytes(e.bytes) for e in choice.logprobs.content)
    assert joined.decode("utf-8", "replace") == choice.message.content


def _cli(*args, timeout=180):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "medjax.llm.serve", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def test_cli_errors_are_one_line_naming_the_flag_or_file(tmp_path):
    # Catches: tracebacks (a missing checkpoint, a corrupt GGUF file, a zero --max-n) and
    # argparse's usage block in place of one line.
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], ["--checkpoint", "missing"], 1),
        (["--checkpoint", str(bad_gguf)], ["--checkpoint", str(bad_gguf)], 1),
        (["--checkpoint", str(tmp_path), "--max-n", "0"], ["--max-n", "got 0"], 2),
        (["--checkpoint", str(tmp_path), "--port", "http"], ["--port", "'http'"], 2),
    ]
    for argv, named, status in cases:
        done = _cli(*argv, "--port", "0") if "--port" not in argv else _cli(*argv)
        lines = done.stderr.splitlines()
        assert len(lines) == 1, (argv, done.stderr[-3000:])
        assert lines[0].startswith("medjax.llm.serve: ") and "Traceback" not in lines[0]
        assert all(n in lines[0] for n in named), (named, lines[0])
        assert done.returncode == status and done.stdout == ""
