"""Where a completion states its answer: one finder for the verifiers and for SPD's token selector.

Every finder returns a character span ``(start, end)`` of ``text`` (or None),
located by format only, never by checking the answer. The verifiers in
:mod:`selfdistill.tasks.verify` read their answer from these spans, and SPD's
``answer`` selector marks the tokens that overlap the same span, so a form
the verifier accepts (``#### 42``, ``\\boxed{42}``, "The answer is 42", a lone
option letter, a fenced code block) is the form SPD takes gradients on.
"""

from __future__ import annotations

import re
from typing import Iterable

from selfdistill.tasks.base import ANSWER_MARKER, Item

Span = tuple[int, int]


def _strip(text: str, start: int, end: int) -> Span | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def marker_span(text: str, marker: str = ANSWER_MARKER, to_end: bool = False) -> Span | None:
    """The text after the last ``marker``: the rest of its line (or of the text with ``to_end``),
    whitespace around it stripped; the next non-blank line when the marker ends its line."""
    idx = text.rfind(marker)
    if idx < 0:
        return None
    start = idx + len(marker)
    while start < len(text) and text[start].isspace():
        start += 1
    end = len(text) if to_end else (text.find("\n", start) if "\n" in text[start:] else len(text))
    return _strip(text, start, end)


def boxed_span(text: str) -> Span | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or of ``\\boxed 5``;
    None if absent or cut off before its closing brace."""
    start, key = max((text.rfind(k), k) for k in ("\\boxed", "\\fbox"))
    if start < 0:
        return None
    i = start + len(key)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        m = re.compile(r"[^\s$]+").match(text, i) if i > start + len(key) else None
        return m.span() if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return _strip(text, i + 1, j) or (i + 1, i + 1)
    return None


def clean_math(ans: str) -> str:
    """Strip wrappers around a math answer: \\boxed, $...$, \\(...\\), a final period."""
    ans = ans.strip().rstrip(".").strip()
    boxed = boxed_span(ans)
    if boxed is not None:
        ans = ans[boxed[0]:boxed[1]]
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(ans) > len(left) + len(right) and ans.startswith(left) and ans.endswith(right):
            ans = ans[len(left) : -len(right)].strip()
    return ans.rstrip(".").strip()


_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s|\n")
_NUMBER = re.compile(r"-?\d+(?:,\d+)*(?:\.\d+)?")


def answer_is_span(text: str) -> Span | None:
    """"... answer is X" (the last one), up to the end of its sentence."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    start, end = m.span(1)
    cut = _SENTENCE_END.search(text, start, end)
    return _strip(text, start, cut.start() if cut else end)


def last_number_span(text: str) -> Span | None:
    """The last number (fallback for free-form answers; thousands commas belong to the number)."""
    found = list(_NUMBER.finditer(text))
    return found[-1].span() if found else None


def math_spans(text: str) -> list[tuple[str, Span]]:
    """Candidate math answers in the verifier's order: marker, boxed, "answer is", last number."""
    out = []
    for name, finder in (("marker", marker_span), ("boxed", boxed_span), ("answer_is", answer_is_span),
                         ("number", last_number_span)):
        span = finder(text)
        if span is not None:
            out.append((name, span))
    return out


_LETTER = r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?![A-Za-z0-9])"
_LEAD_LETTER = re.compile(r"\s*" + _LETTER)
_LONE_LETTER = re.compile(r"\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:)]?\s*")
_PHRASE = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|=)\s*:?\s*(?:option\s+|choice\s+)?(\(|\[)?\s*([A-Za-z])\s*[\)\]]?(?![A-Za-z0-9])",
    re.IGNORECASE,
)


def _valid(letter: str, letters: Iterable[str]) -> str | None:
    up = letter.upper()
    return up if up in {x.upper() for x in letters} else None


def _lone_at(text: str, start: int, end: int, letters: Iterable[str]) -> tuple[str, Span] | None:
    m = _LONE_LETTER.fullmatch(text, start, end)
    if not m:
        return None
    found = _valid(m.group(1), letters)
    return (found, m.span(1)) if found else None


def choice_span(text: str, letters: Iterable[str]) -> tuple[str, Span] | None:
    """The option letter a completion picks (upper case) and where it stands, restricted to ``letters``.

    Tried in order: text after the last marker, ``\\boxed{B}``, "answer is (B)" / "Answer: B", a lone
    letter on the last line. A lower-case letter counts only when it stands alone or in parentheses,
    so "the answer is a prime" picks nothing.
    """
    letters = list(letters)
    after = marker_span(text)
    if after is not None:
        found = _lone_at(text, *after, letters)
        m = _LEAD_LETTER.match(text, after[0], after[1])
        if found is None and m and m.group(1).isupper():
            letter = _valid(m.group(1), letters)
            found = (letter, m.span(1)) if letter else None
        if found:
            return found
    boxed = boxed_span(text)
    if boxed is not None:
        inner = clean_math(text[boxed[0]:boxed[1]]).replace("\\text{", "").replace("}", "")
        m = _LONE_LETTER.fullmatch(inner)
        letter = _valid(m.group(1), letters) if m else None
        if letter:  # where the letter stands inside the box
            at = max(text.rfind(letter, *boxed), text.rfind(letter.lower(), *boxed))
            return letter, (at, at + 1)
    for m in reversed(list(_PHRASE.finditer(text))):
        if m.group(2).isupper() or m.group(1):
            letter = _valid(m.group(2), letters)
            if letter:
                return letter, m.span(2)
    lines = [m.span() for m in re.finditer(r"[^\n]*\S[^\n]*", text)]
    return _lone_at(text, *lines[-1], letters) if lines else None


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def defines(code: str, name: str) -> bool:
    """Whether ``code`` defines a function ``name`` (at any indent)."""
    return re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def code_span(text: str, entry_point: str | None = None) -> Span | None:
    """The program in a completion: a fenced block if any, else the whole text.

    Among several blocks (python-tagged ones preferred) it takes the last one that defines
    ``entry_point`` (or any function), else the last block: models often add a usage example after
    the solution.
    """
    blocks = [(m.group(1).lower(), m.span(2)) for m in _FENCE.finditer(text)]
    if not blocks:
        return (0, len(text)) if text.strip() else None
    py = [s for lang, s in blocks if lang in ("python", "py", "python3")]
    cands = py or [s for _, s in blocks]
    good = [s for s in cands if (defines(text[s[0]:s[1]], entry_point) if entry_point else "def " in text[s[0]:s[1]])]
    return (good or cands)[-1]


#: ``meta['kind']`` of code items: generation checked by tests, or output prediction (the toy world's
#: ``code_output``). ``printed_number``: output prediction of a program that prints one number, read like a
#: math answer (marker, ``\boxed``, "answer is", else the last number), for real chat models that state
#: the value without the marker.
CODEGEN_KINDS = ("tests", "humaneval")
OUTPUT_KINDS = ("output", "code_output", "printed_number")
DEFAULT_LETTERS = "ABCD"


def answer_form(item: Item) -> str:
    """How ``item``'s answer is read: ``math`` (also a code item of kind ``printed_number``), ``choice``,
    ``program`` (code generation run with tests: ``meta['kind']`` in CODEGEN_KINDS, or ``meta['tests']``
    without an output kind), ``output`` (printed output after the marker) or ``records``."""
    kind = item.meta.get("kind")
    if item.domain == "math" or (item.domain == "code" and kind == "printed_number"):
        return "math"
    if item.domain == "mcqa":
        return "choice"
    if item.domain == "code":
        return "program" if kind not in OUTPUT_KINDS and (kind in CODEGEN_KINDS or "tests" in item.meta) else "output"
    if item.domain == "records":
        return "records"
    raise ValueError(f"item {item.id!r}: unknown domain {item.domain!r}")


def answer_span(item: Item, text: str) -> Span | None:
    """Where ``text`` states the answer the verifier of ``item`` reads (None: no answer found)."""
    form = answer_form(item)
    if form == "math":
        spans = math_spans(text)
        return spans[0][1] if spans else None
    if form == "choice":
        found = choice_span(text, item.meta.get("letters") or DEFAULT_LETTERS)
        return found[1] if found else None
    if form == "program":
        return code_span(text, item.meta.get("entry_point"))
    return marker_span(text, to_end=form == "output")
