"""The task interface every method and evaluator speaks.

An :class:`Item` is one problem: the prompt the student sees, a worked
reference solution (used only by privileged-context teachers), and the final
answer (used only by verifiers and evaluation, never by SPD or SSD).
A :class:`Task` is a named list of items per split plus a verifier.
"""

from __future__ import annotations

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
    """The text after the last ``marker`` on its line, stripped; None if absent
    (:func:`selfdistill.tasks.spans.marker_span`, the one finder)."""
    from selfdistill.tasks.spans import marker_span

    span = marker_span(text, marker)
    return None if span is None else text[span[0]:span[1]]


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
