"""The agent loop's reply parser and tool path under hostile text (issue 19): replies that
raised or took quadratic time (deep brackets, a 4,301-digit integer, a lone surrogate,
16,000 unclosed tags) are format errors the loop counts like any other, and whatever a reply
or a tool holds reaches the tokenizer and the JSONL files as text they can encode. The
research environment runs on a hand-made HPO release; the fuzz tests are derandomised."""

import json
import math
import re
import time

import hypothesis
import pytest
from hypothesis import strategies as st

from medjax import agents, llm, sampling
from medjax.agents import tools as tools_lib
from medjax.envs import research
from medjax.knowledge import graph, hpo
from medjax.models import tokenizer as tokenizer_lib

OBO = """format-version: 1.2
data-version: hp/releases/2099-01-01

[Term]
id: HP:0000001
name: All

[Term]
id: HP:0000118
name: Phenotypic abnormality
is_a: HP:0000001 ! All

[Term]
id: HP:0000005
name: Mode of inheritance
is_a: HP:0000001 ! All

[Term]
id: HP:0000007
name: Autosomal recessive inheritance
is_a: HP:0000005 ! Mode of inheritance

[Term]
id: HP:0001250
name: Seizure
is_a: HP:0000118 ! Phenotypic abnormality

[Term]
id: HP:0001263
name: Global developmental delay
is_a: HP:0000118 ! Phenotypic abnormality
"""
HPOA_HEADER = (
    "database_id\tdisease_name\tqualifier\thpo_id\treference\tevidence\tonset\tfrequency\tsex"
    "\tmodifier\taspect\tbiocuration"
)
HPOA_ROWS = [
    ("OMIM:100", "Kappa syndrome", "HP:0001250", "P"),
    ("OMIM:100", "Kappa syndrome", "HP:0001263", "P"),
    ("OMIM:100", "Kappa syndrome", "HP:0000007", "I"),
    ("OMIM:200", "Lambda disease", "HP:0001250", "P"),
]
CORPUS = [
    "Search the knowledge base for seizure and developmental delay.",
    '<think>search</think><tool_call>{"name": "search", "arguments": {"query": ["x"]}}',
    "</tool_call><tool_response>## Results for: seizure</tool_response><answer>Kappa</answer>",
] * 4
TAGS = (*tokenizer_lib.TAG_TOKENS, *tokenizer_lib.CONTROL_TOKENS)
SURROGATES = re.compile(r"[\ud800-\udfff]")
INT64 = 2**63


def write_release(folder):
    folder.mkdir(parents=True)
    (folder / "hp.obo").write_text(OBO)
    rows = [
        "\t".join([d, name, "", term, d, "TAS", "", "", "", "", aspect, "x[2099]"])
        for d, name, term, aspect in HPOA_ROWS
    ]
    (folder / "phenotype.hpoa").write_text("\n".join(["#description: test", HPOA_HEADER, *rows]))
    (folder / "genes_to_phenotype.txt").write_text(
        "ncbi_gene_id\tgene_symbol\thpo_id\thpo_name\tfrequency\tdisease_id\n"
        "7\tKAP1\tHP:0001250\tSeizure\t-\tOMIM:100\n"
    )
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("research")
    data = hpo.load(write_release(tmp / "release"), cache=tmp / "cache")
    return research.build_environment(graph.KnowledgeGraph(data), cache=str(tmp / "cache"))


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(CORPUS, vocab_size=400)


def call(name, *, ensure_ascii=True, **arguments):
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=ensure_ascii)
    return f"<tool_call>{body}</tool_call>"


def raw_call(name, arguments_text):
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments_text}}}</tool_call>'


def leaves(value):
    """Every scalar inside a parsed JSON value, dict keys included."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from leaves(v)
    else:
        yield value


def depth(value):
    if isinstance(value, dict | list):
        items = value.values() if isinstance(value, dict) else value
        return 1 + max((depth(v) for v in items), default=0)
    return 0


def assert_well_formed(parsed, tools):
    """What the loop, the tools, the tokenizer and `write_jsonl` rely on in a parsed reply."""
    for text in (parsed.think, parsed.answer, parsed.tool, parsed.error):
        assert text is None or (isinstance(text, str) and not SURROGATES.search(text))
    if parsed.error is not None:
        assert "\n" not in parsed.error and parsed.answer is None
    if parsed.answer is not None:
        assert parsed.tool is None and parsed.arguments is None
    if parsed.arguments is not None:
        assert isinstance(parsed.arguments, dict) and parsed.tool is not None
        json.dumps(parsed.arguments, ensure_ascii=False, allow_nan=False).encode("utf-8")
        # The call object around the arguments takes one level.
        assert depth(parsed.arguments) < tools_lib.MAX_JSON_DEPTH
        for leaf in leaves(parsed.arguments):
            if isinstance(leaf, int):
                assert -INT64 <= leaf < INT64
            elif isinstance(leaf, float):
                assert math.isfinite(leaf)
    if parsed.tool is not None and parsed.error is None:
        (tool,) = [t for t in tools if t.name == parsed.tool]
        assert tools_lib.validate_arguments(tool.parameters, parsed.arguments) is None


def observe(reply, tools, tok):
    """The tool path as the loop runs it: parse, run the tool, encode the observation."""
    parsed = agents.parse_reply(reply, tools)
    assert_well_formed(parsed, tools)
    if parsed.error is not None:
        observation = f"Error: {parsed.error}"
    elif parsed.tool is not None:
        (tool,) = [t for t in tools if t.name == parsed.tool]
        observation, _ = agents.run_tool(tool, parsed.arguments)
    else:
        observation = parsed.answer or parsed.think or ""
    content = f"<tool_response>\n{observation}\n</tool_response>"
    text = tokenizer_lib.apply_chat_template(tok, [{"role": "user", "content": content}])
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    return parsed, observation


# -- the review's findings, one by one --------------------------------------------------


@pytest.mark.parametrize("n", [1_000, 100_000])
def test_deep_brackets_are_a_format_error(n, env):
    for inner in ("[" * n, '{"a": ' * n, "[" * n + "]" * n):
        parsed = agents.parse_reply(f"<tool_call>{inner}</tool_call>", env.tools())
        assert parsed.error == "The tool call nests brackets deeper than 32 levels."
        assert parsed.tool is None and parsed.arguments is None


def test_nesting_limit_is_exact_and_ignores_brackets_in_strings(env):
    tools = env.tools()
    # The call object is level 1 and "arguments" level 2: 30 more lists reach 32 exactly.
    fits = raw_call("search", '{"query": ["x"], "k": ' + "[" * 30 + "1" + "]" * 30 + "}")
    parsed = agents.parse_reply(fits, tools)
    # The value is quoted cut to 60 characters: 30 "[", "1", 26 "]" and "...".
    shown = "[" * 30 + "1" + "]" * 26 + "..."
    assert parsed.error == f"search: argument 'k' must be of type integer, got {shown}."
    too_deep = raw_call("search", '{"query": ["x"], "k": ' + "[" * 31 + "1" + "]" * 31 + "}")
    assert "deeper than 32" in agents.parse_reply(too_deep, tools).error
    brackets = "[{" * 500 + '\\"' + "]}" * 100
    parsed = agents.parse_reply(call("search", query=[brackets]), tools)
    assert parsed.error is None and parsed.arguments == {"query": [brackets]}


def test_huge_integer_is_a_format_error(env):
    tools = env.tools()
    parsed = agents.parse_reply(
        raw_call("search", '{"query": ["x"], "k": ' + "1" * 4301 + "}"), tools
    )
    assert parsed.error == (
        "The tool call holds a number it may not: integer "
        + "1" * 57
        + "... (4301 characters) is not 64-bit."
    )
    assert parsed.arguments is None


@pytest.mark.parametrize(
    ("literal", "accepted"),
    [
        (str(INT64 - 1), True),
        (str(-INT64), True),
        (str(INT64), False),
        (str(-INT64 - 1), False),
        ("-" + "9" * 5000, False),
        ("2.5e300", True),
        ("1e999", False),
        ("-1e999", False),
        ("NaN", False),
        ("Infinity", False),
        ("-Infinity", False),
    ],
)
def test_numbers_must_be_64_bit_integers_or_finite(literal, accepted):
    schema = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}
    tool = agents.Tool("count", "Counts.", schema, lambda n: str(n))
    parsed = agents.parse_reply(raw_call("count", f'{{"n": {literal}}}'), [tool])
    if accepted:
        assert parsed.error is None and parsed.arguments == {"n": json.loads(literal)}
    else:
        assert parsed.error.startswith("The tool call holds a number it may not: ")
        assert parsed.arguments is None


def test_lone_surrogate_is_refused_before_the_tools(env, tok):
    with pytest.raises(TypeError):  # Why it must never reach the tokenizer.
        tok.encode("\ud800", add_special_tokens=False)
    tools = env.tools()
    for reply in (
        call("search", query=["\ud800 seizure"]),  # The escape "\\ud800", as a policy writes it.
        call("search", ensure_ascii=False, query=["\udfff"]),  # The raw code point.
        call("kg_lookup", entity="Seizure", relation="diseases", **{"\ud83d": 1}),
    ):
        parsed, observation = observe(reply, tools, tok)
        assert parsed.error == (
            "The tool call holds a lone surrogate escape (\\ud800-\\udfff), which is not text;"
            " write the character itself."
        )
        assert parsed.tool is None and parsed.arguments is None
    # A surrogate pair is one character, written as two escapes: a valid query.
    parsed, observation = observe(call("search", query=["\U0001f600 seizure"]), tools, tok)
    assert parsed.error is None and parsed.arguments == {"query": ["\U0001f600 seizure"]}
    assert observation.startswith("## Results for: \U0001f600 seizure\n1. [")


def test_free_text_and_tool_output_are_made_encodable():
    parsed = agents.parse_reply("<think>a\ud800b</think><answer>c\udc00</answer>")
    assert (parsed.think, parsed.answer, parsed.error) == ("a\ufffdb", "c\ufffd", None)
    schema = {"type": "object", "properties": {"s": {"type": "string"}}}

    def echo(s):
        if s == "raise":
            raise KeyError("bad \ud800 key")
        return {"echo": s + "\udbff"}

    tool = agents.Tool("echo", "Echoes.", schema, echo)
    assert agents.run_tool(tool, {"s": "x"}) == ('{"echo": "x\ufffd"}', None)
    message = "echo failed: KeyError: 'bad \\ud800 key'"  # KeyError's str is the repr.
    assert agents.run_tool(tool, {"s": "raise"}) == (message, message)
    text = agents.Tool("echo", "Echoes.", schema, lambda s: "\ud800" + s)
    assert agents.run_tool(text, {"s": "y"}) == ("\ufffdy", None)


def test_errors_quote_values_on_one_short_line(env):
    tools = env.tools()
    long = "x\n" * 5_000
    replies = (call(long), call("search", query=["q"], **{long: 1}), call("search", query=long))
    starts = ("Unknown tool", "search: unknown", "search: argument")
    for reply, start in zip(replies, starts, strict=True):
        error = agents.parse_reply(reply, tools).error
        assert error.startswith(start) and "\n" not in error and len(error) < 200, error


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("<tool_call>", dict(error="<tool_call> is not closed with </tool_call>.")),
        ("<answer>", dict(error=None, answer=None)),
        ("<think>", dict(error=None, think=None)),
        ("<tool_call><answer><think>", dict(error="<tool_call> is not closed with </tool_call>.")),
        ("<think><answer></tool_call>", dict(error=None, think=None, answer=None, tool=None)),
        (
            "</tool_call><tool_call>",
            dict(error="15999 tool calls in one turn; call one at a time."),
        ),
    ],
)
def test_16000_unclosed_tags_parse_in_linear_time(unit, expected):
    # The lazy regexes took 26 s for 16,000 "<tool_call>" (quadratic); a linear scan takes
    # about a millisecond, so 1 s is generous on a loaded 2-core machine.
    text = unit * 16_000
    start = time.perf_counter()
    parsed = agents.parse_reply(text)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    for field, value in expected.items():
        assert getattr(parsed, field) == value


def test_closed_tags_after_much_soup_are_found():
    soup = "<think><answer><tool_call>" * 4_000
    parsed = agents.parse_reply("<think>plan</think>" + soup + "</answer>")
    # As re.search(r"<answer>(.*?)</answer>") reads it: from the first <answer> on.
    assert parsed.think == "plan"
    assert parsed.answer == ("<tool_call>" + "<think><answer><tool_call>" * 3_999)
    start = time.perf_counter()
    parsed = agents.parse_reply(soup + '<tool_call>{"name": "x"}</tool_call>' * 2)
    assert time.perf_counter() - start < 1.0
    assert parsed.error == "2 tool calls in one turn; call one at a time."


# -- the loop: malformed replies are format errors, and the episode still trains ----------


class SurrogateTextBackend:
    """A text backend (no token ids) whose replies carry lone surrogates, as JSON over HTTP
    can (`"\\ud800"`)."""

    def __init__(self, replies):
        self.replies = replies

    def generate(self, conversations, params, *, num_samples=1):
        turn = sum(m["role"] == "assistant" for m in conversations[0])
        text = self.replies[turn]
        return [llm.Generation(text, [], None, "stop") for _ in conversations * num_samples]


def test_a_text_backend_reply_with_lone_surrogates_is_stored_encodable(env, tmp_path):
    backend = SurrogateTextBackend(
        [
            call("search", query=["\ud800 seizure"], ensure_ascii=False),
            "<think>\udfff</think><answer>A</answer>",
        ]
    )
    spec = agents.AgentSpec("a", backend, tools=env.tools(), max_turns=3)
    (traj,) = agents.run_episodes(spec, [agents.Query("q", "Which?")], num_rollouts=1)
    assert traj.format_errors == 1 and traj.answer == "A"
    assert "\ud800" not in traj.turns[0].reply and "\ufffd seizure" in traj.turns[0].reply
    assert traj.messages[-1]["content"] == "<think>\ufffd</think><answer>A</answer>"
    agents.write_jsonl(tmp_path / "t.jsonl", [traj])  # Raised UnicodeEncodeError before.
    assert agents.read_jsonl(tmp_path / "t.jsonl")[0].turns[1].reply == traj.turns[1].reply


def script(*replies):
    return lambda prompt: replies[prompt.count("<|im_start|>assistant") - 1]


def test_the_loop_counts_hostile_calls_as_format_errors(env, tok, tmp_path):
    echo = agents.Tool(
        "echo", "Echoes.", {"type": "object", "properties": {"s": {"type": "string"}}},
        lambda s: f"{s}\ud800",
    )  # fmt: skip
    replies = (
        "<tool_call>" + "[" * 1_000 + "</tool_call>",
        raw_call("search", '{"query": ["x"], "k": ' + "1" * 4301 + "}"),
        call("search", query=["\ud800 seizure"]),
        raw_call("search", '{"query": ["x"], "k": NaN}'),
        call("search", query=["seizure"]),
        call("echo", s="hi"),
        "<tool_call>" * 16_000,
        "<answer>Kappa syndrome</answer>",
    )
    agent = agents.AgentSpec(
        "researcher", llm.ScriptedBackend(script(*replies), tok), tools=[*env.tools(), echo],
        max_turns=len(replies), sampling=sampling.SamplingParams(max_new_tokens=20_000),
    )  # fmt: skip
    (traj,) = agents.run_episodes(agent, [agents.Query("q0", "Which disease?")])
    assert traj.finish_reason == "answer" and traj.answer == "Kappa syndrome"
    errors = [t.error for t in traj.turns]
    assert [e is not None for e in errors] == [True] * 4 + [False, False, True, False]
    assert traj.format_errors == 5
    assert "deeper than 32" in errors[0] and "4301 characters" in errors[1]
    assert "surrogate" in errors[2] and "NaN is not a JSON number" in errors[3]
    assert [t.tool for t in traj.turns] == [None] * 4 + ["search", "echo", None, None]
    assert [t.finish_reason for t in traj.turns] == ["stop"] * 8  # Whole replies, none cut.
    assert traj.turns[4].observation.startswith("<tool_response>\n## Results for: seizure\n")
    assert traj.turns[5].observation == "<tool_response>\nhi\ufffd\n</tool_response>"
    # The ids are the chat as rendered: nothing was lost or re-encoded differently.
    rendered = tokenizer_lib.apply_chat_template(tok, traj.messages, add_generation_prompt=False)
    decoded = tok.decode(traj.token_ids, skip_special_tokens=False)
    assert rendered.startswith(decoded) and rendered[len(decoded) :] == "<|im_end|>\n"
    agents.write_jsonl(tmp_path / "t.jsonl", [traj])
    assert agents.read_jsonl(tmp_path / "t.jsonl") == [traj]


# -- fuzzing ------------------------------------------------------------------------------

# Any code point, lone surrogates included (hypothesis leaves them out of text by default).
ANY_CHAR = st.one_of(st.characters(), st.characters(categories=["Cs"]))
JSON_BITS = (
    "{", "}", "[", "]", '"', "\\", ":", ",", "null", "true", '"name"', '"arguments"',
    '"search"', '"read"', '"kg_lookup"', '"query"', '"k"', '"doc_id"', "NaN", "-Infinity",
    "1e999", "9" * 4301, "\\ud800", "\\udfff", "\\ud83d\\ude00", "[" * 40, '{"a": ' * 40,
)  # fmt: skip
SOUP = st.lists(
    st.one_of(st.sampled_from(TAGS + JSON_BITS), st.text(ANY_CHAR, max_size=6)), max_size=40
).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats()
    | st.text(ANY_CHAR, max_size=20),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
ENV_STRINGS = (
    "OMIM:100", "[OMIM:100]", "HP:0001250", "Seizure", "kappa syndrome", "NCBIGene:7",
    "phenotypes", "diseases", "genes", "parents", "children", "seizure delay", " ", "",
)  # fmt: skip
VALUE_TEXTS = st.one_of(
    JSON_VALUES.map(json.dumps),
    JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False)),
    st.sampled_from(ENV_STRINGS).map(json.dumps),
    st.lists(st.sampled_from(ENV_STRINGS) | st.text(ANY_CHAR, max_size=12), max_size=12).map(
        json.dumps
    ),
    st.integers(-30, 30).map(str),
    st.integers(1, 6_000).map(lambda n: "9" * n),
    st.integers(0, 2_000).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "1.5"]),
)
CALLS = st.builds(
    lambda name, pairs, close: (
        f'<tool_call>{{"name": {json.dumps(name)}, "arguments": {{'
        + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs)
        + "}}"
        + ("</tool_call>" if close else "")
    ),
    st.sampled_from(["search", "read", "kg_lookup", "lookup"]),
    st.lists(
        st.tuples(
            st.sampled_from(["query", "k", "doc_id", "goal", "entity", "relation", "x"]),
            VALUE_TEXTS,
        ),
        max_size=3,
    ),
    st.booleans(),
)
REPLIES = st.one_of(
    st.text(ANY_CHAR, max_size=200), SOUP, CALLS, st.tuples(SOUP, CALLS).map("".join)
)
FUZZ = hypothesis.settings(
    max_examples=120, deadline=None, derandomize=True, database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)  # fmt: skip


def regex_reading(text):
    """The reply as the original lazy regexes read it (short texts only: quadratic)."""
    think = re.search(r"<think>(.*?)</think>", text, re.S)
    answer = re.search(r"<answer>(.*?)</answer>", text, re.S)
    calls = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S)
    clean = lambda m: SURROGATES.sub("\ufffd", m.group(1).strip()) if m else None  # noqa: E731
    return clean(think), clean(answer), calls


@FUZZ
@hypothesis.given(REPLIES)
def test_fuzz_parse_reply(env, reply):
    tools = env.tools()
    parsed = agents.parse_reply(reply, tools)
    assert_well_formed(parsed, tools)
    think, answer, calls = regex_reading(reply)
    assert parsed.think == think
    if len(calls) > 1:
        assert parsed.error == f"{len(calls)} tool calls in one turn; call one at a time."
    elif answer is not None and not calls:
        assert parsed.answer == answer and parsed.error is None
    elif not calls and answer is None:
        unclosed = "<tool_call>" in reply
        assert parsed.error == (
            "<tool_call> is not closed with </tool_call>." if unclosed else None
        )


@FUZZ
@hypothesis.given(REPLIES)
def test_fuzz_tool_path_reaches_the_tokenizer(env, tok, reply):
    observe(reply, env.tools(), tok)
