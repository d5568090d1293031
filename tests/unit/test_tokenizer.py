"""medjax.models.tokenizer: byte-level BPE round-trips, single-id agent tokens, chat template,
offline save/load."""

import pytest
import transformers

from medjax.models import tokenizer as tokenizer_lib

CORPUS = [
    "The patient is a 67-year-old man with chest pain radiating to the left arm.",
    "The patient reports fever, productive cough and shortness of breath for three days.",
    "Blood pressure is 150/95 mmHg and heart rate is 102 beats per minute.",
    "Start aspirin 325 mg orally once, then 81 mg daily.",
    "The patient has a history of type 2 diabetes mellitus treated with metformin.",
    "Creatinine is 2.1 mg/dL, so the metformin dose must be reviewed.",
    "Chest X-ray shows a right lower lobe consolidation consistent with pneumonia.",
    "Start amoxicillin 1 g orally three times daily for five days.",
    "The patient denies nausea, vomiting or abdominal pain.",
    "Troponin is elevated and the ECG shows ST elevation in leads II, III and aVF.",
    "Call the cardiology team for urgent coronary angiography.",
    "The patient is allergic to penicillin and develops a rash.",
    "Hemoglobin A1c is 8.4 percent, above the target of 7 percent.",
    "Check the potassium level before giving furosemide.",
    "The patient has a history of atrial fibrillation on warfarin.",
    "The INR is 3.8, above the therapeutic range of 2 to 3.",
    "Hold warfarin tonight and recheck the INR tomorrow morning.",
    "The child has a fever of 39 degrees and a stiff neck.",
    "Lumbar puncture is indicated to rule out meningitis.",
    "Start ceftriaxone and vancomycin before the lumbar puncture results.",
    "The patient has a history of asthma and uses an inhaler daily.",
    "Oxygen saturation is 91 percent on room air.",
    "Give nebulized albuterol and oral prednisone.",
    "The patient reports headache, blurred vision and swelling of the legs.",
    "Blood pressure is 165/110 mmHg at 34 weeks of pregnancy.",
    "Suspect preeclampsia and give magnesium sulfate.",
    "Renal function is normal and liver enzymes are normal.",
    "The patient has a history of chronic kidney disease stage 3.",
    "Avoid nonsteroidal anti-inflammatory drugs in chronic kidney disease.",
    "The final diagnosis is community-acquired pneumonia.",
    "The final diagnosis is acute inferior myocardial infarction.",
    "The final answer is to hold warfarin and recheck the INR.",
]
VOCAB_SIZE = 400


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(CORPUS, VOCAB_SIZE)


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_returns_fast_tokenizer_with_learned_merges(tok):
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    # 256 bytes + 11 special tokens = 267; the corpus has enough pairs to fill the budget.
    assert len(tok) == VOCAB_SIZE
    # A frequent word is a single merged token, not its 8 bytes.
    assert len(_encode(tok, " patient")) == 1


@pytest.mark.parametrize(
    "text",
    [
        "The patient has a fever.",
        "Zyxq qvarnet wobble 0.0001 !!!",  # Never seen in training.
        "Fièvre élevée, café, naïve",
        "患者发烧,中文文本",
        "Emoji 😀🩺💊 and ZWJ 👩‍⚕️",
        "  leading spaces,\ttabs,\r\nCRLF and trailing  \n\n",
        "e\u0301 (decomposed) vs \u00e9 (composed)",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = _encode(tok, text)
    assert tok.decode(ids) == text


def test_unseen_text_falls_back_to_bytes(tok):
    # Characters absent from the corpus have no merges: one id per UTF-8 byte.
    assert len(_encode(tok, "中")) == 3
    assert len(_encode(tok, "😀")) == 4
    assert tok.unk_token is None


def test_special_tokens_are_single_distinct_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in tokenizer_lib.SPECIAL_TOKENS]
    assert len(tokenizer_lib.SPECIAL_TOKENS) == 11
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, int) and 0 <= i < len(tok) for i in ids)
    for token, i in zip(tokenizer_lib.SPECIAL_TOKENS, ids, strict=True):
        assert _encode(tok, token) == [i]
    # Control tokens lead the vocabulary; tags follow the learned merges.
    assert ids[:3] == [0, 1, 2]
    assert ids[3:] == list(range(VOCAB_SIZE - 8, VOCAB_SIZE))


@pytest.mark.parametrize("token", tokenizer_lib.SPECIAL_TOKENS)
def test_special_token_glued_to_text_is_one_id(tok, token):
    text = f"x{token}{{'dose': 5}}{token}y"
    tokens = tok.convert_ids_to_tokens(_encode(tok, text))
    assert tokens.count(token) == 2
    assert tokens[0] == "x"
    assert tokens[1] == token
    assert tokens[-2:] == [token, "y"]
    # No piece of the token leaks out as ordinary text.
    assert not any("<" in t and t != token for t in tokens)


def test_tool_call_in_text(tok):
    text = 'x<tool_call>{"name": "lookup_drug", "arguments": {"drug": "warfarin"}}</tool_call>y'
    ids = _encode(tok, text)
    open_id = tok.convert_tokens_to_ids("<tool_call>")
    close_id = tok.convert_tokens_to_ids("</tool_call>")
    assert ids.count(open_id) == 1 and ids.count(close_id) == 1
    assert ids.index(open_id) == 1 and ids.index(close_id) == len(ids) - 2
    assert tok.decode(ids) == text


def test_pad_and_eos(tok):
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == 0
    assert tok.eos_token_id == 2
    assert tok.bos_token is None


def test_skip_special_tokens_drops_control_keeps_tags(tok):
    text = "<|im_start|>assistant\n<think>ok</think><answer>B</answer><|im_end|><|endoftext|>"
    ids = _encode(tok, text)
    assert (
        tok.decode(ids, skip_special_tokens=True)
        == "assistant\n<think>ok</think><answer>B</answer>"
    )
    assert set(tok.all_special_ids) == {0, 1, 2}


def test_extra_special_tokens(tmp_path):
    tok = tokenizer_lib.train_bpe(CORPUS, VOCAB_SIZE, extra_special_tokens=("<image>",))
    assert _encode(tok, "a<image>b") == [
        *_encode(tok, "a"),
        3,
        *_encode(tok, "b"),
    ]
    assert tok.decode([3], skip_special_tokens=True) == ""
    assert len(tok) == VOCAB_SIZE


def test_training_is_deterministic(tok):
    again = tokenizer_lib.train_bpe(CORPUS, VOCAB_SIZE)
    assert again.get_vocab() == tok.get_vocab()


def test_chat_template_exact(tok):
    messages = [
        {"role": "system", "content": "You are a careful clinician."},
        {"role": "user", "content": "INR is 3.8 on warfarin. Next step?"},
    ]
    expected = (
        "<|im_start|>system\nYou are a careful clinician.<|im_end|>\n"
        "<|im_start|>user\nINR is 3.8 on warfarin. Next step?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.chat_template == tokenizer_lib.CHAT_TEMPLATE
    assert tokenizer_lib.apply_chat_template(tok, messages) == expected
    no_prompt = tokenizer_lib.apply_chat_template(tok, messages, add_generation_prompt=False)
    assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")
    ids = tokenizer_lib.apply_chat_template(tok, messages, tokenize=True)
    assert ids == _encode(tok, expected)
    assert ids.count(1) == 3 and ids.count(2) == 2


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = tokenizer_lib.load_tokenizer(tmp_path)
    text = 'x<tool_call>{"drug": "café 中文 😀"}</tool_call>y <answer>B</answer><|im_end|>'
    assert _encode(loaded, text) == _encode(tok, text)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == tokenizer_lib.CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Dose?"}]
    assert tokenizer_lib.apply_chat_template(loaded, messages) == (
        "<|im_start|>user\nDose?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 2)
    assert loaded.decode(_encode(loaded, text), skip_special_tokens=True) == text.removesuffix(
        "<|im_end|>"
    )


def test_an_exported_model_folder_loads_the_tokenizer_it_was_trained_with(tok, tmp_path):
    """Beside a model's config.json (an export), transformers' AutoTokenizer would pick the
    model type's class, whose pre-tokenizer splits digits and punctuation otherwise: the
    same text would get other ids than the policy saw in training."""
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "architectures": []}')
    loaded = tokenizer_lib.load_tokenizer(tmp_path)
    texts = [
        "INR 3.8 on warfarin 5mg; target 2-3. It's 12345678!",
        "  two spaces\tand a tab: don't <answer>B</answer>",
    ]
    for text in texts:
        assert _encode(loaded, text) == _encode(tok, text), text
    assert loaded.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_load_tokenizer_rejects_a_malformed_config(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        tokenizer_lib.load_tokenizer(tmp_path)


def test_load_tokenizer_missing_files(tmp_path):
    empty = tmp_path / "empty_checkpoint"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_checkpoint.*tokenizer\.json"):
        tokenizer_lib.load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        tokenizer_lib.load_tokenizer(tmp_path / "no_such_folder")


def test_train_bpe_argument_errors():
    with pytest.raises(ValueError, match="at least 267"):
        tokenizer_lib.train_bpe(CORPUS, 266)
    with pytest.raises(ValueError, match="repeats"):
        tokenizer_lib.train_bpe(CORPUS, VOCAB_SIZE, extra_special_tokens=("<think>",))
    with pytest.raises(ValueError, match="repeats"):
        tokenizer_lib.train_bpe(CORPUS, VOCAB_SIZE, extra_special_tokens=("<a>", "<a>"))
    with pytest.raises(TypeError, match="one string"):
        tokenizer_lib.train_bpe("The patient has a fever.", VOCAB_SIZE)
