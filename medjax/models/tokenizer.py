"""Tokenizers for the agent loop: load a local Hugging Face folder offline, or train a tiny
byte-level BPE with the chat and tool-call tokens that medjax rollouts need.

from medjax.models import tokenizer as tokenizer_lib
tok = tokenizer_lib.train_bpe(texts, vocab_size=512)  # Or load_tokenizer("/ckpt/qwen2.5-0.5b").
prompt = tokenizer_lib.apply_chat_template(tok, [{"role": "user", "content": "Dose?"}])
tok.save_pretrained("/tmp/tok")  # A normal HF folder: tokenizer.json, tokenizer_config.json,
tok = tokenizer_lib.load_tokenizer("/tmp/tok")  # and chat_template.jinja; loads back offline.

Token layout of `train_bpe` (Qwen2.5 conventions, so that code written against the tiny tokenizer
runs unchanged on a Qwen checkpoint):
  * `CONTROL_TOKENS` and any extra special tokens take ids 0, 1, 2, ...; they are "special" in
    the HF sense, so `decode(ids, skip_special_tokens=True)` drops them.
  * `TAG_TOKENS` (`<tool_call>`, `<answer>`, `<think>`, ...) take the ids after the learned merges
    and are *not* special: like Qwen's, they survive `skip_special_tokens=True`, because the reward
    and tool parsers read them from decoded text.
Every one of them encodes as exactly one id wherever it appears, also glued to other text,
because added tokens are matched before pre-tokenization. That holds for text a user or tool
writes too, so a tool response that contains `<|im_end|>` ends the turn, as it would in Qwen.
"""

import json
import os
from collections.abc import Iterable, Mapping, Sequence

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from medjax.models import checkpoint

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

# Control tokens frame the chat turns and pad batches; a policy never writes them mid-answer.
CONTROL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)

# Tag tokens mark structure inside a turn: tool calls, tool responses, final answers, reasoning.
TAG_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
)

SPECIAL_TOKENS: tuple[str, ...] = CONTROL_TOKENS + TAG_TOKENS

# Qwen's ChatML framing without its default system prompt and tool plumbing: the agent loop
# formats tool responses itself, so the template only frames turns. The `-` modifiers matter:
# transformers renders templates with trim_blocks and lstrip_blocks, and any stray newline would
# end up inside the prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# What `load_tokenizer` requires at least one of; weights-only folders have neither.
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json")

# The `tokenizer_class` values of a plain tokenizer.json with no model-specific class: what
# `train_bpe` folders name (transformers 5 writes the first, 4 the second).
_PLAIN_CLASSES: frozenset[str] = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})

# Every byte has a symbol in the byte-level alphabet, so no text can fall out of the vocabulary.
_NUM_BYTES = 256


def load_tokenizer(path: str | os.PathLike[str]) -> transformers.PreTrainedTokenizerBase:
    """Loads the tokenizer of a local Hugging Face folder, never touching the hub.

    Args:
      path: a local folder written by `save_pretrained`, holding `tokenizer.json` and/or
        `tokenizer_config.json` (and `chat_template.jinja` where the template is kept apart, as
        transformers 5 does), or a `.gguf` file, whose metadata describes its tokenizer (see
        `gguf_checkpoint.gguf_tokenizer`). Hub ids are not accepted, cached or not.

    Returns:
      For a folder whose `tokenizer_config.json` names the plain class (`train_bpe` folders,
      written by `save_pretrained`), a `TokenizersBackend` (transformers 5's name for
      `PreTrainedTokenizerFast`) exactly as its tokenizer.json describes it; otherwise what
      `transformers.AutoTokenizer` builds. AutoTokenizer is not used for the plain class:
      given a `config.json` beside it (an exported model), it picks the model type's class,
      which swaps in that family's own pre-tokenizer (Qwen2's regex for a qwen2 config), so
      the same text would get other ids than the policy was trained on.

    Raises:
      FileNotFoundError: `path` is neither a folder nor a .gguf file that exists, or holds
        none of `TOKENIZER_FILES`.
    """
    folder = os.fspath(path)
    if checkpoint.is_gguf(folder):
        from medjax.models import gguf_checkpoint  # Imports the gguf library only when needed.

        return gguf_checkpoint.gguf_tokenizer(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"load_tokenizer: {folder!r} is not a directory.")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"load_tokenizer: no tokenizer files in {folder!r}; looked for"
            f" {', '.join(TOKENIZER_FILES)}."
        )
    if _tokenizer_class(folder) in _PLAIN_CLASSES:
        return transformers.TokenizersBackend.from_pretrained(folder, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _tokenizer_class(folder: str) -> str | None:
    """The `tokenizer_class` a folder's tokenizer_config.json names, if it names one."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"load_tokenizer: {path} is not valid JSON: {e}") from None
    return config.get("tokenizer_class") if isinstance(config, dict) else None


def apply_chat_template(
    tokenizer: transformers.PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    tokenize: bool = False,
) -> str | list[int]:
    """Renders one conversation with the tokenizer's chat template.

    Args:
      tokenizer: any tokenizer with a `chat_template`, such as those from `train_bpe` and
        `load_tokenizer`.
      messages: the conversation, each message `{"role": ..., "content": ...}` with string
        values.
      add_generation_prompt: whether to end with the header of an assistant turn
        (`<|im_start|>assistant\\n` for `CHAT_TEMPLATE`), the prompt a policy continues.
      tokenize: whether to return token ids instead of text.

    Returns:
      The rendered text, or with `tokenize=True` a flat list of int token ids equal to
      `tokenizer.encode(text, add_special_tokens=False)`. Calling
      `tokenizer.apply_chat_template` directly with `tokenize=True` returns a `BatchEncoding`
      dict in transformers 5 unless given `return_dict=False`; this helper always returns ids.
    """
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=tokenize,
        return_dict=False,
    )


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    extra_special_tokens: Sequence[str] = (),
) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer with the agent's special tokens and chat template.

    Byte-level pre-tokenization (GPT-2 split rule, no prefix space) and no normalizer, so
    `decode(encode(text)) == text` for every string: unseen words, any script, emoji.

    Args:
      texts: the training corpus, an iterable of strings (read once).
      vocab_size: the largest vocabulary to build, counting the 256 byte symbols,
        `SPECIAL_TOKENS` and `extra_special_tokens`. A corpus too small to support that many
        merges gives fewer; size embeddings with `len(tokenizer)`.
      min_frequency: the fewest occurrences a pair needs to be merged.
      extra_special_tokens: more control tokens, special in the HF sense like `CONTROL_TOKENS`;
        they take the ids right after them.

    Returns:
      A `transformers.PreTrainedTokenizerFast` with pad `<|endoftext|>`, eos `<|im_end|>`, no
      bos or unk token, and `chat_template` set to `CHAT_TEMPLATE`.

    Raises:
      TypeError: `texts` is a single string.
      ValueError: `extra_special_tokens` repeats a token, or `vocab_size` cannot hold the byte
        alphabet and the special tokens.
    """
    if isinstance(texts, str):
        raise TypeError("train_bpe: `texts` must be an iterable of strings, got one string.")
    extra = tuple(extra_special_tokens)
    added = SPECIAL_TOKENS + extra
    if len(set(added)) != len(added):
        raise ValueError(
            f"train_bpe: `extra_special_tokens` {extra} repeats a token or one of"
            f" SPECIAL_TOKENS {SPECIAL_TOKENS}."
        )
    if vocab_size < _NUM_BYTES + len(added):
        raise ValueError(
            f"train_bpe: vocab_size={vocab_size} cannot hold the {_NUM_BYTES} byte symbols and"
            f" {len(added)} special tokens; it must be at least {_NUM_BYTES + len(added)}."
        )

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    control = CONTROL_TOKENS + extra
    trainer = trainers.BpeTrainer(
        # The tag tokens are added after training, so they are left out of the trainer's budget.
        vocab_size=vocab_size - len(TAG_TOKENS),
        min_frequency=min_frequency,
        special_tokens=[tokenizers.AddedToken(t, normalized=False) for t in control],
        # Without the full alphabet, bytes absent from the corpus would have no symbol.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # The trainer marks everything it is given as special; the tags must not be, so that
    # `skip_special_tokens=True` keeps them (see the module docstring).
    backend.add_tokens(
        [tokenizers.AddedToken(t, normalized=False, special=False) for t in TAG_TOKENS]
    )

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        # Listed so that `all_special_ids` covers every token that `skip_special_tokens` drops.
        extra_special_tokens=[t for t in control if t not in (PAD_TOKEN, EOS_TOKEN)],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
