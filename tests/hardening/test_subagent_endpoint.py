"""The sub-agent endpoint (medjax.training.decoupled.SubAgentServer) against hostile callers,
over real sockets on 127.0.0.1: replays, ill-typed fields, a bad request beside a good one,
bools as integers, lying or slow Content-Length, oversized bodies and batches, and the shared
secret. Each refusal is a 4xx with a JSON body naming the field; nothing logged is lost or
overwritten."""

import http.client
import json
import select
import socket
import threading
import time

import pytest

from medjax import agents, llm
from medjax.models import tokenizer as tokenizer_lib
from medjax.store import FileStore
from medjax.training import decoupled

CORPUS = ["<answer>found it</answer> find the gene", "<think>no</think> search more"] * 20
SECRET_ENV = "MEDJAX_TEST_SUB_AGENT_SECRET"
SECRET = "s3cret-for-tests-0123456789abcdef"
READ_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(CORPUS, vocab_size=300)


@pytest.fixture
def make_server(tok, tmp_path, monkeypatch):
    """Starts servers whose scripted sub-agent answers `<answer>got: TASK</answer>`."""
    monkeypatch.delenv(SECRET_ENV, raising=False)
    servers = []

    def make(**options):
        prompts = []

        def reply(prompt):
            prompts.append(prompt)
            task = prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
            return f"<answer>got: {task}</answer>"

        def make_agent(model, seed):
            return agents.AgentSpec("searcher", llm.ScriptedBackend(reply, tok), max_turns=2)

        options = {"batch_window": 0.3, "read_timeout": READ_TIMEOUT, **options}
        log = FileStore(tmp_path / f"log{len(servers)}")
        s = decoupled.SubAgentServer(make_agent, log, secret_env=SECRET_ENV, **options)
        s.start().set_policy(object(), version=3)
        s.prompts, s.port = prompts, int(s.url.rsplit(":", 1)[1])
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def invocation(query, rollout, index, task):
    return {"query_id": query, "rollout_index": rollout, "invocation_index": index, "task": task}


def body(*calls, step=5, epoch=1, seed=11):
    return {"step": step, "epoch": epoch, "seed": seed, "invocations": list(calls)}


def send(server, method, path, payload=None, *, data=None, headers=None):
    """One request with http.client; (status, decoded JSON answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    if data is None and payload is not None:
        data = json.dumps(payload).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                    **(headers or {})})  # fmt: skip
    response = conn.getresponse()
    status, answer = response.status, json.loads(response.read())
    conn.close()
    return status, answer


def together(server, *payloads):
    """Sends the payloads concurrently (one batch window); their answers, in order."""
    answers = [None] * len(payloads)

    def one(i):
        answers[i] = send(server, "POST", "/delegate", payloads[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    return answers


def parse(raw: bytes):
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(rest)


def raw_exchange(server, data: bytes, timeout: float = 5.0):
    """Sends `data` on a raw socket, keeps it open and reads until the server closes;
    (status, JSON answer, seconds the answer took)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        start = time.monotonic()
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return *parse(received), time.monotonic() - start


def post_head(length: str | None, *extra: str) -> bytes:
    lines = ["POST /delegate HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [] if length is None else [f"Content-Length: {length}"]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def logged_answer(server, ident):
    return agents.Trajectory.from_dict(server.log.get(ident)["trajectory"]).answer


# ---------------------------------------------------------------------------------------
# Replays.


def test_a_replay_is_refused_and_the_logged_trajectory_stays(make_server):
    server = make_server()
    status, first = send(server, "POST", "/delegate", body(invocation("q1", 0, 0, "alpha")))
    assert status == 200 and first["results"][0]["sub_id"] == "00000005/1/q1/0/0"
    assert logged_answer(server, "00000005/1/q1/0/0") == "got: alpha"
    status, answer = send(server, "POST", "/delegate", body(invocation("q1", 0, 0, "ATTACK")))
    assert status == 409
    assert answer["field"] == "invocations[0]"
    assert "00000005/1/q1/0/0 is already logged" in answer["error"]
    assert logged_answer(server, "00000005/1/q1/0/0") == "got: alpha"
    assert len(server.prompts) == 1  # The replay never reached the sub-agent.
    assert server.replays_refused == 1
    status, health = send(server, "GET", "/status")
    assert status == 200 and health["replays_refused"] == 1 and health["batches"] == 1


def test_a_replay_in_a_batch_fails_alone_and_the_first_writer_wins(make_server):
    server = make_server()
    assert send(server, "POST", "/delegate", body(invocation("q1", 0, 0, "alpha")))[0] == 200
    (s_replay, a_replay), (s_good, a_good) = together(
        server, body(invocation("q1", 0, 0, "ATTACK")), body(invocation("q1", 1, 0, "beta"))
    )
    assert (s_replay, a_replay["field"]) == (409, "invocations[0]")
    assert s_good == 200 and a_good["results"][0]["summary"] == "got: beta"
    # Two new requests that name the same ids in one batch: the first is served and logged,
    # the second refused.
    answers = together(
        server, body(invocation("q2", 0, 0, "first")), body(invocation("q2", 0, 0, "second"))
    )
    (_, served), (_, refused) = sorted(answers, key=lambda a: a[0])
    assert sorted(status for status, _ in answers) == [200, 409]
    assert refused["field"] == "invocations[0]"
    assert served["results"][0]["summary"] in ("got: first", "got: second")
    assert logged_answer(server, "00000005/1/q2/0/0") == served["results"][0]["summary"]
    assert logged_answer(server, "00000005/1/q1/0/0") == "got: alpha"
    assert server.batches == 3 and server.replays_refused == 2
    # Ids repeated inside one request are a malformed request.
    status, answer = send(
        server, "POST", "/delegate",
        body(invocation("q3", 0, 0, "a"), invocation("q3", 0, 0, "b")),
    )  # fmt: skip
    assert status == 400 and answer["field"] == "invocations[1]"
    assert server.log.get("00000005/1/q3/0/0") is None


def test_the_client_never_sends_logged_ids_again(make_server):
    """After a failed call the agent loop asks again with the same invocation index; the
    first attempt may have been logged without its answer arriving (the sub process died, the
    request timed out). The client sends the episode's next unused index instead of a
    replay the server would refuse."""
    server = make_server()
    client = decoupled.RemoteSubAgent(lambda: server.url, 1, secret_env=SECRET_ENV)
    client.begin_step(5, 11)
    (first,) = client([agents.Delegation("q", 0, 0, "alpha")])
    (again,) = client([agents.Delegation("q", 0, 0, "beta")])
    (other,) = client([agents.Delegation("q", 1, 0, "gamma")])
    ids = [r.trajectory.metadata["sub_id"] for r in (first, again, other)]
    assert ids == ["00000005/1/q/0/0", "00000005/1/q/0/1", "00000005/1/q/1/0"]
    assert [r.summary for r in (first, again, other)] == ["got: alpha", "got: beta", "got: gamma"]
    assert logged_answer(server, "00000005/1/q/0/0") == "got: alpha"
    client.begin_step(6, 12)
    (next_step,) = client([agents.Delegation("q", 0, 0, "delta")])
    assert next_step.trajectory.metadata["sub_id"] == "00000006/1/q/0/0"
    assert server.replays_refused == 0 and client.failures == 0


# ---------------------------------------------------------------------------------------
# Fields.


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"step": True}, "step"),  # JSON true is no step number.
        ({"epoch": False}, "epoch"),
        ({"step": -1}, "step"),
        ({"seed": 2**31}, "seed"),
        ({"epoch": "1"}, "epoch"),
        ({"step": 1.0}, "step"),
        ({"invocations": []}, "invocations"),
        ({"invocations": {"query_id": "q"}}, "invocations"),
        ({"invocations": ["q"]}, "invocations[0]"),
        ({"extra": 1}, "extra"),
    ],
)  # fmt: skip
def test_top_level_fields_are_checked(make_server, change, field):
    server = make_server()
    status, answer = send(server, "POST", "/delegate", {**body(invocation("q", 0, 0, "t")),
                                                        **change})  # fmt: skip
    assert (status, answer["field"]) == (400, field), answer
    assert answer["error"].startswith("bad delegate request:") and "\n" not in answer["error"]
    assert server.batches == 0 and server.prompts == [] and server.bad_requests == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"query_id": 5}, "query_id"),
        ({"query_id": ["q"]}, "query_id"),
        ({"query_id": "."}, "query_id"),  # Not a store key part.
        ({"query_id": ""}, "query_id"),
        ({"task": None}, "task"),
        ({"task": "\ud800"}, "task"),  # A lone surrogate: no UTF-8 text.
        ({"context": 3}, "context"),
        ({"rollout_index": "0"}, "rollout_index"),
        ({"rollout_index": True}, "rollout_index"),
        ({"rollout_index": 1.5}, "rollout_index"),
        ({"invocation_index": -1}, "invocation_index"),
        ({"invocation_index": 2**31}, "invocation_index"),
    ],
)  # fmt: skip
def test_invocation_fields_are_type_checked(make_server, change, field):
    server = make_server()
    bad = {**invocation("q", 0, 0, "t"), **change}
    status, answer = send(server, "POST", "/delegate", body(invocation("q", 1, 0, "t"), bad))
    assert (status, answer["field"]) == (400, f"invocations[1].{field}"), answer
    assert server.batches == 0 and server.prompts == []


def test_unknown_and_missing_invocation_fields(make_server):
    server = make_server()
    extra = {**invocation("q", 0, 0, "t"), "__class__": "x"}
    status, answer = send(server, "POST", "/delegate", body(extra))
    assert (status, answer["field"]) == (400, "invocations[0]") and "__class__" in answer["error"]
    status, answer = send(server, "POST", "/delegate", body({"query_id": "q", "task": "t"}))
    assert (status, answer["field"]) == (400, "invocations[0]")
    assert "['rollout_index', 'invocation_index']" in answer["error"]


@pytest.mark.parametrize(
    "data", [b"[1, 2]", b"{not json", b"\xff\xfe", b"[" * 100_000], ids=["list", "junk",
                                                                        "bytes", "deep"]
)  # fmt: skip
def test_a_body_that_is_no_json_object_is_refused(make_server, data):
    server = make_server()
    status, answer = send(server, "POST", "/delegate", data=data)
    assert (status, answer["field"]) == (400, "body"), answer


def test_a_bad_request_does_not_fail_the_good_one_beside_it(make_server):
    server = make_server()
    (s_good, good), (s_bad, bad) = together(
        server, body(invocation("q1", 0, 0, "alpha")), body(invocation(7, 0, 0, "evil"))
    )
    assert s_good == 200 and good["results"][0]["summary"] == "got: alpha"
    assert (s_bad, bad["field"]) == (400, "invocations[0].query_id")
    assert server.batches == 1 and len(server.prompts) == 1
    assert server.log.list() == ["00000005/1/q1/0/0"]


# ---------------------------------------------------------------------------------------
# Content-Length, slow clients and limits.


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (post_head("-1"), 400),
        (post_head("1_0"), 400),
        (post_head(" 0x10"), 400),
        (post_head(None), 411),
        (post_head("2", "Content-Length: 2"), 411),
    ],
    ids=["negative", "underscore", "hex", "missing", "twice"],
)
def test_a_lying_content_length_is_refused_at_once(make_server, head, status):
    server = make_server(read_timeout=3.0)
    got, answer, took = raw_exchange(server, head)
    assert (got, answer["field"]) == (status, "Content-Length"), answer
    assert took < 2.0  # Answered at once, not after the read timeout.


def test_a_client_that_sends_less_than_its_content_length_is_cut_off(make_server):
    server = make_server()
    short = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    short.sendall(post_head("100") + b'{"step": 1')
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    # Meanwhile other clients are served.
    status, answer = send(server, "POST", "/delegate", body(invocation("q1", 0, 0, "alpha")))
    assert status == 200
    start = time.monotonic()
    received = b""
    while chunk := short.recv(65536):
        received += chunk
    status, answer = parse(received)
    assert (status, answer["field"]) == (408, "body") and "10 of its 100 bytes" in answer["error"]
    assert time.monotonic() - start < 4 * READ_TIMEOUT
    assert silent.recv(1) == b""  # Nothing sent: disconnected after the read timeout.
    short.close()
    silent.close()


def test_a_trickling_client_is_cut_off_after_the_read_timeout_in_all(make_server):
    server = make_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        start = time.monotonic()
        s.sendall(post_head("200"))
        # One byte every 0.1 s: each read is quick, the whole body would take 20 s.
        while not select.select([s], [], [], 0.1)[0]:
            s.sendall(b" ")
            assert time.monotonic() - start < 4 * READ_TIMEOUT, "still reading"
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    assert parse(received)[0] == 408


def test_body_size_and_invocation_count_are_capped(make_server):
    server = make_server(max_body_bytes=2048, max_invocations=3)
    status, answer, took = raw_exchange(server, post_head("2049"))  # The body is never sent.
    assert (status, answer["field"]) == (413, "Content-Length") and "2048 bytes" in answer["error"]
    assert took < 2.0
    four = [invocation("q", i, 0, "t") for i in range(4)]
    status, answer = send(server, "POST", "/delegate", body(*four))
    assert (status, answer["field"]) == (413, "invocations") and "at most 3" in answer["error"]
    status, answer = send(server, "POST", "/delegate", body(*four[:3]))
    assert status == 200 and len(answer["results"]) == 3
    assert server.bad_requests == 2


# ---------------------------------------------------------------------------------------
# The shared secret.


@pytest.mark.parametrize("host", ["0.0.0.0", ""])
def test_beyond_loopback_the_server_refuses_to_start_without_the_secret(make_server, host):
    with pytest.raises(ValueError, match=rf"\${SECRET_ENV}") as e:
        make_server(host=host)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="beyond loopback"):
        decoupled.SubAgentServer(lambda m, s: None, None, host=host, secret_env=None)


def test_beyond_loopback_with_the_secret_every_request_needs_it(
    make_server, monkeypatch, capsys, tmp_path
):  # fmt: skip
    monkeypatch.setenv(SECRET_ENV, SECRET)
    server = make_server(host="0.0.0.0")
    good = {"Authorization": f"Bearer {SECRET}"}
    answers = [
        send(server, "GET", "/health"),
        send(server, "POST", "/delegate", body(invocation("q", 0, 0, "t"))),
        send(server, "POST", "/delegate", body(invocation("q", 0, 0, "t")),
             headers={"Authorization": "Bearer wrong"}),
        send(server, "POST", "/delegate", body(invocation("q", 0, 0, "t")),
             headers={"Authorization": SECRET}),  # Without "Bearer ".
    ]  # fmt: skip
    for status, answer in answers:
        assert (status, answer["field"]) == (401, "Authorization"), answer
        assert SECRET_ENV in answer["error"] and SECRET not in answer["error"]
    assert server.prompts == [] and server.log.list() == []
    assert send(server, "GET", "/health", headers=good) == (200, {"version": 3, "ready": True})
    status, answer = send(server, "GET", "/status", headers=good)
    assert status == 200 and answer["unauthorized"] == 4
    client = decoupled.RemoteSubAgent(lambda: server.url, 1, secret_env=SECRET_ENV)
    assert client.healthy()
    client.begin_step(5, 11)
    (result,) = client([agents.Delegation("q", 0, 0, "alpha")])
    assert result.error is None and result.summary == "got: alpha"
    # A client with another secret is refused at its first contact, and never retried.
    monkeypatch.setenv("MEDJAX_TEST_OTHER_SECRET", "not-the-secret")
    stranger = decoupled.RemoteSubAgent(
        lambda: server.url, 1, on_failure="wait", timeout=30, secret_env="MEDJAX_TEST_OTHER_SECRET"
    )
    with pytest.raises(decoupled.SubAgentRefusedError, match="answered 401"):
        stranger.healthy()
    start = time.monotonic()
    (result,) = stranger([agents.Delegation("q", 1, 0, "beta")])
    assert "answered 401" in result.error and time.monotonic() - start < 5.0
    # The secret is in no answer, error, repr, attribute, output or file.
    seen = [repr(server), repr(vars(server)), repr(vars(client)), result.error]
    captured = capsys.readouterr()
    seen += [captured.out, captured.err]
    seen += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert not [text for text in seen if SECRET in text]


def test_on_loopback_the_secret_is_used_when_set(make_server, monkeypatch):
    assert send(make_server(), "GET", "/health")[0] == 200  # Not set: open on loopback.
    monkeypatch.setenv(SECRET_ENV, SECRET)
    server = make_server(read_timeout=2.0)  # Time to read the big body below.
    assert send(server, "GET", "/health")[0] == 401
    # A refused request's unread body does not reset the connection before the answer.
    big = {**body(invocation("q", 0, 0, "t" * 2**23))}
    status, answer = send(server, "POST", "/delegate", big)
    assert (status, answer["field"]) == (401, "Authorization")
    status, _ = send(server, "GET", "/health", headers={"Authorization": f"Bearer {SECRET}"})
    assert status == 200
