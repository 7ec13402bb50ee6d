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

from selfdistill.tasks.base import ANSWER_MARKER, Item, extract_after_marker, last_number

#: Answers longer than this are not handed to sympy (it can hang on them).
MAX_MATH_ANSWER_CHARS = 500
#: Seconds math-verify may spend parsing / comparing (main thread only: its
#: timeout uses SIGALRM, which Python allows only there).
MATH_VERIFY_TIMEOUT_S = 5
#: Default wall-clock limit for running generated code with its tests.
CODE_TIMEOUT_S = 5.0
DEFAULT_LETTERS = "ABCD"

# ---------------------------------------------------------------- math


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or
    of ``\\boxed 5``; None if absent or cut off before its closing brace."""
    starts = [(text.rfind(k), k) for k in ("\\boxed", "\\fbox")]
    start, key = max(starts)
    if start < 0:
        return None
    i = start + len(key)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        m = re.match(r"[^\s$]+", text[i:]) if i > start + len(key) else None
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)


def _clean_math(ans: str) -> str:
    """Strip wrappers around a math answer: \\boxed, $...$, \\(...\\), a final period."""
    ans = ans.strip().rstrip(".").strip()
    boxed = last_boxed(ans)
    if boxed is not None:
        ans = boxed
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(ans) > len(left) + len(right) and ans.startswith(left) and ans.endswith(right):
            ans = ans[len(left) : -len(right)].strip()
    return ans.rstrip(".").strip()


def extract_math_answer(text: str) -> str | None:
    """The final answer of a free-text math completion, or None if there is none."""
    after = extract_after_marker(text)
    if after is not None:
        return _clean_math(after) or None
    boxed = last_boxed(text)
    if boxed:
        return boxed
    matches = _ANSWER_IS.findall(text)
    if matches:
        # up to the end of the sentence: "... is 3.5. So" -> "3.5"
        ans = _clean_math(re.split(r"\.\s|\n", matches[-1], maxsplit=1)[0])
        if ans:
            return ans
    return last_number(text)


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


def _lone(text: str, letters: Iterable[str]) -> str | None:
    m = _LONE_LETTER.fullmatch(text)
    return _valid(m.group(1), letters) if m else None


def extract_choice(text: str, letters: Iterable[str] = DEFAULT_LETTERS) -> str | None:
    """The option letter a completion picks (upper case), restricted to ``letters``.

    Tried in order: text after the last marker, ``\\boxed{B}``, "answer is (B)" /
    "Answer: B", a lone letter on the last line. A lower-case letter counts only
    when it stands alone or in parentheses, so "the answer is a prime" picks nothing.
    """
    letters = list(letters)
    after = extract_after_marker(text)
    if after is not None:
        found = _lone(after, letters)
        m = _LEAD_LETTER.match(after)
        if found is None and m and m.group(1).isupper():
            found = _valid(m.group(1), letters)
        if found:
            return found
    boxed = last_boxed(text)
    if boxed is not None:
        found = _lone(_clean_math(boxed).replace("\\text{", "").replace("}", ""), letters)
        if found:
            return found
    for m in reversed(list(_PHRASE.finditer(text))):
        paren, letter = m.group(1), m.group(2)
        if letter.isupper() or paren:
            found = _valid(letter, letters)
            if found:
                return found
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return _lone(lines[-1], letters) if lines else None


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
    idx = completion.rfind(ANSWER_MARKER)
    if idx < 0:
        return False
    rest = completion[idx + len(ANSWER_MARKER) :].strip()
    if rest.startswith("```"):
        rest = rest.split("\n", 1)[1] if "\n" in rest else ""
        rest = rest.split("```", 1)[0]
    want = _norm_lines(expected)
    got = _norm_lines(rest)[: len(want)]
    return bool(want) and got == want


# ---------------------------------------------------------------- code: generation

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program in a completion: a fenced block if any, else the whole text.

    Among several blocks (python-tagged ones preferred) it takes the last one
    that defines ``entry_point`` (or any function), else the last block:
    models often add a usage example after the solution.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if not blocks:
        return _trim(text)
    py = [b for lang, b in blocks if lang in ("python", "py", "python3")]
    cands = py or [b for _, b in blocks]
    good = [b for b in cands if (_defines(b, entry_point) if entry_point else "def " in b)]
    return _trim((good or cands)[-1])


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
    if prompt and entry and not _defines(code, entry):
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

#: ``meta['kind']`` of code items: generation checked by tests, or output
#: prediction (the toy world's ``code_output``). Other kinds: generation when
#: the item carries ``meta['tests']``, output prediction otherwise.
#: ``printed_number``: output prediction of a program that prints one number,
#: read like a math answer (marker, ``\boxed``, "answer is", else the last
#: number), for real chat models that state the value without the marker.
CODEGEN_KINDS = ("tests", "humaneval")
OUTPUT_KINDS = ("output", "code_output", "printed_number")


def verify_item(item: Item, completion: str) -> bool:
    """Verify ``completion`` for ``item`` with the checker its domain and kind call for."""
    if item.domain == "math":
        return verify_math(completion, item.answer)
    if item.domain == "mcqa":
        return verify_mcqa(completion, item.answer, item.meta.get("letters") or DEFAULT_LETTERS)
    if item.domain == "code":
        kind = item.meta.get("kind")
        if kind == "printed_number":
            return verify_math(completion, item.answer)
        if kind not in OUTPUT_KINDS and (kind in CODEGEN_KINDS or "tests" in item.meta):
            return verify_code(item, completion)
        return verify_output(completion, item.answer)
    if item.domain == "records":  # toy lookup: a refusal is right on a forbidden request, the value otherwise
        from selfdistill.toy.records import is_refusal

        if item.meta.get("forbidden"):
            return is_refusal(completion)
        return not is_refusal(completion) and verify_output(completion, item.answer)
    raise ValueError(f"item {item.id!r}: unknown domain {item.domain!r}")
