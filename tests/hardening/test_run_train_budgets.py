"""run_train's checks that need the run's tokenizer and data (issue 39), before anything is
written: a chat template that does not render, an RL context budget that cannot hold the
prompt, an SFT max_length that cuts every assistant token away; and, where a step still has
no token to train, the loops stop in one line instead of training on nothing.

Expected numbers come from the tiny KG-QA data, tokenised here with the tokenizer itself
(prompt lengths, first assistant tokens), and the context threshold is checked against the
agent loop's own behaviour (one new token at the least budget, none below it).
"""

import dataclasses
import types

import pytest

from medjax.agents import loop as loop_lib
from medjax.envs import research
from medjax.llm.scripted import ScriptedBackend
from medjax.models import tokenizer as tokenizer_lib
from medjax.training import data as data_lib
from medjax.training import rl, validate
from medjax.training.stages import RLStage, SFTStage
from tests.hardening.test_run_train import argv, fails, fresh_gin, tiny_policy  # noqa: F401


@pytest.fixture(scope="module")
def tiny(run_train_env):
    """gin/testing/base.gin's task on the tiny KG-QA data and its trained tokenizer."""
    task = rl.ResearchTask(
        dataset="med_kg_qa/tiny", data_dir=run_train_env["data_dir"], num_eval_questions=2,
        max_turns=2, sub_turns=1, max_new_tokens=8, final_turn_tokens=8,
        max_context_tokens=1536, max_observation_chars=100,
    )  # fmt: skip
    env = task.environment()
    data = task.load(env)
    texts = (m["content"] for c in data.chats for m in c["messages"])
    return types.SimpleNamespace(
        task=task, env=env, data=data, tok=tokenizer_lib.train_bpe(texts, 1024)
    )


def _answering(tok):
    return ScriptedBackend(lambda prompt: "<answer>x</answer>", tok)


def _prompt_lengths(tiny, records, agent):
    """Tokens of each record's first prompt: system prompt and tools, question, generation
    prompt, rendered and tokenised here."""
    system = {"role": "system", "content": loop_lib.system_prompt(agent)}
    return [
        len(tokenizer_lib.apply_chat_template(
            tiny.tok, [system, {"role": "user", "content": q.prompt}], tokenize=True
        ))
        for q in research.queries(records)
    ]  # fmt: skip


def _refusal(check, *args) -> str:
    with pytest.raises(validate.SettingError) as info:
        check(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------
# Chat templates.

GOOD_FRAMING = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
BAD_TEMPLATES = [
    # Unclosed expression: jinja2 cannot parse it.
    ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError: unexpected '}'"),
    # A filter jinja2 does not have: found when the template compiles.
    ("{{ messages[0]['content'] | shout }}", "No filter named 'shout'"),
    # A method strings do not have: an error only when it renders.
    ("{% for m in messages %}{{ m['content'].shout() }}{% endfor %}", "has no attribute 'shout'"),
    # Templates that refuse a system prompt (Gemma-like); medjax always sends one.
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
     "{% endif %}", "System role not supported"),
]  # fmt: skip


@pytest.mark.parametrize("template,why", BAD_TEMPLATES)
def test_a_template_that_does_not_render_is_named_with_its_file(tiny, template, why):
    tok = tokenizer_lib.train_bpe(["the patient has a fever"] * 20, validate.MIN_VOCAB_SIZE)
    tok.chat_template = template
    message = _refusal(validate.chat_template, tok, "init_from /m/chat_template.jinja")
    assert message.startswith(
        "init_from /m/chat_template.jinja: tokenizer.chat_template does not render a"
        " conversation of a system prompt, a question, a tool call, its response and an answer:"
    ), message
    assert why in message, message


def test_a_template_that_drops_a_message_or_is_missing_is_refused():
    tok = tokenizer_lib.train_bpe(["the patient has a fever"] * 20, validate.MIN_VOCAB_SIZE)
    validate.chat_template(tok, "x")  # medjax's ChatML renders every message.
    tok.chat_template = GOOD_FRAMING
    validate.chat_template(tok, "x")
    tok.chat_template = GOOD_FRAMING.replace(
        "{%- for m in messages %}", "{%- for m in messages[1:] %}"
    )
    assert _refusal(validate.chat_template, tok, "init_from /m.gguf") == (
        "init_from /m.gguf: tokenizer.chat_template leaves message 0 (system: 'You are a careful"
        " medical researcher.') out of the text it renders; the policy would never see it."
    )
    tok.chat_template = None
    assert "init_from /m.gguf: tokenizer.chat_template does not render" in _refusal(
        validate.chat_template, tok, "init_from /m.gguf"
    )


def test_the_template_source_names_the_file_that_holds_it(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")
    assert validate.tokenizer_source("/r", str(folder), None) == (
        f"init_from {folder}/tokenizer_config.json"
    )
    (folder / "chat_template.jinja").write_text("")  # transformers 5 reads this one first.
    assert validate.tokenizer_source("/r", str(folder), None) == (
        f"init_from {folder}/chat_template.jinja"
    )
    assert validate.tokenizer_source("/r", "/w/m.gguf", None) == "init_from /w/m.gguf"
    assert validate.tokenizer_source("/r", "/w/m.gguf", "chatml") == (
        "train: chat_template 'chatml'"
    )
    assert validate.tokenizer_source(str(tmp_path), None, None) == (
        "the trained tokenizer (medjax's ChatML)"
    )


def test_run_train_names_a_broken_template_before_writing(run_train_env, tmp_path):
    folder = tmp_path / "policy"
    tiny_policy(folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    run_dir = tmp_path / "run"
    message = fails(
        argv("sft", run_dir, f"train_lib.train.init_from='{folder}'",
             data_dir=run_train_env["data_dir"])
    )  # fmt: skip
    assert message.startswith(
        f"run_train: error: init_from {folder}/chat_template.jinja: tokenizer.chat_template"
        " does not render"
    ), message
    assert "TemplateSyntaxError" in message
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------
# RL context budgets.


def _rl_refusal_head(limit, count, total, what):
    return (
        f"rl.ResearchTask.max_context_tokens {limit} leaves no room for the first turn of"
        f" {count} of {total} {what}"
    )


@pytest.mark.parametrize("limit", [64, 300])
def test_a_context_budget_shorter_than_the_prompt_is_refused(tiny, limit):
    task = dataclasses.replace(tiny.task, max_context_tokens=limit)
    lengths = _prompt_lengths(tiny, tiny.data.records, task.agent(tiny.env, _answering(tiny.tok)))
    assert min(lengths) > 300  # Every prompt of the tiny set is longer than both budgets.
    message = _refusal(
        validate.episode_budgets, task, tiny.env, tiny.tok, tiny.data, [RLStage()], False
    )
    n = len(tiny.data.records)
    assert message.startswith(_rl_refusal_head(limit, n, n, "training questions")), message
    assert f": the longest prompt is {max(lengths)} tokens," in message, message


def test_the_least_context_budget_named_is_exact(tiny):
    """The budget the refusal names gives the longest prompt's first turn exactly one new
    token in the agent loop; one less gives it none."""
    records = tiny.data.records
    lengths = _prompt_lengths(tiny, records, tiny.task.agent(tiny.env, _answering(tiny.tok)))
    longest = records[lengths.index(max(lengths))]
    task = dataclasses.replace(tiny.task, max_context_tokens=max(lengths))
    message = _refusal(
        validate.episode_budgets, task, tiny.env, tiny.tok, tiny.data, [RLStage()], False
    )
    least = int(message.rpartition("set it to at least ")[2].rstrip("."))
    for budget, turns in ((least, 1), (least - 1, 0)):
        at = dataclasses.replace(tiny.task, max_context_tokens=budget)
        (traj,) = at.rollout(tiny.env, _answering(tiny.tok), [longest], num_generations=1)
        assert len(traj.turns) >= turns and (turns or traj.finish_reason == "context")
        if turns:
            assert traj.turns[0].num_tokens == 1, traj.turns[0]
        else:
            assert traj.turns == []
    # The least budget passes the check; one less does not.
    at_least = dataclasses.replace(tiny.task, max_context_tokens=least)
    validate.episode_budgets(at_least, tiny.env, tiny.tok, tiny.data, [RLStage()], False)
    below = dataclasses.replace(tiny.task, max_context_tokens=least - 1)
    assert _rl_refusal_head(least - 1, 1, len(records), "training questions") in _refusal(
        validate.episode_budgets, below, tiny.env, tiny.tok, tiny.data, [RLStage()], False
    )


def test_held_out_questions_are_checked_only_when_evaluated(tiny):
    task = dataclasses.replace(tiny.task, max_context_tokens=300)
    sft_only = [SFTStage(max_length=2048)]
    validate.episode_budgets(task, tiny.env, tiny.tok, tiny.data, sft_only, False)
    message = _refusal(
        validate.episode_budgets, task, tiny.env, tiny.tok, tiny.data, sft_only, True
    )
    assert message.startswith(_rl_refusal_head(300, 2, 2, "held-out questions")), message


def test_m_grpo_main_agent_prompt_with_its_delegate_tool_is_checked(tiny):
    researcher = tiny.task.agent(tiny.env, _answering(tiny.tok))
    main = tiny.task.agent(
        tiny.env, _answering(tiny.tok), hierarchical=True, sub_backend=_answering(tiny.tok)
    )
    plain = _prompt_lengths(tiny, tiny.data.records, researcher)
    delegating = _prompt_lengths(tiny, tiny.data.records, main)
    # The main agent has one tool (delegate) where the researcher has three: a budget
    # between the two holds M-GRPO's prompts and not GRPO's.
    assert max(delegating) + 100 < min(plain), (max(delegating), min(plain))
    stages = {"grpo": [RLStage()], "mgrpo": [RLStage(algorithm="mgrpo")]}
    task = dataclasses.replace(tiny.task, max_context_tokens=max(delegating) + 100)
    validate.episode_budgets(task, tiny.env, tiny.tok, tiny.data, stages["mgrpo"], False)
    message = _refusal(
        validate.episode_budgets, task, tiny.env, tiny.tok, tiny.data, stages["grpo"], False
    )
    assert f": the longest prompt is {max(plain)} tokens," in message, message
    task = dataclasses.replace(tiny.task, max_context_tokens=max(delegating))
    message = _refusal(
        validate.episode_budgets, task, tiny.env, tiny.tok, tiny.data, stages["mgrpo"], False
    )
    assert "training questions (M-GRPO's main agent)" in message, message
    assert f": the longest prompt is {max(delegating)} tokens," in message, message


def test_run_train_refuses_a_short_context_before_writing(run_train_env, tmp_path):
    run_dir = tmp_path / "run"
    message = fails(
        argv("grpo", run_dir, "rl.ResearchTask.max_context_tokens=300",
             data_dir=run_train_env["data_dir"])
    )  # fmt: skip
    assert message.startswith(
        "run_train: error: rl.ResearchTask.max_context_tokens 300 leaves no room for the first"
        " turn of"
    ), message
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------
# SFT max_length.


def _first_assistant_tokens(tiny):
    """Where each SFT chat's first assistant token is, tokenised as SFT tokenises it."""
    chats = tiny.task.sft_chats(tiny.env, tiny.data.chats, None)
    rows = [
        data_lib.chat_ids(tiny.tok, m, max_observation_chars=tiny.task.max_observation_chars)
        for m in chats
    ]
    return [mask.index(1) for _, mask in rows], [len(ids) for ids, _ in rows]


def test_a_max_length_that_cuts_every_assistant_token_is_refused(tiny):
    firsts, lengths = _first_assistant_tokens(tiny)
    least = max(firsts) + 1
    middle = sorted(firsts)[len(firsts) // 2]  # Cuts the chats whose prompt is this or longer.
    for max_length in (64, middle):
        cut = [f for f in firsts if f >= max_length]
        partly = sum(f < max_length < n for f, n in zip(firsts, lengths, strict=True))
        message = _refusal(
            validate.sft_budget, SFTStage(max_length=max_length), tiny.task, tiny.env,
            tiny.data, tiny.tok, "x",
        )  # fmt: skip
        assert message == (
            f"SFTStage 'sft': max_length {max_length} cuts away every assistant token of"
            f" {len(cut)} of {len(firsts)} chats (up to {max(cut)} tokens come before the"
            f" first; {partly} more chats lose their last tokens); set it to at least {least},"
            " or shorten the chats (max_observation_chars)."
        )
    assert 0 < sum(f >= middle for f in firsts) < len(firsts)  # Some chats cut, not all.
    # The least max_length passes, though most chats still lose their last tokens.
    validate.sft_budget(SFTStage(max_length=least), tiny.task, tiny.env, tiny.data, tiny.tok, "x")
    assert sum(n > least for n in lengths) > 0


def test_run_train_refuses_a_short_max_length_before_writing(run_train_env, tmp_path):
    run_dir = tmp_path / "run"
    message = fails(
        argv("sft", run_dir, "train_lib.SFTStage.max_length=64", data_dir=run_train_env["data_dir"])
    )
    assert message.startswith(
        "run_train: error: SFTStage 'sft': max_length 64 cuts away every assistant token of"
    ), message
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------
# A step with no token to train, should one get past the checks.


@pytest.mark.parametrize("config,binding,expected", [
    ("sft", "train_lib.SFTStage.max_length=64",
     "run_train: error: SFTStage 'sft': step 1: no assistant token within max_length 64 in the"
     " batch's 2 chats; stopped instead of training on nothing."),
    ("grpo", "rl.ResearchTask.max_context_tokens=300",
     "run_train: error: RLStage 'rl': step 1: no token to train in 4 episodes (finish reasons:"
     " 4 context); the task's max_context_tokens or max_new_tokens leaves the policy no room."
     " Stopped instead of training on nothing."),
])  # fmt: skip
def test_a_step_without_tokens_stops_the_run(run_train_env, tmp_path, monkeypatch, config,
                                             binding, expected):  # fmt: skip
    monkeypatch.setattr(validate, "run_inputs", lambda *args: None)  # A check it got past.
    run_dir = tmp_path / "run"
    args = argv(config, run_dir, binding, "train_lib.train.evaluate=False",
                data_dir=run_train_env["data_dir"])  # fmt: skip
    assert fails(args) == expected
    stage = "sft" if config == "sft" else "rl"
    assert not (run_dir / stage / "export").exists()
