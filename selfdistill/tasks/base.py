"""The task interface every method and evaluator speaks.

An :class:`Item` is one problem: the prompt the student sees, a worked
reference solution (used only by privileged-context teachers), and the final
answer (used only by verifiers and evaluation, never by SPD or SSD).
A :class:`Task` is a named list of items per split plus a verifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

#: The marker after which a completion states its final answer (GSM8K style).
ANSWER_MARKER = "####"

DOMAINS = ("math", "code", "mcqa")


@dataclass(frozen=True)
class Item:
    """One problem.

    ``prompt`` is the user-message content; ``solution`` is a worked reference
    solution that ends with ``ANSWER_MARKER answer``; ``answer`` is the final
    answer string the verifier compares with; ``meta`` carries domain data the
    verifier needs (e.g. a program to run, unit tests, option letters).
    """

    id: str
    prompt: str
    solution: str
    answer: str
    domain: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def extract_after_marker(text: str, marker: str = ANSWER_MARKER) -> str | None:
    """The text after the last ``marker`` on its line, stripped; None if absent."""
    idx = text.rfind(marker)
    if idx < 0:
        return None
    rest = text[idx + len(marker) :]
    line = rest.strip().split("\n", 1)[0].strip()
    return line or None


def answer_char_span(text: str, marker: str = ANSWER_MARKER) -> tuple[int, int] | None:
    """Character span [start, end) of the final-answer text after the last marker.

    Located by format only (never by checking the answer): this is what SPD
    calls the correctness-defining span of a completion.
    """
    idx = text.rfind(marker)
    if idx < 0:
        return None
    start = idx + len(marker)
    while start < len(text) and text[start] in " \t":
        start += 1
    end = text.find("\n", start)
    end = len(text) if end < 0 else end
    if end <= start:
        return None
    return start, end


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in ``text`` (fallback extractor for free-form answers)."""
    found = _NUM.findall(text.replace(",", ""))
    return found[-1] if found else None


class Task(Protocol):
    """A named source of items with a verifier."""

    name: str
    domain: str

    def items(self, split: str) -> list[Item]:
        """Items of ``split`` (e.g. ``train``, ``test_id``, ``test_ood``)."""
        ...

    def verify(self, item: Item, completion: str) -> bool:
        """Whether ``completion`` answers ``item`` correctly."""
        ...


Verifier = Callable[[Item, str], bool]
