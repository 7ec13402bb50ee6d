"""Correctness-defining tokens of a completion, located by format, never by checking it.

SPD takes its subspace from gradients on "correctness-defining tokens". With
no labels, we locate them by the task's answer format: the final-answer text
after the ``####`` marker (math, output prediction, the answer letter), or the
code body for code generation. The ``all`` selector (every completion token)
is the ablation.
"""

from __future__ import annotations

import re
from typing import Sequence

from selfdistill.tasks.base import Item, answer_char_span

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def correctness_span(item: Item, text: str) -> tuple[int, int] | None:
    """Char span [start, end) of ``text`` that decides correctness, or None if absent."""
    if item.meta.get("kind") in ("tests", "humaneval"):
        fences = list(_FENCE.finditer(text))
        if fences:
            return fences[-1].start(1), fences[-1].end(1)
        return (0, len(text)) if text.strip() else None
    return answer_char_span(text)


def token_char_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """End offset (in the decoded text, special tokens skipped) of each token.

    Fast path: decode tokens one by one and add up lengths; if that does not
    reproduce the whole decoded text (multi-byte pieces), fall back to
    decoding every prefix.
    """
    full = tokenizer.decode(list(ids), skip_special_tokens=True)
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    ends, pos = [], 0
    for p in pieces:
        pos += len(p)
        ends.append(pos)
    if pos == len(full) and "".join(pieces) == full:
        return ends
    return [len(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True)) for i in range(len(ids))]


def select_tokens(tokenizer, item: Item, completion_ids: Sequence[int], text: str, selector: str) -> list[int]:
    """0/1 per completion token: 1 where the token overlaps the correctness span.

    ``selector='all'`` marks every completion token. A completion without the
    span (no answer marker) selects nothing.
    """
    if selector == "all":
        return [1] * len(completion_ids)
    if selector == "style":  # diagnostics: the toy world's style lines (preamble, closing), not the answer
        from selfdistill.spd.diagnostics import select_style_tokens

        return select_style_tokens(tokenizer, completion_ids, text)
    if selector != "answer":
        raise ValueError(f"spd.selector must be 'answer', 'all' or 'style', got {selector!r}")
    span = correctness_span(item, text)
    if span is None:
        return [0] * len(completion_ids)
    start, end = span
    ends = token_char_ends(tokenizer, completion_ids)
    out, prev = [], 0
    for e in ends:
        out.append(1 if (e > start and prev < end and e > prev) else 0)
        prev = e
    return out
