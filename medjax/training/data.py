"""Training data: chats as token ids with loss masks, padded batches, and index streams.

Batches are addressed by step: `IndexStream(n, batch_size, seed)[step]` is the same list of
example indices in every run (grain's shuffled, repeated `MapDataset`: a new order each
epoch), so a resumed run reads exactly the data an uninterrupted one would from its
restored step on, with nothing but the step stored.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from medjax.agents import tools as tools_lib
from medjax.models import tokenizer as tokenizer_lib

_RESPONSE_OPEN, _RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"


class IndexStream:
    """Shuffled epochs of `range(num_examples)` in batches, random access by step."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, *, shuffle: bool = True):
        if num_examples < 1:
            raise ValueError("IndexStream: the dataset is empty.")
        ds = grain.MapDataset.range(num_examples)
        if shuffle:
            ds = ds.seed(seed).shuffle()
        self._ds = ds.repeat(None).batch(batch_size, drop_remainder=True)

    def __getitem__(self, step: int) -> list[int]:
        return [int(i) for i in self._ds[step]]


def truncate_observations(
    messages: Sequence[Mapping[str, str]], max_chars: int | None
) -> list[dict[str, str]]:
    """The chat with each tool response cut as `tools.truncate_output` cuts it in rollouts."""
    out = [dict(m) for m in messages]
    if max_chars is None:
        return out
    for m in out:
        content = m["content"]
        framed = content.startswith(_RESPONSE_OPEN) and content.endswith(_RESPONSE_CLOSE)
        if m["role"] == "user" and framed:
            inner = content[len(_RESPONSE_OPEN) : -len(_RESPONSE_CLOSE)]
            m["content"] = (
                _RESPONSE_OPEN + tools_lib.truncate_text(inner, max_chars) + _RESPONSE_CLOSE
            )
    return out


def chat_ids(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    *,
    max_observation_chars: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a whole chat and a mask that is 1 on the assistant's content tokens.

    The chat template's framing (`<|im_start|>assistant\\n`, `<|im_end|>`) is not the
    policy's: rollouts stop on `</tool_call>` / `</answer>` and the loop appends the framing,
    so SFT teaches exactly what the policy samples. Tool responses are first cut to
    `max_observation_chars` as rollouts cut them (`truncate_observations`). The ids are
    `tokenizer_lib.encode_chat`'s, as the agent loop makes them: special tokens in any
    message's content are text, so a `<|im_end|>` written in a message neither ends its turn
    nor forges another.

    Raises:
      ValueError: the template does not render an assistant message's content verbatim
        right after the generation prompt (naming the message).
    """
    messages = truncate_observations(messages, max_observation_chars)
    chat = tokenizer_lib.tokenize_chat(tokenizer, messages, add_generation_prompt=False)
    text = chat.text
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer_lib.apply_chat_template(
            tokenizer, messages[:i], add_generation_prompt=True
        )
        if not text.startswith(prefix) or not text.startswith(m["content"], len(prefix)):
            raise ValueError(
                f"chat_ids: the chat template does not render assistant message {i} verbatim"
                " after the generation prompt; cannot mask it."
            )
        spans.append((len(prefix), len(prefix) + len(m["content"])))
    mask = [0] * len(chat.ids)
    for j, (start, end) in enumerate(chat.offsets):
        if end > start and any(s <= start and end <= e for s, e in spans):
            mask[j] = 1
    return chat.ids, mask


def pad_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    width: int,
    *,
    pad_id: int,
    num_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-padded `input_ids`, `attention_mask`, `loss_mask` [num_rows, width]; rows longer
    than `width` are cut; missing rows (up to `num_rows`) are all padding."""
    n = len(rows) if num_rows is None else num_rows
    out = {
        "input_ids": np.full((n, width), pad_id, np.int32),
        "attention_mask": np.zeros((n, width), np.int32),
        "loss_mask": np.zeros((n, width), np.int32),
    }
    for r, (ids, mask) in enumerate(rows):
        k = min(len(ids), width)
        out["input_ids"][r, :k] = ids[:k]
        out["attention_mask"][r, :k] = 1
        out["loss_mask"][r, :k] = mask[:k]
    return out


def bucket(length: int, minimum: int = 64, step: int = 256) -> int:
    """The padded width of a batch whose longest row has `length` tokens: the next power of
    two up to `step`, then the next multiple of `step` (bounded compiles, little padding)."""
    width = minimum
    while width < min(length, step):
        width *= 2
    return width if length <= width else -(-length // step) * step


def research_record(example: Mapping[str, Any]) -> dict[str, Any]:
    """A `med_kg_qa_trajectories` example (as `med_kg_qa.to_trajectory` gives it) as the
    question record `medjax.envs.research.score` takes."""
    return {
        "id": example["id"],
        "question": example["question"],
        "answer": {"name": example["answer_name"], "aliases": list(example["answer_aliases"])},
        "hops": int(example["hops"]),
    }
