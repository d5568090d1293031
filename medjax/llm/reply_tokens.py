"""What `medjax.llm.serve` tells of a reply's tokens beyond their text: the stop string cut
as OpenAI cuts it, each token's UTF-8 bytes, and the top-k log-probs at each position.
"""

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medjax import sampling
from medjax.llm.chat_request import MAX_TOP_LOGPROBS


def cut_at_stop(text: str, stop_strings: Sequence[str], *, keep: bool) -> tuple[str, str | None]:
    """A reply's content without the stop string that ended it, as OpenAI returns it.

    The matched string is the one whose end comes first in `text` (the earliest to be
    completed while decoding, where the generation stopped), the longest of those that end
    there.

    Args:
      text: the backend's reply, which keeps a matched stop string and may run past it by
        the rest of the token that completed it.
      stop_strings: the request's stop strings.
      keep: keep the matched string (vLLM's `include_stop_str_in_output`).

    Returns:
      (the text up to the matched string, or through it with `keep`; the matched string or
      None when none occurs, and then `text` unchanged).
    """
    hits = [(text.find(s) + len(s), -len(s), s) for s in stop_strings if s in text]
    if not hits:
        return text, None
    end, _, matched = min(hits)
    return text[: end if keep else end - len(matched)], matched


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: each byte's stand-in character -> the byte.

    The printable bytes '!'..'~', U+00A1..U+00AC and U+00AE..U+00FF stand for themselves;
    the other 68 take U+0100, U+0101, ... in byte order (the convention of byte-level BPE
    tokenizers: GPT-2, Llama 3, Qwen, SmolLM and `train_bpe`).
    """
    own = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    stand_in = {b: chr(b) for b in own}
    for i, b in enumerate(b for b in range(256) if b not in stand_in):
        stand_in[b] = chr(256 + i)
    return {c: b for b, c in stand_in.items()}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces.


class TokenBytes:
    """The UTF-8 bytes each token id stands for, as OpenAI's `logprobs[].bytes` gives them.

    A token that holds part of a multi-byte character gets its own bytes (decoding it alone
    gives U+FFFD). Read from the token's vocabulary entry, by the tokenizer's decoder:
    byte-level BPE maps each character back to its byte; SentencePiece byte fallback reads
    `<0xAB>` pieces as the byte and "▁" as a space. Added tokens are their text. A tokenizer
    with neither decoder falls back to the UTF-8 of the token decoded alone.

    Args:
      tokenizer: a transformers tokenizer.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.added = {
            i: str(getattr(t, "content", t))
            for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        }
        kinds = _decoder_kinds(tokenizer)
        self.scheme = (
            "byte_level" if "ByteLevel" in kinds else "byte_fallback" if "ByteFallback" in kinds
            else None
        )  # fmt: skip
        self._alphabet = _byte_level_alphabet()
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if token_id not in self._cache:
            self._cache[token_id] = self._bytes(token_id)
        return self._cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and self.scheme == "byte_level":
            if all(c in self._alphabet for c in piece):
                return bytes(self._alphabet[c] for c in piece)
        elif isinstance(piece, str) and self.scheme == "byte_fallback":
            if match := _BYTE_PIECE.fullmatch(piece):
                return bytes([int(match[1], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """The `type`s in a fast tokenizer's decoder (a Sequence's members included)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    try:
        # The decoder's own JSON description (what tokenizer.json holds under "decoder").
        spec = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return set()
    kinds, stack = set(), [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kinds.add(node.get("type"))
            stack.extend(node.get("decoders") or [])
    return kinds


def scores_top_logprobs(backend: Any) -> bool:
    """Whether `top_logprobs` can score a backend's replies: it has a medjax model and
    encodes conversations as its sampler does (`JaxPolicyBackend`)."""
    from medjax.models.transformer import DecoderLM

    return isinstance(getattr(backend, "model", None), DecoderLM) and callable(
        getattr(backend, "encode", None)
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "k"))
def _top_program(graphdef, state, ids_BxT, mask_BxT, start, temperature, *, steps, k):
    """The k most likely next tokens at positions start .. start + steps - 1 of each row:
    [B, steps, k] log-probs at `temperature` and their ids, most likely first."""
    model = nnx.merge(graphdef, state)
    hidden_BxTxD = model(ids_BxT, attention_mask=mask_BxT, return_hidden=True)
    picked_BxNxD = jax.lax.dynamic_slice_in_dim(hidden_BxTxD, start, steps, axis=1)
    # Only the reply's positions go through the LM head: [B, T, V] logits of a long prompt
    # would dwarf the rest.
    logits_BxNxV = model.logits(picked_BxNxD) / temperature
    return jax.lax.top_k(jax.nn.log_softmax(logits_BxNxV, axis=-1), k)


def top_logprobs(
    model: Any,
    prompt: Sequence[int],
    replies: Sequence[Sequence[int]],
    *,
    temperature: float,
    k: int,
) -> list[list[list[tuple[int, float]]]]:
    """The k most likely tokens, with their log-probs, at each position of each reply.

    One forward pass of prompt + reply per reply (rows padded to powers of two, the length
    and the reply's steps bucketed, so that requests share a bounded set of programs): the
    distribution each reply token was drawn from, log softmax(z / temperature), untruncated
    by top-k / top-p, as the sampler's log-probs are; equal to the sampler's to float
    rounding.

    Args:
      model: a medjax DecoderLM.
      prompt: the prompt's token ids (the chat template applied).
      replies: each reply's sampled ids.
      temperature: the sampling temperature (1 for greedy decoding).
      k: how many tokens per position (at most the vocabulary).

    Returns:
      Per reply, per reply token, [(token id, log-prob)] most likely first.
    """
    longest = max((len(r) for r in replies), default=0)
    if not replies or longest == 0 or k < 1:
        return [[] for _ in replies]
    steps = sampling.bucket_length(longest)
    # The hidden state at position t predicts token t + 1: the prompt's last one the first
    # reply token. A reply's last token is never fed.
    start = len(prompt) - 1
    width = sampling.bucket_length(start + steps)
    rows = sampling.bucket_length(len(replies))
    ids = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), np.int32)
    for row in range(rows):
        # Padding rows repeat the first reply (an all-padding row is a softmax over nothing).
        sequence = [*prompt, *replies[min(row, len(replies) - 1)]][: start + steps]
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    graphdef, state = nnx.split(model)
    k_computed = min(MAX_TOP_LOGPROBS, model.config.vocab_size)
    values, indices = _top_program(
        graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.int32(start),
        jnp.float32(temperature), steps=steps, k=k_computed,
    )  # fmt: skip
    values, indices = np.asarray(values), np.asarray(indices)
    k = min(k, k_computed)
    return [
        [
            [(int(indices[r, i, j]), float(values[r, i, j])) for j in range(k)]
            for i in range(len(reply))
        ]
        for r, reply in enumerate(replies)
    ]
