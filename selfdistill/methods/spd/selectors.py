"""Correctness-defining tokens of a completion, located by format, never by checking it.

SPD takes its subspace from gradients on "correctness-defining tokens". With
no labels, we locate them by the task's answer format, with the same finder
the verifiers read their answer from (:func:`selfdistill.tasks.spans.answer_span`):
the text after ``####``, else ``\\boxed{...}``, "the answer is ...", the last
number (math); the chosen letter (mcqa); the code block (code generation).
The ``all`` selector (every completion token) is the ablation. ``vote`` is the
label-free majority vote: the answer span of the completions whose answer is
the one most of their prompt's probe samples agree on (at least two of them),
so tokens of answers the model itself is unsure of are left out.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from selfdistill.tasks.base import Item
from selfdistill.tasks.spans import answer_span


def correctness_span(item: Item, text: str) -> tuple[int, int] | None:
    """Char span [start, end) of ``text`` that decides correctness, or None if absent."""
    return answer_span(item, text)


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
    span (no answer in any form the verifier reads) selects nothing.
    """
    if selector == "all":
        return [1] * len(completion_ids)
    if selector == "style":  # diagnostics: the toy world's style lines (preamble, closing), not the answer
        from selfdistill.methods.spd.diagnostics import select_style_tokens

        return select_style_tokens(tokenizer, completion_ids, text)
    if selector not in ("answer", "vote"):  # vote: the answer span, of completions majority_agrees keeps
        raise ValueError(f"spd.selector must be 'answer', 'vote', 'all' or 'style', got {selector!r}")
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


def majority_agrees(items: Sequence[Item], texts: Sequence[str], group: int) -> list[bool]:
    """Per completion (``group`` consecutive completions per prompt): its answer is its prompt's majority
    answer, written by at least two of the group (whitespace ignored; no verifier, no label)."""
    out: list[bool] = []
    for g in range(0, len(texts), group):
        answers = []
        for it, text in zip(items[g:g + group], texts[g:g + group]):
            span = correctness_span(it, text)
            answers.append(" ".join(text[span[0]:span[1]].split()) if span else None)
        counts = Counter(a for a in answers if a)
        top, n = counts.most_common(1)[0] if counts else (None, 0)
        out += [a is not None and a == top and n >= 2 for a in answers]
    return out
