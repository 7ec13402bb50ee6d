"""The toy world (v5): seeded procedural tasks in the SPD paper's three domains.

Each domain has a ``train`` split, ``valid`` and ``valid_ood`` splits (for
choosing settings and checking the world's preconditions), an in-domain
``test_id`` split and an out-of-domain ``test_ood`` split. Items are pure functions of (domain, split, index, seed).
Every reference solution shows its work and ends with ``#### answer``.

Out-of-domain splits hold out *combinations* of constructs that all occur in
training, so they are reachable (v1's used tokens never seen in training and
sat at the floor):

- math ``Compute 47+8-5``: 1-4 operations (operands 2-49 after the first) (+/-) in training, where 4
  operations are all of one sign (with operands up to 49, additions); OOD has 4 operations of both signs (v3's OOD, 4 operations never seen
  in training, sat at 0.8%).
- code "What does this print?": 2-4 assignments; an ``if`` occurs in training
  only on the last assigned variable and with at most 3 assignments; OOD has
  4 assignments and an ``if`` on an earlier variable.
- mcqa: "equals a+b" with one operation, and "largest/smallest" questions,
  with 3-5 options; the second phrasing occurs only with 3-4 options. OOD:
  "equals a+b-c" (two operations, as math has) and the second phrasing with
  5 options.

Each solution has a surface *style* drawn independently of the problem and
of correctness (spacing, an optional preamble, an optional closing line, for
mcqa the order of the work and option lines), recorded in ``item.meta["style"]``
so a method's effect on style can be measured (:func:`style_of` reads it back
from any completion). ``item.meta`` also carries the worked ``steps``, the
``skills`` the problem exercises (the closed vocabulary of SGSD hints) and
the ``shards`` of its multi-turn rendering (CCOPD).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from selfdistill.tasks.base import ANSWER_MARKER, Item

SPLITS = ("train", "valid", "valid_ood", "test_id", "test_ood")
#: Splits drawn from the out-of-domain distribution (``valid_ood`` is for choosing settings, like ``valid``).
OOD_SPLITS = ("valid_ood", "test_ood")
#: Items per split: tables use 500 per evaluation split (standard error ~2 points).
DEFAULT_SIZES = {"train": 4000, "valid": 500, "valid_ood": 500, "test_id": 500, "test_ood": 500}
_SPLIT_SALT = {"train": 11, "valid": 17, "test_id": 23, "test_ood": 37, "valid_ood": 41}
WORLD_VERSION = 5
#: Largest operand after the first number. v2 had 19, where the v2 model (peak lr 2e-3) sat at 6% in
#: domain; v3/v4 had 9, where the v4 model (peak lr 5e-4) sat at 90.5% in domain and 77% out of domain,
#: i.e. ~4-6% errors per worked line, where 20-70% / 10-30% need ~25%: v5 asks 2-digit operands.
MAX_OPERAND = 49

#: The closed vocabulary of skill hints (``skill: carry``), in a fixed order.
SKILLS = ("carry", "borrow", "times", "branch", "compare")
PREAMBLES = ("", "Step by step:", "Let us work it out.")


def _rng(domain: str, split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"v2/{domain}/{split}/{seed}/{index}/{_SPLIT_SALT[split]}")


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def step_skill(a: int, op: str, b: int) -> str | None:
    """The skill a step ``a op b`` exercises: a carry, a borrow, a multiplication, or none."""
    if op == "+" and (abs(a) % 10 + abs(b) % 10) > 9:
        return "carry"
    if op == "-" and abs(a) % 10 < abs(b) % 10:
        return "borrow"
    if op == "*":
        return "times"
    return None


#: The skill hint that makes a careful solution write a ones-digit line before every step of that operation.
CAREFUL_OP = {"carry": "+", "borrow": "-"}


def careful_line(a: int, op: str, b: int, spaced: bool, careful: frozenset[str] | set[str] = frozenset()) -> str | None:
    """The ones-digit line a careful solution writes before each ``+`` step (hint ``carry``) or ``-`` step
    (hint ``borrow``): ``ones: 4 + 7 = 11, carry 1`` / ``ones: 2 + 7 = 9``.

    Every step of the hinted operation gets one, not only those that carry: deciding whether a step carries
    is the very ones-digit sum the line writes out (v3 wrote lines only before carrying steps, and the
    model, unable to tell which those were before computing them, put them on the wrong steps: -13 points).
    """
    if op not in {CAREFUL_OP[s] for s in careful if s in CAREFUL_OP}:
        return None
    sp = " " if spaced else ""
    x, y = abs(a) % 10, abs(b) % 10
    if op == "+":
        return f"ones: {x}{sp}+{sp}{y}{sp}={sp}{x + y}" + (", carry 1" if x + y > 9 else "")
    if x < y:
        return f"ones: {x + 10}{sp}-{sp}{y}{sp}={sp}{x + 10 - y}, borrow 1"
    return f"ones: {x}{sp}-{sp}{y}{sp}={sp}{x - y}"


def draw_style(rng: random.Random, domain: str) -> dict[str, Any]:
    """A surface style, drawn independently of the problem."""
    style: dict[str, Any] = {"spaced": rng.random() < 0.5, "preamble": rng.randrange(len(PREAMBLES)),
                             "closing": rng.random() < 0.4}
    if domain == "mcqa":
        style["option_first"] = rng.random() < 0.5
    return style


def _fmt(a: int, op: str, b: int, c: int, spaced: bool) -> str:
    return f"{a} {op} {b} = {c}" if spaced else f"{a}{op}{b}={c}"


def _wrap(lines: list[str], answer: str, style: dict[str, Any], closing: str) -> str:
    pre = PREAMBLES[style["preamble"]]
    body = ([pre] if pre else []) + lines + ([closing] if style["closing"] else [])
    return "\n".join(body + [f"{ANSWER_MARKER} {answer}"])


# ---------------------------------------------------------------- math
def math_ops(rng: random.Random, n_ops: int, signs: str = "any") -> tuple[int, list[tuple[str, int]]]:
    """A start number and ``n_ops`` operations; ``signs``: ``any``, ``same`` (all + or all -) or ``mixed``
    (both + and - occur; needs 2+ operations)."""
    while True:
        value = start = rng.randint(10, 99)
        first = rng.choice("+-")
        if signs == "same" and first == "-" and start < n_ops * MAX_OPERAND:
            first = "+"
        ops = []
        for _ in range(n_ops):
            op, k = (first if signs == "same" else rng.choice("+-")), rng.randint(2, MAX_OPERAND)
            if op == "-" and k > value:
                op = "+"
            ops.append((op, k))
            value = apply(value, op, k)
        if signs != "mixed" or len({op for op, _ in ops}) == 2:
            return start, ops


def math_solution(start: int, ops: list[tuple[str, int]], style: dict[str, Any], careful: frozenset[str] | set[str] = frozenset()) -> str:
    """The worked solution of ``Compute start op k ...`` in ``style`` (careful: ones-digit lines on steps with those skills)."""
    lines, value = [], start
    for op, k in ops:
        new = apply(value, op, k)
        if c := careful_line(value, op, k, style["spaced"], careful):
            lines.append(c)
        lines.append(_fmt(value, op, k, new, style["spaced"]))
        value = new
    return _wrap(lines, str(value), style, f"So the result is {value}.")


def _math_item(rng: random.Random, n_ops: int, idx: str, signs: str = "any") -> Item:
    start, ops = math_ops(rng, n_ops, signs)
    style = draw_style(rng, "math")
    expr = str(start) + "".join(f"{op}{k}" for op, k in ops)
    steps, value = [], start
    for op, k in ops:
        steps.append((value, op, k, apply(value, op, k)))
        value = steps[-1][3]
    skills = [s for s in SKILLS if s in {step_skill(a, op, b) for a, op, b, _ in steps}]
    shards = ["I need a number computed step by step.", f"Start from {start}."]
    for i, (op, k) in enumerate(ops):
        verb = "Add" if op == "+" else "Subtract"
        shards.append(f"{verb} {k}." + (" What is the result?" if i == len(ops) - 1 else ""))
    return Item(id=idx, prompt=f"Compute {expr}", solution=math_solution(start, ops, style), answer=str(value),
                domain="math", meta={"kind": "math", "style": style, "steps": steps, "skills": skills,
                                     "shards": shards, "ops": [[op, k] for op, k in ops], "start": start})


# ---------------------------------------------------------------- code
_VARS = "abcdxyz"


def _code_item(rng: random.Random, n_assign: int, if_at: int | None, idx: str) -> Item:
    """A straight-line program; ``if_at`` = index of the assigned variable the ``if`` tests (None: no if)."""
    env: dict[str, int] = {}
    prog: list[str] = []
    steps: list[tuple[str, Any]] = []  # (kind, data) in execution order
    names = rng.sample(_VARS, k=n_assign)
    for i, name in enumerate(names):
        if i == 0 or rng.random() < 0.2:
            val = rng.randint(1, 9)
            prog.append(f"{name} = {val}")
            steps.append(("set", (name, val)))
        else:
            src = rng.choice(list(env))
            op = rng.choice("+-*")
            k = rng.randint(2, 9) if op != "*" else rng.randint(2, 3)
            val = apply(env[src], op, k)
            prog.append(f"{name} = {src} {op} {k}")
            steps.append(("op", (name, env[src], op, k, val)))
        env[name] = val
        if if_at is not None and i == n_assign - 1:
            tgt = names[if_at]
            thr, k = rng.randint(0, 20), rng.randint(1, 9)
            prog += [f"if {tgt} > {thr}:", f"    {tgt} = {tgt} - {k}"]
            taken = env[tgt] > thr
            steps.append(("if", (tgt, env[tgt], thr, k, taken)))
            if taken:
                env[tgt] -= k
    out = names[-1] if rng.random() < 0.7 else rng.choice(names)
    if if_at is not None and rng.random() < 0.5:
        out = names[if_at]
    prog.append(f"print({out})")
    program = "\n".join(prog)
    style = draw_style(rng, "code")
    answer = str(env[out])
    skills = set()
    for kind, d in steps:
        if kind == "op":
            skills.add(step_skill(d[1], d[2], d[3]))
        elif kind == "if":
            skills.add("branch")
    stmts = [s for s in prog[:-1]]
    # group the if with its body so a shard never splits them
    grouped: list[str] = []
    for s in stmts:
        if s.startswith("    ") and grouped:
            grouped[-1] += "\n" + s
        else:
            grouped.append(s)
    shards = ["I have a short Python program and want to know what it prints."]
    for i in range(0, len(grouped), 2):
        head = "It starts with:" if i == 0 else "Then:"
        shards.append(head + "\n" + "\n".join(grouped[i:i + 2]))
    shards.append(f"{prog[-1]}\nWhat does it print?")
    return Item(id=idx, prompt="What does this print?\n" + program, solution=code_solution(steps, out, answer, style),
                answer=answer, domain="code",
                meta={"kind": "code_output", "program": program, "style": style, "steps": steps,
                      "skills": [s for s in SKILLS if s in skills], "shards": shards})


def code_solution(steps: list[tuple[str, Any]], out: str, answer: str, style: dict[str, Any],
                  careful: frozenset[str] | set[str] = frozenset()) -> str:
    sp = style["spaced"]
    eq = " = " if sp else "="
    lines = []
    for kind, d in steps:
        if kind == "set":
            lines.append(f"{d[0]}{eq}{d[1]}")
        elif kind == "op":
            name, v, op, k, val = d
            if c := careful_line(v, op, k, sp, careful):
                lines.append(c)
            lines.append(f"{name}{eq}{_fmt(v, op, k, val, sp)}")
        else:
            tgt, v, thr, k, taken = d
            if taken:
                if c := careful_line(v, "-", k, sp, careful):
                    lines.append(c)
                lines.append(f"{v} > {thr}: {tgt}{eq}{_fmt(v, '-', k, v - k, sp)}")
            else:
                lines.append(f"{v} <= {thr}: skip")
    return _wrap(lines, answer, style, f"So it prints {answer}.")


# ---------------------------------------------------------------- mcqa
_LETTERS = "ABCDEF"
_Q = {"equals": ("Which option equals {e}?", "Pick the letter whose value is {e}."),
      "largest": ("Which option is largest?", "Pick the letter of the biggest value."),
      "smallest": ("Which option is smallest?", "Pick the letter of the smallest value.")}


def _mcqa_item(rng: random.Random, ood: bool, idx: str) -> Item:
    kind = rng.choice(("equals", "equals", "largest", "smallest"))
    if ood:
        two_ops = kind == "equals"
        n_opts, phrasing = (4, rng.randrange(2)) if two_ops else (5, 1)
    else:
        two_ops = False
        phrasing = rng.randrange(2)
        n_opts = rng.randint(3, 5) if phrasing == 0 else rng.randint(3, 4)
    letters = _LETTERS[:n_opts]
    style = draw_style(rng, "mcqa")
    sp = style["spaced"]
    steps: list[tuple[int, str, int, int]] = []
    if kind == "equals":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        op = rng.choice("+-")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        steps.append((a, op, b, apply(a, op, b)))
        expr = f"{a}{op}{b}"
        if two_ops:
            op2, c = rng.choice("+-"), rng.randint(2, 9)
            if op2 == "-" and c > steps[-1][3]:
                op2 = "+"
            steps.append((steps[-1][3], op2, c, apply(steps[-1][3], op2, c)))
            expr += f"{op2}{c}"
        target = steps[-1][3]
        pool = {target}
        while len(pool) < n_opts:
            pool.add(max(0, target + rng.randint(-6, 6)))
        opts = rng.sample(sorted(pool), k=n_opts)
        work = [_fmt(*s, spaced=sp) for s in steps]
    else:
        opts = rng.sample(range(1, 100), k=n_opts)
        target = max(opts) if kind == "largest" else min(opts)
        work = [f"{kind} is {target}"]
    ans = letters[opts.index(target)]
    q = _Q[kind][phrasing].format(e=expr if kind == "equals" else "")
    body = "\n".join(f"{l}) {v}" for l, v in zip(letters, opts))
    opt_line = f"option {ans} is {target}"
    lines = [opt_line] + work if style["option_first"] else work + [opt_line]
    skills = {step_skill(a, o, b) for a, o, b, _ in steps} | ({"compare"} if kind != "equals" else set())
    shards = [q] + [f"{l}) {v}" for l, v in zip(letters, opts)]
    shards = [shards[0]] + ["\n".join(shards[1 + i:3 + i]) for i in range(0, n_opts, 2)]
    shards[-1] += "\nThose are all the options."
    return Item(id=idx, prompt=f"{q}\n{body}", solution=_wrap(lines, ans, style, f"So the answer is {ans}."),
                answer=ans, domain="mcqa",
                meta={"kind": "mcqa", "letters": letters, "style": style, "steps": steps, "question": kind,
                      "skills": [s for s in SKILLS if s in skills], "shards": shards, "options": opts})


def make_item(domain: str, split: str, index: int, seed: int = 0) -> Item:
    """The ``index``-th item of ``domain``/``split`` for ``seed`` (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = _rng(domain, split, seed, index)
    ood = split in OOD_SPLITS
    idx = f"toy-{domain}-{split}-{seed}-{index}"
    if domain == "math":
        if ood:
            return _math_item(rng, n_ops=4, idx=idx, signs="mixed")
        n = rng.choice((1, 2, 2, 3, 3, 4))
        return _math_item(rng, n_ops=n, idx=idx, signs="same" if n == 4 else "any")
    if domain == "code":
        if ood:
            return _code_item(rng, n_assign=4, if_at=rng.randint(0, 2), idx=idx)
        n = rng.randint(2, 4)
        use_if = n <= 3 and rng.random() < 0.5
        return _code_item(rng, n_assign=n, if_at=n - 1 if use_if else None, idx=idx)
    if domain == "mcqa":
        return _mcqa_item(rng, ood=ood, idx=idx)
    if domain == "records":
        from selfdistill.toy.records import records_item

        return records_item(rng, split, idx)
    raise ValueError(f"unknown toy domain {domain!r}; expected one of math, code, mcqa, records")


def restyle(item: Item, style: dict[str, Any], careful: frozenset[str] | set[str] = frozenset()) -> str:
    """``item``'s reference solution written in another ``style`` (careful: ones-digit lines on steps with those skills)."""
    m = item.meta
    if item.domain == "math":
        return math_solution(m["start"], [tuple(o) for o in m["ops"]], style, careful)
    if item.domain == "code":
        program = m["program"]
        out = program.rsplit("print(", 1)[1].rstrip(")")
        return code_solution(m["steps"], out, item.answer, style, careful)
    if item.domain == "mcqa":
        sp = style["spaced"]
        lines = []
        for a, op, b, c in m["steps"]:
            if cl := careful_line(a, op, b, sp, careful):
                lines.append(cl)
            lines.append(_fmt(a, op, b, c, sp))
        target = m["steps"][-1][3] if m["steps"] else (max(m["options"]) if m["question"] == "largest"
                                                        else min(m["options"]))
        if not m["steps"]:
            lines = [f"{m['question']} is {target}"]
        opt_line = f"option {item.answer} is {target}"
        lines = [opt_line] + lines if style.get("option_first") else lines + [opt_line]
        return _wrap(lines, item.answer, style, f"So the answer is {item.answer}.")
    raise ValueError(f"restyle: no styles for domain {item.domain!r}")


def style_of(completion: str) -> dict[str, Any]:
    """The surface style of a completion, read back from its text (for measuring style shifts)."""
    lines = [ln for ln in completion.strip().split("\n") if ln.strip()]
    first = lines[0].strip() if lines else ""
    pre = PREAMBLES.index(first) if first in PREAMBLES[1:] else 0
    work = [ln for ln in lines if "=" in ln and not ln.startswith(ANSWER_MARKER)]
    spaced = sum(" = " in ln for ln in work) * 2 >= len(work) if work else False
    closing = any(ln.startswith("So ") for ln in lines)
    return {"spaced": bool(spaced), "preamble": pre, "closing": closing}


@lru_cache(maxsize=64)
def _items(domain: str, split: str, n: int, seed: int) -> tuple[Item, ...]:
    return tuple(make_item(domain, split, i, seed) for i in range(n))


@dataclass(frozen=True)
class ToyTask:
    """One toy domain as a :class:`~selfdistill.tasks.base.Task`."""

    domain: str
    seed: int = 0
    train_size: int = DEFAULT_SIZES["train"]
    test_size: int = DEFAULT_SIZES["test_id"]

    @property
    def name(self) -> str:
        return f"toy-{self.domain}"

    def items(self, split: str) -> list[Item]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for {self.name}; expected one of {SPLITS}")
        n = self.train_size if split == "train" else self.test_size
        return list(_items(self.domain, split, n, self.seed))

    def verify(self, item: Item, completion: str) -> bool:
        from selfdistill.tasks.verify import verify_item

        return verify_item(item, completion)


def toy_tasks(seed: int = 0, domains: tuple[str, ...] = ("math", "code", "mcqa"), **kw: int) -> list[ToyTask]:
    """The toy world's tasks, one per domain."""
    return [ToyTask(d, seed=seed, **kw) for d in domains]
