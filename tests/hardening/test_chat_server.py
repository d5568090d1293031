"""medjax.llm.serve against hostile or careless clients, over real sockets on 127.0.0.1: reply
budgets and prompts past the context, per-request values that would compile a program each,
n, malformed requests of every kind (each a 4xx with a JSON body naming the field, never a
500), 200 clients at once, slow and stalled clients, and an API-key variable that is unset."""

import contextlib
import http.client
import itertools
import json
import logging
import socket
import threading
import time

import pytest
import tokenizers
import transformers
from tokenizers import decoders, pre_tokenizers

from medjax import llm, models, sampling
from medjax.llm import serve
from medjax.llm.base import Generation
from medjax.models import tokenizer as tokenizer_lib
from medjax.sampling import SamplingParams
from tests import servers
from tests.servers import serving

CORPUS = [
    "The patient reports a headache and fever for three days.",
    "Does the pain get worse at night? Any nausea or vomiting?",
    "<answer>Migraine without aura</answer> End Inquiry",
] * 8
CHAT = [{"role": "user", "content": "Fever?"}]
KEY_ENV = "MEDJAX_TEST_CHAT_SERVER_KEY"
KEY = "sk-medjax-chat-server-9fKq2LmZ7"
UNSET_ENV = "MEDJAX_TEST_CHAT_SERVER_UNSET"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(UNSET_ENV, raising=False)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def tiny(tok):
    base = SamplingParams(max_new_tokens=4, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    return servers.tiny_model(tok), base


class Recorder:
    """Replies "<last message> #<sample>" with two tokens; records every call's params."""

    def __init__(self):
        self.params: list[SamplingParams] = []

    def generate(self, conversations, params, *, num_samples=1):
        self.params.append(params)
        return [
            Generation(f"{chat[-1]['content']} #{g}", [5, 6], [-0.5, -0.25], "length")
            for chat in conversations
            for g in range(num_samples)
        ]


def call(server, method, path, body=None, headers=None, timeout=30.0):
    """One request on a fresh connection; returns (status, decoded JSON, headers)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), dict(response.headers)
    finally:
        connection.close()


def chat(server, body, **kwargs):
    return call(server, "POST", "/v1/chat/completions", body, **kwargs)


def raw_exchange(server, data: bytes, timeout=10.0) -> tuple[bytes, float]:
    """Sends raw bytes, reads until the server closes; returns (reply, seconds taken)."""
    start = time.monotonic()
    with socket.create_connection(server.server_address[:2], timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply, time.monotonic() - start


def parse_raw(reply: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def prompt_length(tok, messages) -> int:
    return len(tokenizer_lib.apply_chat_template(tok, messages, tokenize=True))


def test_max_tokens_past_the_context_is_refused_and_the_default_is_cut(tok, tiny):
    # Choice: an explicit max_tokens that does not fit is a 400 (OpenAI's answer; the client
    # asked for it), an omitted one is cut to the room the prompt leaves.
    context, prompt = 64, prompt_length(tok, CHAT)
    room = context - prompt
    assert 0 < room < 60
    recorder = Recorder()
    base = SamplingParams(max_new_tokens=1000)
    with serving(recorder, tokenizer=tok, context_length=context, base_params=base) as server:
        assert server.server_address[0] == "127.0.0.1"
        fits = chat(server, {"messages": CHAT, "max_tokens": room})
        over = chat(server, {"messages": CHAT, "max_tokens": room + 1})
        huge = chat(server, {"messages": CHAT, "max_completion_tokens": 2**31 - 1})
        default = chat(server, {"messages": CHAT})
    assert fits[0] == 200 and fits[1]["usage"]["prompt_tokens"] == prompt
    assert over[0] == 400 and over[1]["error"]["param"] == "max_tokens"
    assert f"at most {room}" in over[1]["error"]["message"]
    assert huge[0] == 400 and huge[1]["error"]["param"] == "max_completion_tokens"
    assert default[0] == 200
    # Only the two that fit reached the backend, the default cut to the room left.
    assert [p.max_new_tokens for p in recorder.params] == [room, room]
    # A JaxPolicyBackend's context is its checkpoint's.
    model, _ = tiny
    server = serve.make_server(llm.JaxPolicyBackend(model, tok))
    server.server_close()
    assert server.context_length == model.config.max_position_embeddings
    assert server.tokenizer is tok


def test_a_prompt_longer_than_the_context_is_refused(tok):
    recorder = Recorder()
    long_chat = [{"role": "user", "content": "headache and fever " * 40}]
    assert prompt_length(tok, long_chat) > 64
    with serving(recorder, tokenizer=tok, context_length=64) as server:
        status, reply, headers = chat(server, {"messages": long_chat, "max_tokens": 1})
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert reply["error"]["param"] == "messages"
    message = reply["error"]["message"]
    assert message.startswith("messages:") and "context is 64 tokens" in message
    assert "\n" not in message and recorder.params == []


def test_distinct_temperatures_and_budgets_compile_no_new_program(tok, tiny):
    model, base = tiny
    backend = llm.JaxPolicyBackend(model, tok, seed=0, serving=True)
    # top_k=1 always draws the argmax token, whose log-prob (of the untruncated tempered
    # distribution) then shows the temperature that was applied. The load test below uses
    # the same program.
    first = {"messages": CHAT, "top_k": 1, "logprobs": True}
    with serving(backend, base_params=base) as server:
        assert chat(server, first | {"max_tokens": 1})[0] == 200  # Compiles.
        before = sampling.compile_count()
        bodies = [first | {"temperature": round(0.1 * (i + 1), 2), "max_tokens": 1 + i % 4}
                  for i in range(20)]  # fmt: skip
        replies = [chat(server, body) for body in bodies]
        grown = sampling.compile_count() - before
    assert grown == 0
    logps = []
    for body, (status, reply, _) in zip(bodies, replies, strict=True):
        assert status == 200
        (choice,) = reply["choices"]
        assert 1 <= len(choice["token_ids"]) <= body["max_tokens"]
        logps.append(choice["logprobs"]["content"][0]["logprob"])
    # The same token each time, ever likelier as the temperature falls (0.1 .. 2.0).
    assert len({r[1]["choices"][0]["token_ids"][0] for r in replies}) == 1
    assert all(a > b for a, b in itertools.pairwise(logps)), logps


def test_a_vanishing_temperature_decodes_greedily_with_finite_logprobs(tok, tiny):
    model, base = tiny
    backend = llm.JaxPolicyBackend(model, tok, seed=0, serving=True)
    body = {"messages": CHAT, "max_tokens": 4, "logprobs": True}
    with serving(backend, base_params=base) as server:
        replies = [chat(server, body | {"temperature": t}) for t in (0, 1e-30, 9e-6)]
    assert [r[0] for r in replies] == [200, 200, 200]
    choices = [r[1]["choices"][0] for r in replies]
    # Logits divided by 1e-30 overflow float32: such temperatures are greedy, as in vLLM.
    assert choices[1]["token_ids"] == choices[0]["token_ids"] == choices[2]["token_ids"]
    for choice in choices:
        logps = [c["logprob"] for c in choice["logprobs"]["content"]]
        assert logps and all(-1e4 < lp <= 0 for lp in logps), logps


def test_sampling_variants_and_n_are_bounded():
    recorder = Recorder()
    with serving(recorder, max_n=4, max_sampling_variants=2) as server:
        four = chat(server, {"messages": CHAT, "n": 4})
        five = chat(server, {"messages": CHAT, "n": 5})
        sampled = chat(server, {"messages": CHAT, "top_k": 5})  # The 2nd variant.
        again = chat(server, {"messages": CHAT, "top_k": 5, "temperature": 0.3})
        third = chat(server, {"messages": CHAT, "top_k": 7})
        stop = chat(server, {"messages": CHAT, "stop": ["x"]})
    assert four[0] == 200 and len(four[1]["choices"]) == 4
    assert five[0] == 400 and five[1]["error"]["param"] == "n"
    assert "at most 4" in five[1]["error"]["message"]
    assert sampled[0] == 200 and again[0] == 200  # Temperature is not part of a variant.
    assert third[0] == 400 and third[1]["error"]["param"] == "top_k"
    assert stop[0] == 400 and stop[1]["error"]["param"] == "stop"
    assert len(recorder.params) == 3
    with serving(Recorder()) as server:
        assert (server.max_n, server.max_sampling_variants) == (16, 16)
        assert chat(server, {"messages": CHAT, "n": 17})[0] == 400


GOOD = {"messages": CHAT}


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b'{"messages": "\xff\xfe"}', 400, None),
        (b"[" * 100_000 + b"]" * 100_000, 400, None),
        (b"[1, 2]", 400, None),
        (GOOD | {"n": "2"}, 400, "n"),
        (GOOD | {"n": 1.5}, 400, "n"),
        (GOOD | {"temperature": "hot"}, 400, "temperature"),
        (GOOD | {"temperature": 2.5}, 400, "temperature"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
         "temperature"),
        (GOOD | {"top_p": 0}, 400, "top_p"),
        (GOOD | {"top_k": 1.5}, 400, "top_k"),
        (GOOD | {"max_tokens": -1}, 400, "max_tokens"),
        (GOOD | {"max_tokens": True}, 400, "max_tokens"),
        (GOOD | {"seed": 2**64}, 400, "seed"),
        (GOOD | {"logprobs": "yes"}, 400, "logprobs"),
        (GOOD | {"stop": ""}, 400, "stop"),
        (GOOD | {"stop": ["a"] * 17}, 400, "stop"),
        (GOOD | {"stop": "a" * 257}, 400, "stop"),
        (GOOD | {"model": "gpt-4"}, 404, "model"),
        # Fields this server does not serve: refused by name, never ignored.
        (GOOD | {"min_p": 0.1}, 400, "min_p"),
        (GOOD | {"echo": None}, 400, "echo"),  # Unknown, whatever its value.
        (GOOD | {"tools": [{"type": "function"}]}, 400, "tools"),
        (GOOD | {"tool_choice": {"type": "function"}}, 400, "tool_choice"),
        (GOOD | {"functions": [{"name": "f"}]}, 400, "functions"),
        (GOOD | {"logit_bias": {"5": -100}}, 400, "logit_bias"),
        (GOOD | {"presence_penalty": "high"}, 400, "presence_penalty"),
        (GOOD | {"frequency_penalty": True}, 400, "frequency_penalty"),  # true is not 1.
        (GOOD | {"response_format": {"type": "text", "strict": True}}, 400, "response_format"),
        (GOOD | {"modalities": ["audio"]}, 400, "modalities"),
        (GOOD | {"stream_options": {"include_usage": True}}, 400, "stream_options"),
        (GOOD | {"logprobs": True, "top_logprobs": -1}, 400, "top_logprobs"),
        (GOOD | {"logprobs": True, "top_logprobs": 2.0}, 400, "top_logprobs"),
        (GOOD | {"logprobs": False, "top_logprobs": 0}, 400, "top_logprobs"),
        (GOOD | {"include_stop_str_in_output": "yes"}, 400, "include_stop_str_in_output"),
        (GOOD | {"return_token_ids": 1}, 400, "return_token_ids"),
        (GOOD | {"user": 7}, 400, "user"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]}, 400,
         "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400,
         "messages[0].content[0]"),
        ({"messages": []}, 400, "messages"),
    ],
)  # fmt: skip
def test_bad_bodies_are_4xx_with_a_json_error(body, status, param):
    recorder = Recorder()
    with serving(recorder) as server:
        got, reply, headers = chat(server, body)
    assert got == status and headers["Content-Type"] == "application/json"
    assert reply["error"]["param"] == param and reply["error"]["message"]
    assert "\n" not in reply["error"]["message"] and recorder.params == []


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2048\r\n\r\n", 413),
        (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         411),
        (b"PUT /v1/chat/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"DELETE /v1/models HTTP/1.1\r\n\r\n", 405),
        (b"GET /v1/nothing HTTP/1.1\r\n\r\n", 404),
        (b"POST /v1/other HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 404),
        (b"GET /v1/models HTTP/9.9\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1x\r\n\r\n", 400),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 GET\r\n\r\n", 400),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    ],
)  # fmt: skip
def test_malformed_http_is_4xx_with_a_json_error(request_bytes, status):
    recorder = Recorder()
    with serving(recorder, max_body_bytes=1024) as server:
        reply, _ = raw_exchange(server, request_bytes)
    got, headers, body = parse_raw(reply)
    assert got == status and headers["Content-Type"] == "application/json"
    assert body["error"]["code"] == status and body["error"]["message"]
    assert recorder.params == []


def test_200_concurrent_clients_are_all_served(tok, tiny):
    model, base = tiny
    backend = llm.JaxPolicyBackend(model, tok, serving=True)
    total, completions = 200, 20
    with serving(backend, base_params=base) as server:
        assert server.request_queue_size >= 128
        assert chat(server, {"messages": CHAT, "top_k": 1, "max_tokens": 1})[0] == 200
        barrier = threading.Barrier(total)
        results, errors = [None] * total, []

        def client(i):
            try:
                barrier.wait(30)
                if i < completions:
                    body = {"messages": CHAT, "top_k": 1, "temperature": 0.5 + i / 100}
                    body["max_tokens"] = 1
                    results[i] = chat(server, body, timeout=60)[0]
                else:
                    results[i] = call(server, "GET", "/v1/models", timeout=60)[0]
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(total)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
    assert errors == [] and results == [200] * total


def test_slow_clients_are_dropped_and_do_not_block_others():
    recorder = Recorder()
    with serving(recorder, request_timeout_s=2.0) as server:
        address = server.server_address[:2]
        silent = socket.create_connection(address, timeout=10)
        stalled = socket.create_connection(address, timeout=10)
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        trickling = socket.create_connection(address, timeout=10)
        stop = threading.Event()

        def trickle():
            # A header byte every 0.1 s: each read succeeds, so only a deadline for the
            # whole request ends it (a per-read socket timeout never fires).
            trickling.sendall(b"GET /v1/models HTTP/1.1\r\nX-Slow: ")
            with contextlib.suppress(OSError):
                while not stop.wait(0.1):
                    trickling.sendall(b"a")

        threading.Thread(target=trickle, daemon=True).start()
        start = time.monotonic()
        # Served at once while the three hold their connections.
        status, reply, _ = chat(server, {"messages": CHAT}, timeout=5)
        served_s = time.monotonic() - start
        dropped = {}
        for name, s in (("silent", silent), ("stalled", stalled), ("trickling", trickling)):
            data = b""
            # The trickler's late bytes may make the server's close a reset.
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    data += chunk
            dropped[name] = (time.monotonic() - start, data)
        stop.set()
        for s in (silent, stalled, trickling):
            s.close()
    assert status == 200 and reply["choices"][0]["message"]["content"] == "Fever? #0"
    assert served_s < 1.5
    for name, (seconds, _) in dropped.items():
        assert 1.8 <= seconds < 4.0, (name, seconds)
    assert dropped["silent"][1] == b""  # Nothing was asked: nothing to answer.
    for name in ("stalled", "trickling"):
        if name == "stalled" or dropped[name][1]:
            got, _, body = parse_raw(dropped[name][1])
            assert got == 408 and "within 2s" in body["error"]["message"]


def test_an_unset_api_key_variable_refuses_to_start(monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    for value in (None, ""):
        if value is not None:
            monkeypatch.setenv(UNSET_ENV, value)
        with pytest.raises(ValueError) as err:
            serve.make_server(Recorder(), api_key_env=UNSET_ENV)
        assert UNSET_ENV in str(err.value) and "\n" not in str(err.value)
        assert str(err.value).startswith("api_key_env:")
    # The CLI checks before it reads the checkpoint (this one does not exist); Python
    # prints the message of a SystemExit as the one line on stderr.
    argv = ["--checkpoint", "/nonexistent/ckpt", "--port", "0", "--api-key-env", UNSET_ENV]
    with pytest.raises(SystemExit) as exited:
        serve.main(argv)
    line = str(exited.value.code)
    assert (
        "\n" not in line
        and UNSET_ENV in line
        and line.startswith("medjax.llm.serve: --api-key-env")
    )

    # Set, the key is required; emptied after the start, nothing gets through.
    monkeypatch.setenv(KEY_ENV, KEY)
    recorder = Recorder()
    with serving(recorder, api_key_env=KEY_ENV) as server:
        good = chat(server, GOOD, headers={"Authorization": f"Bearer {KEY}"})
        wrong = chat(server, GOOD, headers={"Authorization": f"Bearer {KEY}x"})
        anonymous = chat(server, GOOD)
        monkeypatch.setenv(KEY_ENV, "")
        emptied = chat(server, GOOD)
        emptied_models = call(server, "GET", "/v1/models")
    assert good[0] == 200 and len(recorder.params) == 1
    assert [r[0] for r in (wrong, anonymous, emptied, emptied_models)] == [401] * 4
    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err, line, str(err.value)]
    texts += [json.dumps(r[1]) + json.dumps(r[2]) for r in (wrong, anonymous, emptied)]
    assert all(KEY not in text for text in texts)


class Fixed:
    """Replies with one fixed generation per sample; records the params of each call."""

    def __init__(self, generation, tokenizer=None):
        self.generation, self.tokenizer = generation, tokenizer
        self.params: list[SamplingParams] = []

    def generate(self, conversations, params, *, num_samples=1):
        self.params.append(params)
        return [self.generation] * num_samples


@pytest.mark.parametrize(
    "text, stop, include, content, matched",
    [
        # The token that completed "</answer>" also carried "\n": dropped either way.
        ("Paris</answer>\n", ["</answer>"], False, "Paris", "</answer>"),
        ("Paris</answer>\n", ["</answer>"], True, "Paris</answer>", "</answer>"),
        # The string completed first is the one that matched: "bc" (ends at 3) before
        # "abcd" (ends at 4), though "abcd" starts earlier.
        ("xabcd", ["abcd", "bc"], False, "xa", "bc"),
        # Both end at the same place: the longer one matched.
        ("abc", ["c", "bc"], False, "a", "bc"),
        ("abc", ["c", "bc"], True, "abc", "bc"),
        # No match: the text whole, the backend's finish reason kept.
        ("abc", ["z"], False, "abc", None),
    ],
)
def test_a_matched_stop_string_is_cut_from_content(text, stop, include, content, matched):
    # Catches: the stop string kept (OpenAI leaves it out), the trailing text of its token
    # kept, the wrong one of several stop strings, a stop_reason that does not say which.
    backend = Fixed(Generation(text, [5, 6, 7], [-0.1] * 3, "length"))
    body = GOOD | {"stop": stop, "include_stop_str_in_output": include}
    with serving(backend) as server:
        status, reply, _ = chat(server, body)
    assert status == 200
    (choice,) = reply["choices"]
    assert choice["message"]["content"] == content and choice["stop_reason"] == matched
    assert choice["finish_reason"] == ("length" if matched is None else "stop")
    assert choice["token_ids"] == [5, 6, 7]  # Every sampled id, the stop string's included.
    assert backend.params[0].stop_strings == tuple(stop)


def test_token_ids_can_be_left_out_and_top_logprobs_need_a_model(tok):
    # Catches: return_token_ids ignored; top_logprobs answered with empty lists by a backend
    # that cannot score them.
    ids = tok.encode("a") + tok.encode("b")  # One byte-level symbol each.
    backend = Fixed(Generation("ab", ids, [-0.1, -0.2], "length"), tok)
    with serving(backend) as server:
        plain = chat(server, GOOD | {"return_token_ids": False})
        top = chat(server, GOOD | {"logprobs": True, "top_logprobs": 2})
        zero = chat(server, GOOD | {"logprobs": True, "top_logprobs": 0})
    assert plain[0] == 200 and "token_ids" not in plain[1]["choices"][0]
    assert top[0] == 400 and top[1]["error"]["param"] == "top_logprobs"
    assert zero[0] == 200
    entries = zero[1]["choices"][0]["logprobs"]["content"]
    assert [e["top_logprobs"] for e in entries] == [[], []]
    assert [(e["token"], e["bytes"]) for e in entries] == [("a", [97]), ("b", [98])]


def _byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2, Mistral): "▁" marks a space and characters
    outside the vocabulary fall back to <0xNN> byte pieces."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ("\u2581", "h", "i"):
        vocab[piece] = len(vocab)
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tok.chat_template = tokenizer_lib.CHAT_TEMPLATE  # The server counts the prompt with it.
    return tok


def test_logprob_bytes_of_a_byte_fallback_tokenizer():
    # Catches: a byte piece's bytes given as the text "<0xE4>" or as U+FFFD's UTF-8, and
    # "▁" given as its own 3 bytes instead of a space.
    tok = _byte_fallback_tokenizer()
    ids = tok.encode("hi 中", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == ["\u2581", "h", "i", "\u2581", "<0xE4>", "<0xB8>", "<0xAD>"]
    backend = Fixed(Generation(" hi 中", ids, [-0.1] * len(ids), "length"), tok)
    with serving(backend) as server:
        status, reply, _ = chat(server, GOOD | {"logprobs": True})
    assert status == 200
    entries = reply["choices"][0]["logprobs"]["content"]
    assert [e["bytes"] for e in entries] == [[32], [104], [105], [32], [0xE4], [0xB8], [0xAD]]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--port", "70000"], "argument --port: must be in [0, 65535], got 70000"),
        (["--request-timeout", "0"], "argument --request-timeout"),
        (["--request-timeout", "nan"], "argument --request-timeout"),
        (["--max-context", "1"], "argument --max-context"),
        (["--backlog", "0"], "argument --backlog"),
        (["--default-max-tokens", "0"], "argument --default-max-tokens"),
        (["--max-sampling-variants", "0"], "argument --max-sampling-variants"),
        (["--max-n", "-3"], "argument --max-n: must be >= 1, got -3"),
        (["--seed", str(2**63)], "argument --seed"),
        (["--dtype", "float8"], "argument --dtype"),
    ],
)
def test_cli_flags_out_of_range_are_one_line(flags, named, capsys, tmp_path):
    # Catches: a bad flag reaching the loader or make_server (a traceback), and argparse's
    # usage block in place of one line. The checkpoint does not exist: flags come first.
    with pytest.raises(SystemExit) as exited:
        serve.main(["--checkpoint", str(tmp_path / "none"), *flags])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"medjax.llm.serve: {named}")


def test_cli_loading_errors_are_one_line_naming_the_file(tok, tiny, tmp_path, monkeypatch, capsys):
    # Catches: a traceback for a loader failure that is not a ValueError (ZeroDivisionError
    # from a GGUF's head_count 0, before the loader checks it), a bad generation_config.json,
    # a folder that is no checkpoint, and a port already taken.
    model, _ = tiny

    def main_line(argv):
        with pytest.raises(SystemExit) as exited:
            serve.main(argv)
        code = exited.value.code
        err = capsys.readouterr().err
        line = code if isinstance(code, str) else err
        assert "\n" not in line.rstrip("\n") and "Traceback" not in line
        return line

    assert "not a checkpoint" in main_line(["--checkpoint", str(tmp_path)])
    gguf = tmp_path / "odd.gguf"
    gguf.write_bytes(b"GGUF")

    def divide(*args, **kwargs):
        return 1 // 0

    monkeypatch.setattr(models.checkpoint, "from_pretrained", divide)
    line = main_line(["--checkpoint", str(gguf)])
    reason = "ZeroDivisionError: integer division or modulo by zero"
    assert line == f"medjax.llm.serve: --checkpoint {gguf}: {reason}"
    monkeypatch.undo()

    folder = tmp_path / "ckpt"
    models.save_pretrained(model, folder)
    tok.save_pretrained(folder)
    (folder / "generation_config.json").write_text('{"eos_token_id": "two"}')
    line = main_line(["--checkpoint", str(folder), "--port", "0"])
    assert line.startswith("medjax.llm.serve: --checkpoint ") and "generation_config.json" in line
    assert "eos_token_id" in line
    (folder / "generation_config.json").unlink()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = main_line(["--checkpoint", str(folder), "--port", str(port)])
    assert line.startswith(f"medjax.llm.serve: --host/--port 127.0.0.1:{port}: cannot listen")
