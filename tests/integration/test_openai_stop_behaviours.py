"""The agent loop through `OpenAICompatibleBackend` against real HTTP servers on 127.0.0.1
that treat a matched stop string as OpenAI does (left out of the text, not named), as vLLM
and SGLang do (left out unless asked to keep it, named in `stop_reason` / `matched_stop`) and
as `medjax.llm.serve` did before issue 39 (kept): every one gives the same parsed answers,
tool calls and conversations.

The servers play a scripted model: a function of the conversation writes the whole text the
model would produce up to its EOS, past the point where a stop string ends the turn, and the
server applies the request's `stop` list to it as its kind does.
"""

import contextlib
import http.server
import json
import logging
import threading

import pytest

from medjax import agents, llm
from medjax.models import tokenizer as tokenizer_lib
from tests.servers import running, serving

LOOKUP_SCHEMA = {
    "type": "object",
    "properties": {"term": {"type": "string"}},
    "required": ["term"],
}
FACTS = {"fever": "raised body temperature", "cough": "a reflex that clears the airways"}
SGLANG_EOS_ID = 2  # What SGLang's `matched_stop` holds for an EOS token.
# The request fields each kind of server accepts; OpenAI refuses the rest with a 400.
OPENAI_FIELDS = {"model", "messages", "n", "max_tokens", "temperature", "top_p", "logprobs", "stop"}
VENDOR_FIELDS = {
    "vllm": {"top_k", "include_stop_str_in_output"},
    "sglang": {"top_k", "no_stop_trim"},
}


def call_text(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


FEVER_CALL = call_text("lookup", term="fever")
COUGH_CALL = call_text("lookup", term="cough")


def model_output(messages: list[dict]) -> str:
    """The scripted model's whole continuation, to its EOS; each turn's stop string is
    followed by what a model would go on to write (a made-up tool response, chatter)."""
    return continuation(messages[1]["content"], " ".join(m["content"] for m in messages[2:]))


def continuation(first: str, history: str) -> str:
    """`model_output` given the first user message and the text of the later turns."""
    if first == "Zebra?":
        return "<answer>zebra</answer>"
    if first == "What causes fever?":
        if FACTS["fever"] not in history:
            return f"<think>look it up</think>\n{FEVER_CALL}\n<tool_response>\nmade up"
        return "<think>a raised body temperature</think>\n<answer>influenza</answer>\nBye."
    if first == "I have a cough.":
        if "Since Monday." not in history:
            return "When did the cough start?"  # Ends on EOS: no stop string to restore.
        if FACTS["cough"] not in history:
            return f"{COUGH_CALL}\n<tool_response>\nmade up"
        return "<answer>acute bronchitis</answer>"
    if first == "I feel dizzy.":  # The dialogue doctor of test_end_phrase_*.
        if agents.EARLY_STOP_PROMPT in history:
            return "<answer>vertigo</answer>"
        if "Since Monday." not in history:
            return "How long have you felt dizzy?"
        return "<think>enough</think>\nEnd Inquiry\nThank you."
    raise AssertionError(f"unscripted conversation: {first!r}")


def apply_stops(text: str, stops: list[str]) -> tuple[str, str | None]:
    """The text up to and including the first stop string to complete, and that string
    (None: the model reached its EOS first)."""
    ends = [(text.find(s) + len(s), s) for s in stops if s in text]
    if not ends:
        return text, None
    end, stop = min(ends)
    return text[:end], stop


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        unknown = set(body) - OPENAI_FIELDS - VENDOR_FIELDS.get(server.kind, set())
        if self.path != "/v1/chat/completions" or unknown:
            message = f"Unrecognized request argument supplied: {', '.join(sorted(unknown))}"
            return self._send(400, {"error": {"message": message, "type": "invalid_request"}})
        keep = server.kind == "keeps" or body.get(
            {"vllm": "include_stop_str_in_output", "sglang": "no_stop_trim"}.get(server.kind, ""),
            False,
        )
        text, stop = apply_stops(model_output(body["messages"]), body.get("stop") or [])
        if stop is not None and not keep:
            text = text[: -len(stop)]
        choices = []
        for index in range(body.get("n", 1)):
            choice = {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",  # An EOS and a stop string alike.
                "logprobs": None,
            }
            if server.kind == "vllm":
                choice["stop_reason"] = stop
            elif server.kind == "sglang":
                choice["matched_stop"] = SGLANG_EOS_ID if stop is None else stop
            choices.append(choice)
        with server.lock:
            server.requests.append(body)
            server.sent.append((text, stop))
        self._send(200, {"object": "chat.completion", "model": body["model"], "choices": choices})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def server_of(kind: str):
    """A chat-completions server of `kind` ("openai", "keeps", "vllm", "sglang") on an
    ephemeral port of 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.kind, server.lock, server.requests, server.sent = kind, threading.Lock(), [], []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    with running(server):
        yield server


def lookup(term: str) -> str:
    return f"{term}: {FACTS[term]}"


def patient(trajectories):
    return ["Since Monday." for _ in trajectories]


def research_agent(backend) -> agents.AgentSpec:
    tool = agents.Tool("lookup", "Looks a term up.", LOOKUP_SCHEMA, lookup)
    return agents.AgentSpec(
        "doctor", backend, system_prompt="You are a doctor.", tools=[tool], max_turns=4,
        responder=patient,
    )  # fmt: skip


QUERIES = [
    agents.Query("fever", "What causes fever?"),
    agents.Query("zebra", "Zebra?"),
    agents.Query("cough", "I have a cough."),
]
QUERY_MESSAGE = {"role": "user", "content": "What causes fever?"}
FEVER_TURNS = [
    f"<think>look it up</think>\n{FEVER_CALL}",
    "<think>a raised body temperature</think>\n<answer>influenza</answer>",
]
COUGH_TURNS = ["When did the cough start?", COUGH_CALL, "<answer>acute bronchitis</answer>"]
# Per query: the replies as the loop saw them, the tool calls, the observations, the answer.
EXPECTED = {
    "fever": (
        FEVER_TURNS,
        [("lookup", {"term": "fever"}), (None, None)],
        ["<tool_response>\nfever: raised body temperature\n</tool_response>", None],
        "influenza",
    ),
    "zebra": (["<answer>zebra</answer>"], [(None, None)], [None], "zebra"),
    "cough": (
        COUGH_TURNS,
        [(None, None), ("lookup", {"term": "cough"}), (None, None)],
        [
            "Since Monday.",
            "<tool_response>\ncough: a reflex that clears the airways\n</tool_response>",
            None,
        ],
        "acute bronchitis",
    ),
}
SERVERS = [
    ("openai", {}, False),  # Strips; names nothing.
    ("keeps", {}, True),  # medjax.llm.serve before issue 39.
    ("keeps", {"stop_in_output": "as_returned"}, True),
    ("vllm", {}, False),  # Strips; stop_reason.
    ("vllm", {"extra_body": {"include_stop_str_in_output": True}}, True),
    ("sglang", {}, False),  # Strips; matched_stop.
    ("sglang", {"extra_body": {"no_stop_trim": True}}, True),
]


def backend_for(server, **kwargs) -> llm.OpenAICompatibleBackend:
    return llm.OpenAICompatibleBackend(
        server.url, "scripted", timeout_s=10.0, max_retries=0, **kwargs
    )


@pytest.mark.parametrize(("kind", "options", "kept"), SERVERS)
def test_every_server_gives_the_same_episodes(kind, options, kept):
    with server_of(kind) as server:
        trajs = agents.run_episodes(
            research_agent(backend_for(server, **options)), QUERIES, num_rollouts=2
        )
    # The server kept or stripped as its kind does (else this test would test nothing).
    stopped = [(text, stop) for text, stop in server.sent if stop is not None]
    assert len(stopped) == 8 and all(text.endswith(stop) == kept for text, stop in stopped)
    assert [(t.query_id, t.rollout_index) for t in trajs] == [
        (q.id, g) for q in QUERIES for g in range(2)
    ]
    assert_expected_episodes(trajs)
    assert all(t.error is None and t.finish_reason == "stop" for tr in trajs for t in tr.turns)
    # What the server was sent back: the assistant turns whole, closing tags included.
    second = [
        r["messages"] for r in server.requests if r["messages"][1] == QUERY_MESSAGE and r["n"] == 1
    ]
    assert len(second) == 2 and all(
        m[2:]
        == [
            {"role": "assistant", "content": FEVER_TURNS[0]},
            {"role": "user", "content": EXPECTED["fever"][2][0]},
        ]
        for m in second
    )
    assert all(r["stop"] == ["</tool_call>", "</answer>"] for r in server.requests)
    # Turn 0 of every query is one request for both rollouts; later turns one per episode.
    assert sorted(r["n"] for r in server.requests) == [1] * 6 + [2] * 3


def test_without_restoring_a_stripping_server_breaks_every_turn():
    """The issue's failure, kept as a control: OpenAI's text as returned has no closing tag."""
    with server_of("openai") as server:
        backend = backend_for(server, stop_in_output="as_returned")
        fever, zebra = agents.run_episodes(research_agent(backend), QUERIES[:2])
    assert (
        fever.turns[0].reply == f"<think>look it up</think>\n{FEVER_CALL[: -len('</tool_call>')]}"
    )
    assert fever.turns[0].error == "<tool_call> is not closed with </tool_call>."
    # 4 turns of unclosed calls and a forced one: 5 format errors, no answer.
    assert (fever.answer, fever.finish_reason, fever.format_errors) == (None, "no_answer", 5)
    assert zebra.turns[0].reply == "<answer>zebra" and zebra.answer is None


def dialogue_agent(backend) -> agents.AgentSpec:
    return agents.AgentSpec(
        "doctor", backend, system_prompt="You are a doctor.", responder=patient,
        end_phrases=("End Inquiry",), answer_after_end=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("keeps", {}),
        ("vllm", {}),
        ("vllm", {"extra_body": {"include_stop_str_in_output": True}}),
        ("sglang", {}),
    ],
)
def test_an_end_phrase_is_restored_where_the_server_names_it(kind, options):
    with server_of(kind) as server:
        (traj,) = agents.run_episodes(
            dialogue_agent(backend_for(server, **options)),
            [agents.Query("dizzy", "I feel dizzy.")],
        )
    assert [t.reply for t in traj.turns] == [
        "How long have you felt dizzy?",
        "<think>enough</think>\nEnd Inquiry",
        "<answer>vertigo</answer>",
    ]
    assert [t.forced_final for t in traj.turns] == [False, False, True]
    assert (traj.answer, traj.finish_reason, traj.format_errors) == ("vertigo", "answer", 0)
    assert all(r["stop"] == ["</tool_call>", "</answer>", "End Inquiry"] for r in server.requests)


def test_a_server_that_names_no_stop_warns_once_about_end_phrases(caplog):
    """OpenAI's reply that ends on "End Inquiry" reads like one that ends on EOS: the backend
    cannot restore it, and says so once."""
    caplog.set_level(logging.WARNING, logger="medjax.llm")
    with server_of("openai") as server:
        backend = backend_for(server)
        (traj,) = agents.run_episodes(
            dialogue_agent(backend), [agents.Query("dizzy", "I feel dizzy.")]
        )
    warnings = [r.getMessage() for r in caplog.records if r.name == "medjax.llm"]
    assert len(warnings) == 1
    assert "'End Inquiry'" in warnings[0] and "stop_reason" in warnings[0]
    assert server.url + "/chat/completions" in warnings[0]
    assert traj.turns[1].reply == "<think>enough</think>\n"  # The end phrase is lost.


def assert_expected_episodes(trajs):
    """Each trajectory's replies, tool calls, observations and answer are EXPECTED's, ended
    by its answer without a format error."""
    for traj in trajs:
        replies, calls, observations, answer = EXPECTED[traj.query_id]
        assert [t.reply for t in traj.turns] == replies
        assert [(t.tool, t.arguments) for t in traj.turns] == calls
        assert [t.observation for t in traj.turns] == observations
        assert (traj.answer, traj.finish_reason, traj.format_errors) == (answer, "answer", 0)


def test_medjax_serve_gives_the_same_episodes():
    """`medjax.llm.serve` in front of a scripted token-level policy: whatever it does with a
    matched stop string (kept before issue 39; left out and named in `stop_reason` since),
    the loop sees the same episodes."""
    questions = [q.prompt for q in QUERIES]
    corpus = [*questions, FEVER_CALL, COUGH_CALL, *FEVER_TURNS, *COUGH_TURNS, *FACTS.values()]
    tok = tokenizer_lib.train_bpe(corpus * 4, vocab_size=400)

    def policy(prompt: str) -> str:
        (first,) = [q for q in questions if q in prompt]
        return continuation(first, prompt.split(first, 1)[1])

    backend = llm.ScriptedBackend(policy, tok)
    with serving(backend, tokenizer=tok, model_name="scripted") as server:
        trajs = agents.run_episodes(research_agent(backend_for(server)), QUERIES, num_rollouts=2)
    assert_expected_episodes(trajs)
