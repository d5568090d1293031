"""medjax.llm.OpenAICompatibleBackend and medjax.llm.serve against real HTTP servers on
127.0.0.1: a served model's greedy replies equal the local backend's, the request carries the
sampling parameters, retries (500, 429 + Retry-After, timeouts, refused connections) and their
limits, the concurrency bound, 400s naming the field, an API key that never leaks, the CLI,
and the stop string a server left out put back (the rule on hand-made replies; the agent loop
against each kind of server is tests/integration/test_openai_stop_behaviours.py)."""

import dataclasses
import http.server
import json
import logging
import os
import pathlib
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

import numpy as np
import pytest

from medjax import llm, models
from medjax.llm import serve
from medjax.llm.base import Generation
from medjax.models import tokenizer as tokenizer_lib
from medjax.sampling import SamplingParams
from tests import servers
from tests.servers import running, serving

REPO = pathlib.Path(__file__).resolve().parents[2]
CORPUS = [
    "The patient reports a headache and fever for three days.",
    "Does the pain get worse at night? Any nausea or vomiting?",
    '<think>Consider migraine.</think><tool_call>{"name": "search"}</tool_call>',
    "<answer>Migraine without aura</answer> End Inquiry",
] * 8
CHATS = [
    [
        {"role": "system", "content": "You are a doctor."},
        {"role": "user", "content": "I have a headache."},
    ],
    [{"role": "user", "content": "Fever?"}],
]
PARAMS = SamplingParams(max_new_tokens=4)
KEY_ENV = "MEDJAX_TEST_API_KEY"
KEY = "sk-medjax-test-7Qz9xKpL2vW4"


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny():
    """A tiny model, its tokenizer, the server's base params and the local greedy replies
    (which also compile the program the served model runs)."""
    tok = tokenizer_lib.train_bpe(CORPUS, vocab_size=320)
    model = servers.tiny_model(tok)
    base = SamplingParams(max_new_tokens=6, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    greedy = dataclasses.replace(base, greedy=True)
    local = llm.JaxPolicyBackend(model, tok, seed=0)
    # One conversation per call, as the server sees them.
    expected = [g for chat in CHATS for g in local.generate([chat], greedy, num_samples=2)]
    return model, tok, base, expected


class EchoBackend:
    """Replies "<last message> #<sample>"; raises on the message "boom"."""

    def generate(self, conversations, params, *, num_samples=1):
        if any(chat[-1]["content"] == "boom" for chat in conversations):
            raise RuntimeError("boom")
        return [
            Generation(f"{chat[-1]['content']} #{g}", [5, 6], [-0.5, -0.25], "length")
            for chat in conversations
            for g in range(num_samples)
        ]


class Recorder:
    """Delegates to `inner` after failing the first `fail` calls and sleeping `delays[i]`
    (the last delay repeats); counts calls and the most calls in flight at once."""

    def __init__(self, inner, *, fail: int = 0, delays: tuple[float, ...] = (0.0,)):
        self.inner, self.fail, self.delays = inner, fail, delays
        self.calls = self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def generate(self, conversations, params, *, num_samples=1):
        with self._lock:
            index = self.calls
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delays[min(index, len(self.delays) - 1)])
            if index < self.fail:
                raise RuntimeError(f"failure {index}")
            return self.inner.generate(conversations, params, num_samples=num_samples)
        finally:
            with self._lock:
                self.in_flight -= 1


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    """Answers the i-th POST with the server's i-th (status, headers, payload), the last one
    repeating, and records each request's headers and body."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((dict(self.headers), body))
            index = min(len(self.server.requests), len(self.server.replies)) - 1
        status, headers, payload = self.server.replies[index]
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def scripted(*replies):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedHandler)
    server.replies, server.requests, server.lock = list(replies), [], threading.Lock()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return running(server)


def chat_reply(*texts, logprobs=True, token_ids=True):
    """An OpenAI reply, choices listed in reverse order (clients must sort by index)."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
            "logprobs": {"content": [{"token": "a", "logprob": -0.5 * (i + 1)}]}
            if logprobs
            else None,
            **({"token_ids": [7 + i]} if token_ids else {}),
        }
        for i, text in enumerate(texts)
    ]
    return (200, {}, {"choices": choices[::-1]})


def client(url, **kwargs):
    defaults = {
        "api_key_env": KEY_ENV, "timeout_s": 10.0, "max_retries": 2, "backoff_s": 0.01,
        "max_backoff_s": 2.0,
    }  # fmt: skip
    return llm.OpenAICompatibleBackend(url, "medjax", **defaults | kwargs)


def post(url, body, headers=None):
    """Raw POST; returns (status, decoded JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def test_greedy_replies_over_http_equal_the_local_backend(tiny):
    model, tok, base, expected = tiny
    with serving(llm.JaxPolicyBackend(model, tok), base_params=base, tokenizer=tok) as server:
        backend = client(server.url, timeout_s=60.0)
        assert isinstance(backend, llm.TextBackend)
        outs = backend.generate(CHATS, SamplingParams(max_new_tokens=6, greedy=True), num_samples=2)
    assert len(outs) == 4
    for out, want in zip(outs, expected, strict=True):
        assert out.text == want.text and out.finish_reason == want.finish_reason
        assert out.token_ids == want.token_ids and len(out.token_ids) > 0
        np.testing.assert_allclose(out.logps, want.logps, atol=1e-6)
    # The replies depend on the conversation (the tiny model's greedy text may not).
    assert not np.allclose(expected[0].logps, expected[2].logps)


def test_reply_schema_usage_and_seed(tiny):
    model, tok, base, _ = tiny
    server = serve.make_server(
        llm.JaxPolicyBackend(model, tok), base_params=base, tokenizer=tok, model_name="tiny",
        backend_for_seed=lambda seed: llm.JaxPolicyBackend(model, tok, seed=seed),
    )  # fmt: skip
    body = {"model": "tiny", "messages": CHATS[1], "n": 2, "max_tokens": 6, "seed": 3}
    with running(server):
        status, reply = post(server.url + "/chat/completions", body | {"logprobs": True})
        again = post(server.url + "/chat/completions", body)[1]
        with urllib.request.urlopen(server.url + "/models", timeout=10) as response:
            listed = json.loads(response.read())
        missing = post(server.url + "/chat/completions", body | {"model": "gpt-4"})
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == "tiny"
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    prompt = tok.apply_chat_template(CHATS[1], add_generation_prompt=True, return_dict=False)
    completion = sum(len(c["token_ids"]) for c in reply["choices"])
    assert reply["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": completion,
        "total_tokens": len(prompt) + completion,
    }
    for choice in reply["choices"]:
        assert choice["message"]["role"] == "assistant"
        tokens = [t["token"] for t in choice["logprobs"]["content"]]
        assert tokens == [tok.decode([i], skip_special_tokens=False) for i in choice["token_ids"]]
    # The same seed gives the same samples; logprobs only when asked for.
    assert [c["token_ids"] for c in again["choices"]] == [c["token_ids"] for c in reply["choices"]]
    assert all(c["logprobs"] is None for c in again["choices"])
    assert listed["data"][0]["id"] == "tiny"
    assert missing[0] == 404 and missing[1]["error"]["param"] == "model"


def test_sampling_params_map_onto_the_request():
    with scripted(chat_reply("b", "a"), chat_reply("c", logprobs=False, token_ids=False)) as srv:
        backend = client(srv.url)
        params = SamplingParams(
            max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=20, stop_strings=("End",),
            eos_ids=(3,), stop_sequences=((4, 5),),
        )  # fmt: skip
        outs = backend.generate(CHATS[1:], params, num_samples=2)
        plain = backend.generate(CHATS[1:], SamplingParams(max_new_tokens=5, greedy=True))
        assert backend.generate([], params) == []
    (headers, body), (_, greedy_body) = srv.requests
    assert body == {
        "model": "medjax", "messages": CHATS[1], "n": 2, "max_tokens": 9, "temperature": 0.7,
        "top_p": 0.9, "top_k": 20, "stop": ["End"], "logprobs": True,
    }  # fmt: skip
    assert greedy_body["temperature"] == 0.0 and "top_k" not in greedy_body
    assert "stop" not in greedy_body and greedy_body["n"] == 1
    assert "Authorization" not in headers  # The key's variable is unset.
    assert [(o.text, o.token_ids, o.logps) for o in outs] == [
        ("b", [7], [-0.5]),
        ("a", [8], [-1.0]),
    ]
    assert (plain[0].text, plain[0].token_ids, plain[0].logps) == ("c", [], None)


def test_a_500_is_retried():
    flaky = Recorder(EchoBackend(), fail=1)
    with serving(flaky) as server:
        outs = client(server.url).generate(CHATS[:1], PARAMS, num_samples=2)
    assert flaky.calls == 2
    assert [o.text for o in outs] == ["I have a headache. #0", "I have a headache. #1"]
    assert (outs[0].token_ids, outs[0].logps, outs[0].finish_reason) == (
        [5, 6],
        [-0.5, -0.25],
        "length",
    )


def test_retries_are_logged_and_exhausted_retries_raise(caplog):
    caplog.set_level(logging.WARNING, logger="medjax.llm")
    flaky = Recorder(EchoBackend(), fail=10)
    with serving(flaky) as server, pytest.raises(llm.BackendError) as err:
        client(server.url, max_retries=2).generate(CHATS[:1], PARAMS)
    assert flaky.calls == 3
    assert (err.value.status, err.value.attempts) == (500, 3)
    assert server.url + "/chat/completions" in str(err.value) and "3 attempt" in str(err.value)
    assert "RuntimeError: failure 2" in str(err.value)  # The server's error message, quoted.
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and "HTTP 500" in retries[0] and "attempt 1 of 3" in retries[0]


def test_429_waits_for_retry_after():
    busy = (429, {"Retry-After": "1"}, {"error": {"message": "slow down"}})
    with scripted(busy, chat_reply("ok")) as srv:
        start = time.monotonic()
        outs = client(srv.url, max_retries=1).generate(CHATS[:1], PARAMS)
        elapsed = time.monotonic() - start
    assert outs[0].text == "ok" and len(srv.requests) == 2
    assert 1.0 <= elapsed < 3.0  # The 0.01 s backoff alone would retry at once.


def test_other_4xx_and_malformed_replies_fail_at_once():
    bad = (400, {}, {"error": {"message": "max_tokens is too large"}})
    with scripted(bad) as srv:
        with pytest.raises(llm.BackendError, match="HTTP 400: max_tokens is too large") as err:
            client(srv.url).generate(CHATS[:1], PARAMS)
        assert len(srv.requests) == 1 and (err.value.status, err.value.attempts) == (400, 1)
    with scripted(chat_reply("only one")) as srv:
        with pytest.raises(llm.BackendError, match="1 choices for n=2"):
            client(srv.url).generate(CHATS[:1], PARAMS, num_samples=2)
        assert len(srv.requests) == 1


def test_refused_connections_are_retried_then_raise():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # Free once closed: nothing listens there.
    with pytest.raises(llm.BackendError, match="connection failed") as err:
        client(f"http://127.0.0.1:{port}/v1", max_retries=2).generate(CHATS[:1], PARAMS)
    assert (err.value.status, err.value.attempts) == (None, 3)


def test_timeout_without_retries_fails_fast():
    slow = Recorder(EchoBackend(), delays=(1.5,))
    with serving(slow, serialize=False) as server:
        start = time.monotonic()
        with pytest.raises(llm.BackendError, match=r"timed out after 0\.3s") as err:
            client(server.url, timeout_s=0.3, max_retries=0).generate(CHATS[:1], PARAMS)
        elapsed = time.monotonic() - start
    assert elapsed < 1.2 and (err.value.status, err.value.attempts) == (None, 1)


def test_a_slow_first_attempt_is_retried():
    slow = Recorder(EchoBackend(), delays=(1.0, 0.0))
    with serving(slow, serialize=False) as server:
        outs = client(server.url, timeout_s=0.3, max_retries=1).generate(CHATS[1:], PARAMS)
    assert slow.calls == 2 and outs[0].text == "Fever? #0"


def test_api_key_is_required_and_never_leaks(monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-medjax-wrong-Hq3mTn8Rr1"
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("MEDJAX_TEST_WRONG_KEY", wrong)
    echo = Recorder(EchoBackend())
    with serving(echo, api_key_env=KEY_ENV) as server:
        backend = client(server.url)
        assert backend.generate(CHATS[1:], PARAMS)[0].text == "Fever? #0"
        with pytest.raises(llm.BackendError) as failed:
            backend.generate([[{"role": "user", "content": "boom"}]], PARAMS)
        with pytest.raises(llm.BackendError) as refused:
            client(server.url, api_key_env="MEDJAX_TEST_WRONG_KEY").generate(CHATS[1:], PARAMS)
        with pytest.raises(llm.BackendError) as anonymous:
            client(server.url, api_key_env="MEDJAX_TEST_UNSET").generate(CHATS[1:], PARAMS)
        status, raw = post(server.url + "/chat/completions", {"messages": CHATS[1]})
    assert echo.calls == 1 + 3  # One happy call, three tries of "boom", none without the key.
    assert (failed.value.status, failed.value.attempts) == (500, 3)
    for err in (refused.value, anonymous.value):
        assert (err.status, err.attempts) == (401, 1)  # Not retried.
    assert status == 401 and raw["error"]["type"] == "authentication_error"
    assert len([r for r in caplog.records if "wrong API key" in r.getMessage()]) == 3
    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err, repr(backend), json.dumps(raw)]
    texts += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    for err in (failed, refused, anonymous):
        texts += [str(err.value), repr(err.value), "".join(traceback.format_exception(err.value))]
    for text in texts:
        assert KEY not in text and wrong not in text


def test_in_flight_requests_never_exceed_max_concurrency():
    slow = Recorder(EchoBackend(), delays=(0.15,))
    chats = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    with serving(slow, serialize=False) as server:
        backend = client(server.url, max_concurrency=2)
        outs = backend.generate(chats, PARAMS, num_samples=2)
        assert slow.max_in_flight == 2 and slow.calls == 6
        # Two concurrent calls share the bound.
        threads = [
            threading.Thread(target=backend.generate, args=(chats[:3], PARAMS)) for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert slow.max_in_flight == 2 and slow.calls == 12
    assert [o.text for o in outs] == [f"q{i} #{g}" for i in range(6) for g in range(2)]


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": CHATS[1], "n": "2"}, "n"),
        ({"messages": CHATS[1], "max_tokens": 0}, "max_tokens"),
        ({"messages": CHATS[1], "temperature": -1}, "temperature"),
        ({"messages": CHATS[1], "stop": [1]}, "stop"),
        ({"messages": CHATS[1], "stream": True}, "stream"),
    ],
)
def test_bad_requests_get_400_naming_the_field(body, param):
    echo = Recorder(EchoBackend())
    with serving(echo) as server:
        status, reply = post(server.url + "/chat/completions", body)
    assert status == 400 and echo.calls == 0
    assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"
    assert (param or "not valid JSON") in reply["error"]["message"]


def _first_line(stream, timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        return ""


def test_cli_serves_a_checkpoint(tiny, tmp_path):
    model, tok, _, expected = tiny
    folder = tmp_path / "tiny-ckpt"
    models.save_pretrained(model, folder)
    tok.save_pretrained(folder)
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "medjax.llm.serve", "--checkpoint", str(folder), "--port", "0"]
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=REPO
        )
        try:
            line = _first_line(proc.stdout, 120.0)
            match = re.fullmatch(
                r"medjax\.llm\.serve: serving tiny-ckpt on http://([\d.]+):(\d+)/v1\n", line
            )
            stderr.seek(0)
            assert match, f"stdout: {line!r}; stderr: {stderr.read()[-2000:]}"
            assert match[1] == "127.0.0.1"
            backend = llm.OpenAICompatibleBackend(
                f"http://127.0.0.1:{match[2]}/v1", "tiny-ckpt", timeout_s=60.0, max_retries=0
            )
            outs = backend.generate(
                CHATS, SamplingParams(max_new_tokens=6, greedy=True), num_samples=2
            )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert [o.token_ids for o in outs] == [g.token_ids for g in expected]
    assert [o.text for o in outs] == [g.text for g in expected]
    assert proc.returncode == 0  # SIGTERM unwinds serve_forever.


# -- stop strings a server left out --------------------------------------------------------

STOPS = ("</tool_call>", "</answer>")
CALL = '<tool_call>{"name": "lookup", "arguments": {"term": "fever"}}'


@pytest.mark.parametrize(
    "text, finish_reason, stops, reported, expected",
    [
        # OpenAI: no field names the stop; the last open tag is the one that was closed.
        (
            "<think>a</think>" + CALL,
            "stop",
            STOPS,
            None,
            "<think>a</think>" + CALL + "</tool_call>",
        ),
        (
            "<think>a</think><answer>flu",
            "stop",
            STOPS,
            None,
            "<think>a</think><answer>flu</answer>",
        ),
        # An EOS: every tag closed or none opened, nothing appended.
        ("Do you have a cough?", "stop", STOPS, None, "Do you have a cough?"),
        ("<think>a</think>Any nausea?", "stop", STOPS, None, "<think>a</think>Any nausea?"),
        # A closed call before an open answer: the answer is the open one.
        (
            CALL + "</tool_call><answer>flu",
            "stop",
            STOPS,
            None,
            CALL + "</tool_call><answer>flu</answer>",
        ),
        # A closed call after an open answer does not hide the answer.
        (
            "<answer>x " + CALL + "</tool_call> y",
            "stop",
            STOPS,
            None,
            "<answer>x " + CALL + "</tool_call> y</answer>",
        ),
        # Nested open tags: the innermost closes first.
        ("<answer>see " + CALL, "stop", STOPS, None, "<answer>see " + CALL + "</tool_call>"),
        # Kept by the server: never doubled.
        ("<answer>flu</answer>", "stop", STOPS, None, "<answer>flu</answer>"),
        (CALL + "</tool_call>", "stop", STOPS, "</tool_call>", CALL + "</tool_call>"),
        # Cut by the budget or a filter: not a stop string.
        ("<answer>flu", "length", STOPS, None, "<answer>flu"),
        ("<answer>flu", "content_filter", STOPS, None, "<answer>flu"),
        # No stop strings sent: nothing can have matched.
        ("<answer>flu", "stop", (), None, "<answer>flu"),
        # Only bare tags count: "<answer id=1>" opens no "<answer>".
        ("<answer id=1>flu", "stop", STOPS, None, "<answer id=1>flu"),
        # A stop string that is not a tag cannot be told from an EOS without the server.
        ("<think>done</think>", "stop", (*STOPS, "End Inquiry"), None, "<think>done</think>"),
    ],
)
def test_unreported_stops_follow_the_unclosed_tag_rule(
    text, finish_reason, stops, reported, expected
):
    if reported is None:
        reported = llm.openai_backend.UNREPORTED
    got = llm.openai_backend.restore_stop_string(text, finish_reason, stops, reported=reported)
    assert got == expected


@pytest.mark.parametrize(
    "choice, expected",
    [
        # vLLM: stop_reason is the matched string, null for EOS, an id for a stop token.
        ({"stop_reason": "</answer>"}, "<answer>flu</answer>"),
        ({"stop_reason": None}, "<answer>flu"),  # EOS with the tag still open: left open.
        ({"stop_reason": 128009}, "<answer>flu"),
        # SGLang: matched_stop, an int for EOS.
        ({"matched_stop": "</answer>"}, "<answer>flu</answer>"),
        ({"matched_stop": 2}, "<answer>flu"),
        # A reported string we did not send is not ours to append.
        ({"stop_reason": "\n\n"}, "<answer>flu"),
        # No field: the unclosed-tag rule.
        ({}, "<answer>flu</answer>"),
    ],
)
def test_a_reported_stop_wins_over_the_tag_rule(choice, expected):
    reported = llm.openai_backend.reported_stop(choice)
    got = llm.openai_backend.restore_stop_string("<answer>flu", "stop", STOPS, reported=reported)
    assert got == expected


def test_a_reported_end_phrase_is_restored():
    stops = (*STOPS, "End Inquiry")
    got = llm.openai_backend.restore_stop_string(
        "I have enough. ", "stop", stops, reported="End Inquiry"
    )
    assert got == "I have enough. End Inquiry"


def _stop_choice(index, text, **fields):
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
        **fields,
    }


def test_the_backend_restores_stripped_stops_unless_told_not_to():
    reply = (
        200,
        {},
        {
            "choices": [
                _stop_choice(0, "<think>a</think>" + CALL),  # OpenAI: stripped, unnamed.
                _stop_choice(1, "Any cough?"),  # EOS.
                _stop_choice(2, "<answer>flu", stop_reason="</answer>"),  # vLLM.
                _stop_choice(3, "<answer>flu", stop_reason=None),  # vLLM: EOS.
            ]
        },
    )
    params = SamplingParams(max_new_tokens=9, stop_strings=STOPS)
    with scripted(reply) as srv:
        restored = client(srv.url).generate(CHATS[1:], params, num_samples=4)
        raw = client(srv.url, stop_in_output="as_returned").generate(
            CHATS[1:], params, num_samples=4
        )
    assert [g.text for g in restored] == [
        "<think>a</think>" + CALL + "</tool_call>",
        "Any cough?",
        "<answer>flu</answer>",
        "<answer>flu",
    ]
    assert [g.text for g in raw] == [
        "<think>a</think>" + CALL,
        "Any cough?",
        "<answer>flu",
        "<answer>flu",
    ]
    assert all(g.finish_reason == "stop" for g in restored + raw)


def test_extra_body_travels_and_cannot_replace_the_backends_fields():
    vendor = {"include_stop_str_in_output": True, "chat_template_kwargs": {"x": [1]}}
    with scripted(chat_reply("a")) as srv:
        backend = client(srv.url, extra_body=vendor)
        vendor["chat_template_kwargs"]["x"].append(2)  # Copied at construction.
        backend.generate(CHATS[1:], SamplingParams(max_new_tokens=3, stop_strings=STOPS))
    ((_, body),) = srv.requests
    assert body["include_stop_str_in_output"] is True
    assert body["chat_template_kwargs"] == {"x": [1]}
    assert body["stop"] == list(STOPS) and body["max_tokens"] == 3
    with pytest.raises(ValueError, match="extra_body may not set max_tokens, stop"):
        client("http://127.0.0.1:9/v1", extra_body={"stop": ["x"], "max_tokens": 5})
    with pytest.raises(ValueError, match="extra_body is not JSON"):
        client("http://127.0.0.1:9/v1", extra_body={"x": float("nan")})
    with pytest.raises(ValueError, match="extra_body is not JSON"):
        client("http://127.0.0.1:9/v1", extra_body={"x": object()})
    with pytest.raises(ValueError, match="stop_in_output='strip'; expected one of restore"):
        client("http://127.0.0.1:9/v1", stop_in_output="strip")


def test_a_content_that_is_not_text_is_a_malformed_reply():
    reply = (200, {}, {"choices": [_stop_choice(0, [{"type": "text", "text": "a"}])]})
    with scripted(reply) as srv, pytest.raises(llm.BackendError, match="not a string"):
        client(srv.url).generate(CHATS[1:], PARAMS)
