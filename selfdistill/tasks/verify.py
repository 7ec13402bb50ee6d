"""Answer extraction and checking for every domain.

One entry point, :func:`verify_item`, dispatches on ``item.domain`` and
``item.meta['kind']``; the per-domain functions are public so evaluators and
tests can call them directly. Verifiers never raise on odd completions: a
completion that cannot be read is simply wrong.

Math: the final answer is taken after the last ``####``, else from the last
``\\boxed{...}``, else from "the answer is X", else the last number; plain
numbers are compared exactly (fast, no sympy), anything else with math-verify
under a timeout. MCQA: a letter restricted to the item's options. Code: either
the printed output after the marker (toy output prediction) or generated code
run with the item's tests in :mod:`selfdistill.tasks.sandbox`.
"""

from __future__ import annotations

import re
import textwrap
import threading
from fractions import Fraction
from typing import Iterable

from selfdistill.tasks.base import Item
from selfdistill.tasks.spans import (  # noqa: F401  (CODEGEN_KINDS, OUTPUT_KINDS, DEFAULT_LETTERS: public names)
    CODEGEN_KINDS, DEFAULT_LETTERS, OUTPUT_KINDS, answer_form, boxed_span, choice_span, code_span, defines,
    marker_span, math_spans,
)
from selfdistill.tasks.spans import clean_math as _clean_math

#: Answers longer than this are not handed to sympy (it can hang on them).
MAX_MATH_ANSWER_CHARS = 500
#: Seconds math-verify may spend parsing / comparing (main thread only: its
#: timeout uses SIGALRM, which Python allows only there).
MATH_VERIFY_TIMEOUT_S = 5
#: Default wall-clock limit for running generated code with its tests.
CODE_TIMEOUT_S = 5.0

# ---------------------------------------------------------------- math


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or
    of ``\\boxed 5``; None if absent or cut off before its closing brace."""
    span = boxed_span(text)
    return None if span is None else text[span[0]:span[1]]


def extract_math_answer(text: str) -> str | None:
    """The final answer of a free-text math completion, or None if there is none.

    Read from the first of :func:`~selfdistill.tasks.spans.math_spans` that gives one (the marker's
    answer is final even when it cleans to nothing; an empty box or "answer is" falls through)."""
    for name, (start, end) in math_spans(text):
        raw = text[start:end]
        if name == "number":
            return raw.replace(",", "")
        ans = _clean_math(raw) if name != "boxed" else raw
        if ans or name == "marker":
            return ans or None
    return None


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_NUM = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_NUM_WITH_UNIT = re.compile(r"(\S+)\s+[A-Za-z][A-Za-z ]*")


def as_number(text: str, allow_unit: bool = False) -> Fraction | None:
    """``text`` as an exact number if it is a plain one ("1,000", "+3.0", "3/4", "$5").

    ``allow_unit`` also accepts a trailing unit word ("18 dollars" -> 18).
    """
    s = text.strip().removeprefix("\\$").removeprefix("$").strip().rstrip(".")
    if allow_unit:
        m = _NUM_WITH_UNIT.fullmatch(s)
        if m:
            s = m.group(1)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _PLAIN_NUM.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_equal(gold: str, pred: str) -> bool:
    """math-verify equivalence, guarded: any error or timeout counts as False."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    on_main = threading.current_thread() is threading.main_thread()
    limit = MATH_VERIFY_TIMEOUT_S if on_main else None
    try:
        g = parse("\\boxed{" + gold + "}", parsing_timeout=limit)
        p = parse("\\boxed{" + pred + "}", parsing_timeout=limit)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=limit))
    except (Exception, TimeoutException):
        return False


def math_equal(gold: str, pred: str) -> bool:
    """Whether two final answers are mathematically the same; never raises."""
    gold, pred = _clean_math(gold), _clean_math(pred)
    if not gold or not pred:
        return False
    if gold == pred:
        return True
    g = as_number(gold)
    if g is not None:
        p = as_number(pred, allow_unit=True)
        if p is not None:
            return g == p
    if len(pred) > MAX_MATH_ANSWER_CHARS or len(gold) > MAX_MATH_ANSWER_CHARS:
        return False
    return _math_verify_equal(gold, pred)


def verify_math(completion: str, answer: str) -> bool:
    """Whether the final answer of ``completion`` equals ``answer``."""
    pred = extract_math_answer(completion)
    return pred is not None and math_equal(answer, pred)


# ---------------------------------------------------------------- mcqa

def extract_choice(text: str, letters: Iterable[str] = DEFAULT_LETTERS) -> str | None:
    """The option letter a completion picks (upper case), restricted to ``letters``
    (see :func:`~selfdistill.tasks.spans.choice_span` for the forms it reads)."""
    found = choice_span(text, letters)
    return found[0] if found else None


def verify_mcqa(completion: str, answer: str, letters: Iterable[str] = DEFAULT_LETTERS) -> bool:
    """Whether ``completion`` picks option ``answer`` (a letter, any case)."""
    pred = extract_choice(completion, letters)
    return pred is not None and pred == answer.strip().strip("()").upper()


# ---------------------------------------------------------------- code: output prediction


def _norm_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def verify_output(completion: str, expected: str) -> bool:
    """Whether the output predicted after the marker equals ``expected``.

    Compares as many lines as ``expected`` has (whitespace inside lines
    normalised), so prose after the predicted output does not matter, as with
    the one-line math marker. A code fence around the output is ignored.
    """
    span = marker_span(completion, to_end=True)
    if span is None:
        return False
    rest = completion[span[0]:span[1]]
    if rest.startswith("```"):
        rest = rest.split("\n", 1)[1] if "\n" in rest else ""
        rest = rest.split("```", 1)[0]
    want = _norm_lines(expected)
    got = _norm_lines(rest)[: len(want)]
    return bool(want) and got == want


# ---------------------------------------------------------------- code: generation

def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program in a completion (see :func:`~selfdistill.tasks.spans.code_span`), blank lines trimmed."""
    span = code_span(text, entry_point)
    return "" if span is None else _trim(text[span[0]:span[1]])


def _trim(code: str) -> str:
    """Drop blank lines around code, keeping the first line's indent (a body continuation)."""
    lines = code.rstrip().splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def _import_lines(code: str) -> str:
    lines = [ln for ln in code.splitlines() if ln.startswith(("import ", "from "))]
    return "\n".join(lines)


def program_and_tests(item: Item, code: str) -> tuple[str, str]:
    """Candidate code (with the item's setup) and the item's tests, as two scripts.

    ``meta['tests']`` is either asserts (MBPP) or a ``def check(candidate)``
    (HumanEval), then called on ``meta['entry_point']``. With a
    ``meta['code_prompt']`` (HumanEval's signature and docstring), a completion
    that does not define the entry point is taken as the body continuing it.
    Kept apart so that the sandbox can tell tests that ran to their end from a
    program that exited early (see :func:`verify_code`).
    """
    meta = item.meta
    tests = meta.get("tests")
    if not isinstance(tests, str) or not tests.strip():
        raise ValueError(f"item {item.id!r}: code item has no meta['tests'] string")
    entry = meta.get("entry_point")
    prompt = meta.get("code_prompt")
    parts = [meta.get("setup") or ""]
    if prompt and entry and not defines(code, entry):
        parts.append(prompt + code)
    else:
        parts += [_import_lines(prompt) if prompt else "", textwrap.dedent(code)]
    checks = [tests]
    if entry and re.search(r"^def\s+check\s*\(", tests, re.MULTILINE):
        checks.append(f"check({entry})")
    return "\n\n".join(p for p in parts if p) + "\n", "\n\n".join(checks) + "\n"


def build_program(item: Item, code: str) -> str:
    """Candidate code plus the item's tests, as one script that fails on a wrong answer (for reading)."""
    program, tests = program_and_tests(item, code)
    return program + "\n" + tests


def verify_code(item: Item, completion: str, timeout_s: float | None = None) -> bool:
    """Whether the completion's code passes the item's tests in the sandbox.

    A pass means the tests ran to their end: a program that exits early with
    status 0 (``sys.exit(0)``, ``os._exit(0)``, a signal handler, atexit, a
    thread) is scored wrong, since the sandbox runs the tests apart and needs
    their end to be reached (reason ``"incomplete"`` otherwise).
    """
    from selfdistill.tasks.sandbox import run_python

    code = extract_code(completion, item.meta.get("entry_point"))
    if not code:
        return False
    limit = timeout_s if timeout_s is not None else float(item.meta.get("timeout_s", CODE_TIMEOUT_S))
    program, tests = program_and_tests(item, code)
    return bool(run_python(program, tests=tests, timeout_s=limit).ok)


# ---------------------------------------------------------------- dispatch

def verify_item(item: Item, completion: str) -> bool:
    """Verify ``completion`` for ``item`` with the checker its answer form calls for
    (:func:`~selfdistill.tasks.spans.answer_form`, which SPD's selector shares)."""
    form = answer_form(item)
    if form == "math":
        return verify_math(completion, item.answer)
    if form == "choice":
        return verify_mcqa(completion, item.answer, item.meta.get("letters") or DEFAULT_LETTERS)
    if form == "program":
        return verify_code(item, completion)
    if form == "output":
        return verify_output(completion, item.answer)
    # toy records lookup: a refusal is right on a forbidden request, the value otherwise
    from selfdistill.toy.records import is_refusal

    if item.meta.get("forbidden"):
        return is_refusal(completion)
    return not is_refusal(completion) and verify_output(completion, item.answer)
