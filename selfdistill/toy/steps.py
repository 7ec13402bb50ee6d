"""The toy world's worked steps, recomputed from the problem (no reference solution read).

Shared by SGSD's rule-based skill extractor and the exact step-aligned
critic: both need "what should line i of the trace be" and "what kind of
step is it" (an addition with a carry, a subtraction with a borrow, a
multiplication, an ``if`` ...).

- math ``Compute 47+38-15``: one line per operation, ``47+38=85`` then ``85-15=70``;
- code ``What does this print?``: one trace line per assignment, in the
  generator's format (``b = 4 * 3 = 12``, ``12 > 5: b = 12 - 2 = 10``);
- mcqa: the work line (``7+5=12`` / ``largest is 93``).
"""

from __future__ import annotations

import re

from selfdistill.tasks.base import ANSWER_MARKER, Item

#: A worked arithmetic line "a+b=c" (spaces allowed), as the toy math and mcqa traces write them.
STEP_RE = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
#: A traced code assignment "x = 4 * 3 = 12", optionally behind "12 > 5: ".
CODE_STEP_RE = re.compile(r"^\s*(?:(-?\d+)\s*>\s*(-?\d+)\s*:\s*)?([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*([+\-*])\s*(-?\d+)"
                          r"\s*=\s*(-?\d+)\s*$")
_MATH_PROMPT = re.compile(r"^\s*Compute\s+(-?\d+)((?:\s*[+\-]\s*\d+)+)\s*$")
_OPERAND = re.compile(r"([+\-])\s*(\d+)")


#: Lines a toy solution may carry that are not worked steps (style: preamble, closing; careful ones-digit lines).
_TEXT_PREFIXES = ("Step by step:", "Let us work it out.", "So ", "ones:")


def is_text_line(line: str) -> bool:
    """Whether a trace line is style or a careful aside rather than a worked step (never checked)."""
    return line.strip().startswith(_TEXT_PREFIXES)


def is_toy(item: Item) -> bool:
    """Whether ``item`` comes from the toy world (its steps can be recomputed exactly)."""
    return item.id.startswith("toy-")


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def parse_step(line: str) -> tuple[int, str, int, int] | None:
    """(a, op, b, c) of an "a op b = c" line, or None."""
    m = STEP_RE.match(line)
    return (int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))) if m else None


def math_operations(prompt: str) -> tuple[int, list[tuple[str, int]]] | None:
    """(start value, [(op, operand), ...]) of a toy math prompt, or None."""
    m = _MATH_PROMPT.match(prompt)
    if not m:
        return None
    return int(m.group(1)), [(op, int(k)) for op, k in _OPERAND.findall(m.group(2))]


def math_steps(prompt: str) -> list[tuple[int, str, int, int]] | None:
    """The worked steps (a, op, b, a op b) of a toy math prompt, or None if it is not one."""
    parsed = math_operations(prompt)
    if parsed is None:
        return None
    value, ops = parsed
    out = []
    for op, k in ops:
        new = apply(value, op, k)
        out.append((value, op, k, new))
        value = new
    return out


def step_features(a: int, op: str, b: int) -> list[str]:
    """Keywords of one arithmetic step: add/sub/mul, and carry/borrow on the ones digit."""
    if op == "+":
        return ["add", "add_carry"] if (abs(a) % 10 + abs(b) % 10) > 9 else ["add"]
    if op == "-":
        return ["sub", "sub_borrow"] if abs(a) % 10 < abs(b) % 10 else ["sub"]
    return ["mul"]


def format_step(a: int, op: str, b: int, c: int, spaced: bool = False) -> str:
    return f"{a} {op} {b} = {c}" if spaced else f"{a}{op}{b}={c}"


# ---------------------------------------------------------------- code
def code_trace(program: str) -> tuple[list[str], dict[str, int], str | None, list[str]] | None:
    """Run a toy program symbolically: (trace lines, final env, printed name, features), or None.

    The grammar is the toy generator's: ``x = 5``, ``x = y op k``, ``if y > t:``
    followed by ``    y = y - k``, ``print(x)``.
    """
    env: dict[str, int] = {}
    trace: list[str] = []
    feats: list[str] = []
    printed = None
    last_assigned = None
    lines = program.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i].strip()
        i += 1
        if not ln:
            continue
        if m := re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*(-?\d+)", ln):
            env[m.group(1)] = int(m.group(2))
            trace.append(f"{m.group(1)} = {m.group(2)}")
            last_assigned = m.group(1)
        elif m := re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*([A-Za-z_]\w*)\s*([+\-*])\s*(\d+)", ln):
            name, src, op, k = m.group(1), m.group(2), m.group(3), int(m.group(4))
            if src not in env:
                return None
            val = apply(env[src], op, k)
            trace.append(f"{name} = {env[src]} {op} {k} = {val}")
            feats.append({"+": "add", "-": "sub", "*": "mul"}[op])
            env[name] = val
            last_assigned = name
        elif m := re.fullmatch(r"if\s+([A-Za-z_]\w*)\s*>\s*(-?\d+)\s*:", ln):
            src, thr = m.group(1), int(m.group(2))
            body = lines[i].strip() if i < len(lines) else ""
            i += 1
            b = re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*([A-Za-z_]\w*)\s*-\s*(\d+)", body)
            if src not in env or not b:
                return None
            k = int(b.group(3))
            feats.append("if")
            if env[src] > thr:
                trace.append(f"{env[src]} > {thr}: {src} = {env[src]} - {k} = {env[src] - k}")
                env[src] -= k
            else:
                trace.append(f"{env[src]} <= {thr}: skip")
        elif m := re.fullmatch(r"print\(\s*([A-Za-z_]\w*)\s*\)", ln):
            printed = m.group(1)
        else:
            return None
    if printed is not None and printed != last_assigned:
        feats.append("print")
    return trace, env, printed, list(dict.fromkeys(feats))


def _program(item: Item) -> str:
    return item.meta.get("program") or item.prompt.split("\n", 1)[-1]


# ---------------------------------------------------------------- any toy item
def expected_steps(item: Item) -> list[str] | None:
    """The worked lines (without the answer line) a correct trace of ``item`` has, or None if unknown."""
    if item.domain == "math":
        steps = math_steps(item.prompt)
        return [format_step(*s) for s in steps] if steps is not None else None
    if item.domain == "code":
        tr = code_trace(_program(item))
        return tr[0] if tr is not None else None
    if item.domain == "mcqa" and is_toy(item):
        m = item.meta
        if "question" in m:  # v2: the work lines, then "option X is N"
            if m["steps"]:
                work = [format_step(*s) for s in m["steps"]]
                target = m["steps"][-1][3]
            else:
                target = max(m["options"]) if m["question"] == "largest" else min(m["options"])
                work = [f"{m['question']} is {target}"]
            return work + [f"option {item.answer} is {target}"]
        return [ln for ln in item.solution.splitlines() if ANSWER_MARKER not in ln and ln.strip()]
    return None


def problem_features(item: Item) -> list[str]:
    """Keywords describing what solving ``item`` takes (domain first); used to retrieve skills."""
    feats = [item.domain]
    if item.domain == "math":
        for a, op, b, _ in math_steps(item.prompt) or []:
            feats += step_features(a, op, b)
    elif item.domain == "code":
        tr = code_trace(_program(item))
        if tr is not None:
            feats += tr[3]
    elif item.domain == "mcqa":
        low = item.prompt.lower()
        if "largest" in low or "biggest" in low:
            feats.append("largest")
        else:
            feats.append("equals")
            m = re.search(r"(\d+)\s*([+\-])\s*(\d+)", item.prompt)
            if m:
                feats += step_features(int(m.group(1)), m.group(2), int(m.group(3)))
    return list(dict.fromkeys(feats))
