"""Stop strings for token-level backends.

A stop string such as "End Inquiry" can be written by many token sequences ("End" +
" Inquiry", "\\nEnd" + " Inquiry", byte pieces ...). The sampler stops early on the usual
ones (`stop_sequences`), and the reply is then cut on its decoded text, after the first
token whose text completes a stop string, so every tokenisation stops at the right token
(one the sampler did not foresee only costs the steps generated past it).
"""

from collections.abc import Sequence

# Prefixes under which a stop string usually starts a new token in BPE vocabularies.
_LEADS = ("", " ", "\n")


def stop_sequences(tokenizer, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences the sampler can stop on: each stop string as encoded alone and
    after a space or newline, without the ids of the lead itself."""
    out = []
    for text in stop_strings:
        for lead in _LEADS:
            ids = tokenizer.encode(lead + text, add_special_tokens=False)
            if lead:
                lead_ids = tokenizer.encode(lead, add_special_tokens=False)
                if ids[: len(lead_ids)] != lead_ids:
                    # The lead merged into the stop string's first token: keep it whole.
                    out.append(tuple(ids))
                    continue
                ids = ids[len(lead_ids) :]
            out.append(tuple(ids))
    return tuple(dict.fromkeys(s for s in out if s))


def stop_string_cut(tokenizer, token_ids: Sequence[int], stop_strings: Sequence[str]) -> int | None:
    """The number of tokens to keep: up to the first token whose decoded prefix contains a
    stop string, or None where none occurs."""
    if not stop_strings:
        return None

    def hit(n: int) -> bool:
        text = tokenizer.decode(list(token_ids[:n]), skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    if not hit(len(token_ids)):
        return None
    lo, hi = 1, len(token_ids)  # Containment only grows with n: binary search the first hit.
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
