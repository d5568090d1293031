"""medjax.agents: the turn format, tools, budgets, the main/sub-agent hierarchy, loss masks
checked by hand, JSONL round trips, and trajectories that hold exactly the sampled ids."""

import json
import logging
import logging.handlers
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import agents, llm, models, sampling
from medjax.models import tokenizer as tokenizer_lib

CORPUS = [
    "You are a careful doctor. Look things up before you answer.",
    "What causes fever? The patient reports a headache and fever for three days.",
    '<think>look it up</think><tool_call>{"name": "lookup", "arguments": {"term": "fever"}}',
    "</tool_call><tool_response>fever: raised body temperature</tool_response>",
    "<answer>influenza</answer> End Inquiry. Do you have a cough? Yes, since Monday.",
] * 8

LOOKUP_SCHEMA = {
    "type": "object",
    "properties": {"term": {"type": "string"}},
    "required": ["term"],
}


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(CORPUS, vocab_size=400)


def lookup_tool(log=None):
    def lookup(term):
        if log is not None:
            log.append(term)
        if term == "boom":
            raise KeyError("no entry")
        return f"{term}: raised body temperature"

    return agents.Tool("lookup", "Looks a term up.", LOOKUP_SCHEMA, lookup)


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a</think>" + call("lookup", term="x"), dict(tool="lookup", error=None)),
        ("<answer> flu </answer>", dict(answer="flu", error=None)),
        ("Do you have a cough?", dict(tool=None, answer=None, error=None)),
        ("<tool_call>{name: lookup}</tool_call>", dict(error="not valid JSON")),
        ('<tool_call>["lookup"]</tool_call>', dict(error="must be a JSON object")),
        (call("search", term="x"), dict(tool="search", error="Unknown tool 'search'")),
        (call("lookup"), dict(error="missing required argument(s) 'term'")),
        (call("lookup", term=3), dict(error="argument 'term' must be of type string")),
        (call("lookup", term="x", page=2), dict(error="unknown argument(s) 'page'")),
        (call("lookup", term="x") + call("lookup", term="y"), dict(error="2 tool calls")),
        (call("lookup", term="x") + "<answer>a</answer>", dict(error="not both")),
        ('<tool_call>{"name": "lookup"', dict(error="not closed")),
        ('<tool_call>{"name": "lookup", "arguments": 1}</tool_call>', dict(error="JSON object")),
    ],
)
def test_parse_reply(text, expected):
    parsed = agents.parse_reply(text, [lookup_tool()])
    for field, value in expected.items():
        got = getattr(parsed, field)
        if field == "error" and value is not None:
            assert value in got, got
        else:
            assert got == value
    if parsed.tool == "lookup" and parsed.error is None:
        assert parsed.arguments == {"term": "x"} and parsed.think == "a"


def test_tool_exceptions_become_observations():
    output, error = agents.run_tool(lookup_tool(), {"term": "boom"})
    assert output == error == "lookup failed: KeyError: 'no entry'"
    tool = agents.Tool("obj", "", {"type": "object"}, lambda: {"a": [1, 2]})
    assert agents.run_tool(tool, {}) == ('{"a": [1, 2]}', None)


def test_render_tools_lists_every_schema():
    text = agents.render_tools([lookup_tool()])
    assert json.dumps(lookup_tool().spec()) in text and "<tool_call>" in text


# -- the loop with scripted policies ------------------------------------------------------


def script(*replies):
    """A policy that gives its k-th reply on its k-th turn (counted from the prompt)."""
    return lambda prompt: replies[prompt.count("<|im_start|>assistant") - 1]


def test_loss_mask_by_hand(tok):
    reply1 = "<think>look it up</think>" + call("lookup", term="fever")
    reply2 = "<answer>influenza</answer>"
    calls = []
    agent = agents.AgentSpec(
        "doctor", llm.ScriptedBackend(script(reply1, reply2), tok),
        system_prompt="You are a careful doctor.", tools=[lookup_tool(calls)],
    )  # fmt: skip
    (traj,) = agents.run_episodes(agent, [agents.Query("q0", "What causes fever?")])
    assert calls == ["fever"]
    assert traj.answer == "influenza" and traj.finish_reason == "answer"
    assert [t.tool for t in traj.turns] == ["lookup", None] and traj.format_errors == 0
    # The whole episode as text, segment by segment: (text, written by the policy).
    system = "You are a careful doctor.\n\n" + agents.render_tools(agent.tools)
    segments = [
        (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat causes fever?"
         "<|im_end|>\n<|im_start|>assistant\n", False),
        (reply1, True),  # Cut after </tool_call>: no EOS was sampled.
        ("<|im_end|>\n<|im_start|>user\n<tool_response>\nfever: raised body temperature\n"
         "</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        (reply2, True),
    ]  # fmt: skip
    ids, mask = [], []
    for text, own in segments:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [int(own)] * len(piece)
    assert traj.token_ids == ids
    assert traj.loss_mask == mask
    assert traj.logps == [0.0] * len(ids)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == reply1 + reply2


def test_malformed_calls_are_observations_and_counted(tok):
    replies = (
        "<tool_call>{oops}</tool_call>",
        call("search", term="x"),
        call("lookup", term="boom"),
        call("lookup", term="fever"),
        "I think it is the flu.",
        "<answer>influenza</answer>",
    )
    agent = agents.AgentSpec(
        "doctor", llm.ScriptedBackend(script(*replies), tok), tools=[lookup_tool()], max_turns=10
    )
    (traj,) = agents.run_episodes(agent, [agents.Query("q0", "What causes fever?")])
    assert traj.answer == "influenza" and traj.format_errors == 4
    errors = [t.error for t in traj.turns]
    assert errors[0].startswith("The tool call is not valid JSON")
    assert errors[1].startswith("Unknown tool 'search'")
    assert errors[2] == "lookup failed: KeyError: 'no entry'"
    assert errors[3] is None and errors[4] == agents.loop.NO_ACTION_ERROR and errors[5] is None
    assert traj.turns[0].observation.startswith("<tool_response>\nError: The tool call")
    assert traj.turns[3].observation == (
        "<tool_response>\nfever: raised body temperature\n</tool_response>"
    )


def test_turn_budget_forces_a_final_answer(tok):
    def policy(prompt):
        if agents.EARLY_STOP_PROMPT in prompt:
            return "<answer>influenza</answer>"
        return call("lookup", term="fever")

    backend = llm.ScriptedBackend(policy, tok)
    agent = agents.AgentSpec("doctor", backend, tools=[lookup_tool()], max_turns=2)
    (traj,) = agents.run_episodes(agent, [agents.Query("q0", "What causes fever?")])
    assert [t.forced_final for t in traj.turns] == [False, False, True]
    assert traj.turns[1].observation.endswith(agents.EARLY_STOP_PROMPT)
    assert traj.answer == "influenza" and traj.finish_reason == "answer"
    # A policy that ignores the early-stop prompt ends without an answer, tools unused.
    stubborn = agents.AgentSpec(
        "doctor", llm.ScriptedBackend(lambda p: call("lookup", term="x"), tok),
        tools=[lookup_tool()], max_turns=2,
    )  # fmt: skip
    (traj,) = agents.run_episodes(stubborn, [agents.Query("q0", "What causes fever?")])
    assert len(traj.turns) == 3 and traj.finish_reason == "no_answer" and traj.answer is None
    assert traj.turns[2].tool == "lookup" and traj.turns[2].error.startswith("Unknown tool")
    assert traj.format_errors == 1  # Calling a tool after the early-stop prompt.


def test_each_turn_logs_its_progress(tok):
    """Three queries: the Zebra one is answered at once, the others after one lookup. The
    seconds count from the start of the batch, however long its tools took (the replies take
    0.5 s each, 1.5 s in turn 1)."""

    def policy(prompt):
        time.sleep(0.5)
        if "Zebra" in prompt or "raised body temperature" in prompt:
            return "<answer>influenza</answer>"
        return call("lookup", term="fever")

    agent = agents.AgentSpec("doctor", llm.ScriptedBackend(policy, tok), tools=[lookup_tool()])
    queries = [
        agents.Query(f"q{i}", f"The {n} question?") for i, n in enumerate(("Zebra", "b", "c"))
    ]
    # Its own handler: run_train.py's (a test that runs main() here) stops propagation.
    handler = logging.handlers.BufferingHandler(100)
    log = logging.getLogger("medjax.agents")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        agents.run_episodes(agent, queries)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    lines = [r.getMessage() for r in handler.buffer]
    assert [line.rsplit(",", 1)[0] for line in lines] == [
        "doctor turn 1: 1/3 episodes finished",
        "doctor turn 2: 3/3 episodes finished",
    ]
    assert all(re.fullmatch(r".*, \d+ s", line) for line in lines), lines
    seconds = [int(line.rsplit(", ", 1)[1].removesuffix(" s")) for line in lines]
    assert seconds[0] >= 1 and seconds[1] >= 2, lines  # Not reset by a tool call.


def test_context_budget(tok):
    policy = lambda prompt: call("lookup", term="fever")  # noqa: E731
    spec = dict(name="doctor", backend=llm.ScriptedBackend(policy, tok), tools=[lookup_tool()])
    query = agents.Query("q0", "What causes fever?")
    (short,) = agents.run_episodes(agents.AgentSpec(**spec, max_context_tokens=50), [query])
    assert short.finish_reason == "context" and short.turns == []  # The prompt alone is longer.
    prompt_length = len(short.token_ids)
    for extra in (150, 200, 300):  # The reserve is 20 + 16 + the early-stop prompt (77).
        limit = prompt_length + extra
        agent = agents.AgentSpec(
            **spec, max_turns=50, max_context_tokens=limit, final_turn_tokens=20
        )
        (traj,) = agents.run_episodes(agent, [query])
        assert len(traj.token_ids) <= limit
        # The budget ends in the forced final turn, within its own budget, never mid-way.
        assert traj.finish_reason == "no_answer" and 1 < len(traj.turns) < 50
        assert traj.turns[-1].forced_final and 0 < traj.turns[-1].num_tokens <= 20
        assert traj.turns[-2].observation.endswith(agents.EARLY_STOP_PROMPT)


def test_dialogue_responder_and_end_phrase(tok):
    replies = ("Do you have a cough?", "<think>enough</think>End Inquiry")
    patient_saw = []

    def patient(trajectories):
        patient_saw.extend(t.messages[-1]["content"] for t in trajectories)
        return ["Yes, since Monday." for _ in trajectories]

    agent = agents.AgentSpec(
        "doctor", llm.ScriptedBackend(script(*replies), tok), responder=patient,
        end_phrases=("End Inquiry",),
    )  # fmt: skip
    (traj,) = agents.run_episodes(agent, [agents.Query("c1", "I have a fever.")])
    assert traj.finish_reason == "end_phrase" and traj.format_errors == 0
    assert patient_saw == ["Do you have a cough?"]
    assert traj.messages[-2] == {"role": "user", "content": "Yes, since Monday."}
    # The patient's words are in the ids but never in the loss.
    patient_ids = tok.encode("Yes, since Monday.", add_special_tokens=False)
    n = len(patient_ids)
    starts = [i for i in range(len(traj.token_ids)) if traj.token_ids[i : i + n] == patient_ids]
    assert len(starts) == 1 and not any(traj.loss_mask[starts[0] : starts[0] + n])


def test_rollouts_share_the_first_prompt(tok):
    backend = llm.ScriptedBackend(script("<answer>a</answer>"), tok)
    agent = agents.AgentSpec("doctor", backend)
    queries = [agents.Query("q0", "What causes fever?"), agents.Query("q1", "Cough?")]
    trajs = agents.run_episodes(agent, queries, num_rollouts=3)
    assert backend.calls == 1 and len(backend.prompts) == 2  # One call, G=3 per prompt.
    assert [(t.query_id, t.rollout_index) for t in trajs] == [
        ("q0", 0), ("q0", 1), ("q0", 2), ("q1", 0), ("q1", 1), ("q1", 2),
    ]  # fmt: skip


def test_hierarchy_links_and_batching(tok):
    def sub_policy(prompt):
        if "user\n<tool_response>" not in prompt:
            return call("lookup", term="fever")
        return "<answer>found " + re.search(r"user\n(\w+)", prompt).group(1) + "</answer>"

    sub_backend = llm.ScriptedBackend(sub_policy, tok)
    sub = agents.AgentSpec("searcher", sub_backend, tools=[lookup_tool()])

    def main_policy(prompt):
        done = prompt.count("user\n<tool_response>")
        if done < 2:
            return call("delegate", task=["alpha", "beta"][done], context="fever")
        return "<answer>" + "+".join(re.findall(r"found (\w+)", prompt)) + "</answer>"

    main = agents.AgentSpec(
        "main", llm.ScriptedBackend(main_policy, tok), tools=[agents.delegate_tool(sub)]
    )
    mains = agents.run_episodes(
        main, [agents.Query("q0", "What causes fever?"), agents.Query("q1", "Cough?")],
        num_rollouts=2,
    )  # fmt: skip
    assert [m.answer for m in mains] == ["alpha+beta"] * 4
    for k, m in enumerate(mains):
        assert [(s.query_id, s.rollout_index, s.invocation_index) for s in m.sub_trajectories] == [
            (m.query_id, k % 2, 0),
            (m.query_id, k % 2, 1),
        ]
        assert all(
            s.agent == "searcher" and s.finish_reason == "answer" for s in m.sub_trajectories
        )
        assert m.sub_trajectories[0].messages[1]["content"] == "alpha\n\nContext: fever"
    # Two delegate turns x two sub-agent turns, each batched over the 4 live episodes.
    assert sub_backend.calls == 4 and len(sub_backend.prompts) == 16
    subs, rollout_index = agents.sub_trajectories(mains)
    assert len(subs) == 8 and rollout_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_summariser_replaces_the_sub_answer(tok):
    sub = agents.AgentSpec("searcher", llm.ScriptedBackend(script("<answer>raw</answer>"), tok))
    summariser = llm.ScriptedBackend(
        lambda p: "summary of " + re.search(r"Sub-agent: <answer>(\w+)", p).group(1), tok
    )
    main = agents.AgentSpec(
        "main",
        llm.ScriptedBackend(script(call("delegate", task="t"), "<answer>ok</answer>"), tok),
        tools=[agents.delegate_tool(sub, summariser=summariser)],
    )
    (m,) = agents.run_episodes(main, [agents.Query("q0", "x")])
    assert m.turns[0].observation == "<tool_response>\nsummary of raw\n</tool_response>"
    assert m.sub_trajectories[0].answer == "raw"


# -- a real policy: exact ids, log-probs and JSONL -------------------------------------


class Recording:
    """Wraps a TokenBackend and keeps every prompt and generation."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.log = inner, inner.tokenizer, []

    def generate(self, conversations, params, *, num_samples=1):
        raise AssertionError("token backends get ids")

    def generate_ids(self, prompts, params, *, num_samples=1, max_new_tokens=None):
        gens = self.inner.generate_ids(
            prompts, params, num_samples=num_samples, max_new_tokens=max_new_tokens
        )
        for row, gen in enumerate(gens):
            self.log.append((list(prompts[row // num_samples]), gen))
        return gens


@pytest.fixture(scope="module")
def policy_run(tok):
    config = models.ModelConfig(
        family="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=48,
        num_layers=2, num_heads=4, num_kv_heads=2, qkv_bias=True,
    )  # fmt: skip
    model = models.DecoderLM(config, rngs=nnx.Rngs(0))
    backend = Recording(llm.JaxPolicyBackend(model, tok, seed=3))
    params = sampling.SamplingParams(max_new_tokens=12, temperature=0.8)
    agent = agents.AgentSpec(
        "doctor", backend, tools=[lookup_tool()], sampling=params, max_turns=2,
        final_turn_tokens=12,
    )  # fmt: skip
    trajs = agents.run_episodes(agent, [agents.Query("q0", "What causes fever?")], num_rollouts=2)
    return model, backend, trajs


def test_trajectories_hold_exactly_the_sampled_ids(policy_run):
    _, backend, trajs = policy_run
    assert all(len(t.turns) == 3 for t in trajs)  # Random replies: errors, then forced final.
    for k, traj in enumerate(trajs):
        mine = backend.log[k :: len(trajs)]  # Rows of each call are in trajectory order.
        own = [i for i, m in enumerate(traj.loss_mask) if m]
        assert sum(len(g.token_ids) for _, g in mine) == len(own)
        for prompt, gen in mine:
            # Every turn's prompt is a prefix of the trajectory, and its reply follows it.
            n, m = len(prompt), len(gen.token_ids)
            assert traj.token_ids[:n] == prompt
            assert traj.token_ids[n : n + m] == gen.token_ids
            assert traj.loss_mask[n : n + m] == [1] * m
            assert traj.logps[n : n + m] == gen.logps
        batch = agents.training_batch([traj])
        assert batch["input_ids"][0].tolist() == traj.token_ids


def test_trajectory_logps_equal_scoring_the_ids(policy_run):
    model, _, trajs = policy_run
    batch = agents.training_batch(trajs, pad_id=0)
    logits = jax.jit(lambda m, x, a: m(x, attention_mask=a))(
        model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    )
    logp = jax.nn.log_softmax(logits[:, :-1] / 0.8, axis=-1)
    scored = jnp.take_along_axis(logp, jnp.asarray(batch["input_ids"])[:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:].astype(bool)
    np.testing.assert_allclose(np.asarray(scored)[mask], batch["old_logps"][:, 1:][mask], atol=1e-5)


def test_jsonl_round_trip(policy_run, tok, tmp_path):
    _, _, trajs = policy_run
    sub = agents.AgentSpec("searcher", llm.ScriptedBackend(script("<answer>raw</answer>"), tok))
    main = agents.AgentSpec(
        "main",
        llm.ScriptedBackend(script(call("delegate", task="t"), "<answer>ok</answer>"), tok),
        tools=[agents.delegate_tool(sub)],
    )
    nested = agents.run_episodes(main, [agents.Query("q0", "x", {"truth": ["ok", 1.5]})])
    path = tmp_path / "rollouts.jsonl"
    agents.write_jsonl(path, trajs + nested)
    back = agents.read_jsonl(path)
    assert back == trajs + nested
    assert back[-1].sub_trajectories[0].invocation_index == 0
    assert back[0].logps == trajs[0].logps  # Floats bit for bit.
    path.write_text(path.read_text() + '{"query_id": "q", "bogus": 1}\n')
    with pytest.raises(ValueError, match=r"rollouts.jsonl:4: .*bogus"):
        agents.read_jsonl(path)


def test_bad_specs_and_drifting_templates_raise_clearly(tok):
    backend = llm.ScriptedBackend(script("<answer>a</answer>"), tok)
    with pytest.raises(ValueError, match="'doctor': tool names repeat"):
        agents.AgentSpec("doctor", backend, tools=[lookup_tool(), lookup_tool()])
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        agents.AgentSpec("doctor", backend, max_turns=0)
    agent = agents.AgentSpec("doctor", backend)
    with pytest.raises(ValueError, match="num_rollouts must be >= 1"):
        agents.run_episodes(agent, [agents.Query("q0", "x")], num_rollouts=0)
    with pytest.raises(ValueError, match="query ids repeat"):
        agents.run_episodes(
            agent, [agents.Query("q0", "x"), agents.Query("q0", "y")], num_rollouts=2
        )
    # A template that drops past reasoning (as Qwen3's does) cannot give exact token ids.
    drifting = tokenizer_lib.train_bpe(CORPUS, vocab_size=400)
    drifting.chat_template = tokenizer_lib.CHAT_TEMPLATE.replace(
        "message['content']", "message['content'].split('</think>')[-1]"
    )
    replies = ("<think>hmm</think>" + call("lookup", term="fever"), "<answer>a</answer>")
    agent = agents.AgentSpec(
        "doctor", llm.ScriptedBackend(script(*replies), drifting), tools=[lookup_tool()]
    )
    with pytest.raises(agents.TemplateDriftError, match="'doctor', query 'q0'"):
        agents.run_episodes(agent, [agents.Query("q0", "What causes fever?")])


def test_end_phrase_then_the_answer(tok):
    def doctor(prompt):
        if agents.EARLY_STOP_PROMPT in prompt:
            return "<answer>influenza</answer>"
        return "End Inquiry" if "Monday" in prompt else "Do you have a cough?"

    agent = agents.AgentSpec(
        "doctor", llm.ScriptedBackend(doctor, tok),
        responder=lambda ts: ["Yes, since Monday."] * len(ts),
        end_phrases=("End Inquiry",), answer_after_end=True,
    )  # fmt: skip
    (traj,) = agents.run_episodes(agent, [agents.Query("c1", "I have a fever.")])
    assert traj.finish_reason == "answer" and traj.answer == "influenza"
    assert [t.forced_final for t in traj.turns] == [False, False, True]
    assert traj.turns[1].observation == agents.EARLY_STOP_PROMPT and traj.format_errors == 0
