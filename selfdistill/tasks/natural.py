"""The toy world's three generators rendered in natural language, for real instruction-tuned models.

The toy world's prompts (``Compute 47+8-15``) are written for a model trained
on them; a real chat model needs ordinary English. These tasks keep the toy
world's structures and split logic and change only the text and the
difficulty knobs:

- ``math``: an arithmetic word problem ("A shop has 47 apples. It sells 8
  apples. ... How many apples does the shop have now?"); the reference
  solution shows one line per step and ends with ``#### 54`` (GSM8K style).
- ``code``: a short "what does this print" Python program in the toy grammar
  (assignments, ``+ - *``, an optional ``if``); the answer is what it prints.
- ``mcqa``: "Which of the following is equal to 17 + 8?" or "... is the
  largest/smallest?" with lettered options; the answer is the letter.

Every prompt asks for ``#### <answer>`` at the end, which the project's
verifiers read (:func:`selfdistill.tasks.verify.verify_item`): math and code
output (kind ``printed_number``) take the number after the marker, else from
``\\boxed{}``, "the answer is", else the last number (SmolLM2-135M states a
printed value but never writes the marker after code); mcqa takes the letter
after the marker, else from "the answer is X" or a lone letter.
Out-of-domain splits (``valid_ood``, ``test_ood``) are harder in the toy
world's way: more steps, more options and two operations, an ``if`` on an
earlier variable. Items are pure functions of (domain, split, index, seed,
knobs). The knobs' defaults were chosen on ``valid`` for SmolLM2-135M-Instruct:
they are the easiest reasonable settings, since even there its sampled
accuracy (temperature 1) stays under 20% (``docs/real_model.md``).

The arithmetic (``apply``, ``step_skill``) and the split names come from
:mod:`selfdistill.toy.tasks`; its ``make_item`` is not called because its
difficulty is fixed and these tasks need it as a parameter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Union

from selfdistill.tasks.base import ANSWER_MARKER, Item
from selfdistill.toy.tasks import OOD_SPLITS, SKILLS, SPLITS, apply, step_skill

__all__ = ["MathKnobs", "CodeKnobs", "McqaKnobs", "NaturalTask", "make_natural_item", "SPLITS"]

Range = tuple[int, int]
_LETTERS = "ABCDEFGH"
_VARS = "abcdxyz"


@dataclass(frozen=True)
class MathKnobs:
    """Word problems: operations per problem (in domain / out of domain) and number ranges, inclusive."""

    steps: Range = (1, 1)
    ood_steps: Range = (2, 3)
    start: Range = (2, 10)
    operand: Range = (1, 5)


@dataclass(frozen=True)
class CodeKnobs:
    """Programs: assignments (in domain / out of domain), the chance of an ``if`` in domain, literal values.

    In domain the ``if`` only ever tests the last assigned variable; out of
    domain every program has one and it tests an earlier variable.
    """

    assigns: Range = (2, 2)
    ood_assigns: Range = (3, 3)
    if_rate: float = 0.25
    value: Range = (1, 9)

    def __post_init__(self) -> None:
        most = max(self.assigns[1], self.ood_assigns[1])
        if self.assigns[0] < 1 or self.ood_assigns[0] < 2 or most > len(_VARS):  # OOD: the if tests an earlier one
            raise ValueError(f"code assignments must lie in 1..{len(_VARS)} (out of domain 2..{len(_VARS)}), "
                             f"got {self.assigns} / {self.ood_assigns}")


@dataclass(frozen=True)
class McqaKnobs:
    """Multiple choice: options (in domain / out of domain) and operand range of the "equals" questions.

    Out of domain, "equals" questions have two operations instead of one.
    """

    options: Range = (3, 3)
    ood_options: Range = (4, 5)
    operand: Range = (2, 20)
    spread: int = 6  # distractors lie within +-spread of the right value

    def __post_init__(self) -> None:
        most = max(self.options[1], self.ood_options[1])
        if not 2 <= min(self.options[0], self.ood_options[0]) <= most <= len(_LETTERS):
            raise ValueError(f"mcqa options must lie in 2..{len(_LETTERS)}, got {self.options} / {self.ood_options}")
        if self.spread + 1 < most:  # an answer of 0 leaves spread + 1 distinct values to choose from
            raise ValueError(f"mcqa spread {self.spread} is too small for {most} distinct options")


Knobs = Union[MathKnobs, CodeKnobs, McqaKnobs]
_DEFAULT_KNOBS: dict[str, Knobs] = {"math": MathKnobs(), "code": CodeKnobs(), "mcqa": McqaKnobs()}


def _draw(rng: random.Random, r: Range) -> int:
    return rng.randint(r[0], r[1])


def _sentence_after(s: str) -> str:
    """``s`` as a sentence that follows "Then ": a leading pronoun is lower-cased."""
    first = s.split(" ", 1)[0]
    return s[0].lower() + s[1:] if first in ("It", "He", "She", "They") else s


# ---------------------------------------------------------------- math
#: (opening with {n}, adding sentence with {k}, removing sentence with {k}, question)
_SCENES = (
    ("A shop has {n} apples.", "It gets {k} more apples from a farm.", "It sells {k} apples.",
     "How many apples does the shop have now?"),
    ("Maria has {n} stickers.", "She buys {k} more stickers.", "She gives {k} stickers to her brother.",
     "How many stickers does Maria have now?"),
    ("A bus has {n} passengers.", "{k} passengers get on.", "{k} passengers get off.",
     "How many passengers are on the bus now?"),
    ("A library has {n} books.", "It receives {k} new books.", "It lends out {k} books.",
     "How many books does the library have now?"),
    ("Tom has {n} marbles.", "He wins {k} marbles.", "He loses {k} marbles.",
     "How many marbles does Tom have now?"),
    ("A baker has {n} cookies.", "She bakes {k} more cookies.", "She sells {k} cookies.",
     "How many cookies does the baker have now?"),
    ("A farmer has {n} sheep.", "He buys {k} more sheep.", "He sells {k} sheep.",
     "How many sheep does the farmer have now?"),
    ("A parking lot has {n} cars.", "{k} more cars arrive.", "{k} cars leave.",
     "How many cars are in the parking lot now?"),
)
MATH_INSTRUCTION = f"End your answer with '{ANSWER_MARKER} <number>'."


def _math_item(rng: random.Random, n_steps: int, k: MathKnobs, idx: str) -> Item:
    opening, add, sub, question = rng.choice(_SCENES)
    value = start = _draw(rng, k.start)
    story, work, steps = [opening.format(n=start)], [opening.format(n=start)], []
    for i in range(n_steps):
        op, n = rng.choice("+-"), _draw(rng, k.operand)
        if op == "-" and n > value:
            op = "+"
        text = (add if op == "+" else sub).format(k=n)
        text = "Then " + _sentence_after(text) if i else text
        new = apply(value, op, n)
        story.append(text)
        work.append(f"{text[:-1]}: {value} {op} {n} = {new}.")
        steps.append((value, op, n, new))
        value = new
    prompt = " ".join(story + [question]) + "\n\n" + MATH_INSTRUCTION
    skills = {step_skill(a, op, b) for a, op, b, _ in steps}
    return Item(id=idx, prompt=prompt, solution="\n".join(work + [f"{ANSWER_MARKER} {value}"]), answer=str(value),
                domain="math", meta={"kind": "math", "steps": steps, "skills": [s for s in SKILLS if s in skills]})


# ---------------------------------------------------------------- code
CODE_INSTRUCTION = f"Work through it line by line, then end your answer with '{ANSWER_MARKER} <printed value>'."


def _code_item(rng: random.Random, n_assign: int, if_at: int | None, k: CodeKnobs, idx: str) -> Item:
    """A straight-line program (the toy grammar); ``if_at``: index of the variable the ``if`` tests."""
    env: dict[str, int] = {}
    prog, work = [], []
    skills: set[str | None] = set()
    names = rng.sample(_VARS, k=n_assign)
    for i, name in enumerate(names):
        if i == 0 or rng.random() < 0.2:
            env[name] = _draw(rng, k.value)
            prog.append(f"{name} = {env[name]}")
            work.append(f"{name} = {env[name]}")
        else:
            src, op = rng.choice(list(env)), rng.choice("+-*")
            n = rng.randint(2, 3) if op == "*" else _draw(rng, k.value)
            env[name] = apply(env[src], op, n)
            prog.append(f"{name} = {src} {op} {n}")
            work.append(f"{name} = {src} {op} {n} = {env[src]} {op} {n} = {env[name]}")
            skills.add(step_skill(env[src], op, n))
    if if_at is not None:
        tgt, thr, n = names[if_at], rng.randint(0, 20), _draw(rng, k.value)
        prog += [f"if {tgt} > {thr}:", f"    {tgt} = {tgt} - {n}"]
        if env[tgt] > thr:
            work.append(f"{tgt} > {thr} is true ({env[tgt]} > {thr}), so {tgt} = {env[tgt]} - {n} = {env[tgt] - n}")
            env[tgt] -= n
        else:
            work.append(f"{tgt} > {thr} is false ({env[tgt]} <= {thr}), so {tgt} stays {env[tgt]}")
        skills.add("branch")
    if if_at is not None and rng.random() < 0.5:  # print the variable the if changed, or mostly the last one
        out = names[if_at]
    else:
        out = names[-1] if rng.random() < 0.7 else rng.choice(names)
    prog.append(f"print({out})")
    program, answer = "\n".join(prog), str(env[out])
    work.append(f"print({out}) prints {answer}.")
    prompt = f"What does this Python program print?\n\n```python\n{program}\n```\n\n{CODE_INSTRUCTION}"
    return Item(id=idx, prompt=prompt, solution="\n".join(work + [f"{ANSWER_MARKER} {answer}"]), answer=answer,
                domain="code", meta={"kind": "printed_number", "program": program,
                                     "skills": [s for s in SKILLS if s in skills]})


# ---------------------------------------------------------------- mcqa
MCQA_INSTRUCTION = f"Which letter is correct? End your answer with '{ANSWER_MARKER} <letter>'."


def _mcqa_item(rng: random.Random, n_opts: int, n_ops: int, k: McqaKnobs, idx: str) -> Item:
    """An "equals a op b [op c]" or a "largest/smallest" question with ``n_opts`` lettered options."""
    kind = rng.choice(("equals", "equals", "largest", "smallest"))
    letters = _LETTERS[:n_opts]
    steps: list[tuple[int, str, int, int]] = []
    if kind == "equals":
        value = _draw(rng, k.operand)
        for _ in range(n_ops):
            op, n = rng.choice("+-"), _draw(rng, k.operand)
            if op == "-" and n > value:
                op = "+"
            steps.append((value, op, n, apply(value, op, n)))
            value = steps[-1][3]
        pool = {value}
        while len(pool) < n_opts:
            pool.add(max(0, value + rng.randint(-k.spread, k.spread)))
        opts = rng.sample(sorted(pool), k=n_opts)
        expr = " ".join([str(steps[0][0])] + [f"{op} {n}" for _, op, n, _ in steps])
        question, work = f"Which of the following is equal to {expr}?", [f"{expr} = {value}."]
    else:
        opts = rng.sample(range(1, 100), k=n_opts)
        value = max(opts) if kind == "largest" else min(opts)
        question, work = f"Which of the following numbers is the {kind}?", [f"The {kind} number is {value}."]
    answer = letters[opts.index(value)]
    options = "\n".join(f"{letter}. {v}" for letter, v in zip(letters, opts))
    prompt = f"{question}\n\n{options}\n\n{MCQA_INSTRUCTION}"
    solution = "\n".join(work + [f"Option {answer} is {value}.", f"{ANSWER_MARKER} {answer}"])
    skills = {step_skill(a, op, b) for a, op, b, _ in steps} | ({"compare"} if kind != "equals" else set())
    return Item(id=idx, prompt=prompt, solution=solution, answer=answer, domain="mcqa",
                meta={"kind": "mcqa", "letters": letters, "options": opts, "question": kind, "steps": steps,
                      "skills": [s for s in SKILLS if s in skills]})


# ---------------------------------------------------------------- items and tasks
def make_natural_item(domain: str, split: str, index: int, seed: int = 0, knobs: Knobs | None = None) -> Item:
    """The ``index``-th natural-language item of ``domain``/``split`` for ``seed`` and ``knobs`` (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if domain not in _DEFAULT_KNOBS:
        raise ValueError(f"unknown natural-language domain {domain!r}; expected math, code or mcqa")
    k = knobs or _DEFAULT_KNOBS[domain]
    if not isinstance(k, type(_DEFAULT_KNOBS[domain])):
        raise TypeError(f"{domain} items need {type(_DEFAULT_KNOBS[domain]).__name__}, got {type(k).__name__}")
    rng = random.Random(f"nl/{domain}/{split}/{seed}/{index}")
    ood = split in OOD_SPLITS
    idx = f"nl-{domain}-{split}-{seed}-{index}"
    if isinstance(k, MathKnobs):
        return _math_item(rng, _draw(rng, k.ood_steps if ood else k.steps), k, idx)
    if isinstance(k, CodeKnobs):
        if ood:
            n = _draw(rng, k.ood_assigns)
            return _code_item(rng, n, rng.randint(0, n - 2), k, idx)
        n = _draw(rng, k.assigns)
        return _code_item(rng, n, n - 1 if rng.random() < k.if_rate else None, k, idx)
    return _mcqa_item(rng, _draw(rng, k.ood_options if ood else k.options), 2 if ood else 1, k, idx)


@lru_cache(maxsize=64)
def _items(domain: str, split: str, n: int, seed: int, knobs: Knobs | None) -> tuple[Item, ...]:
    return tuple(make_natural_item(domain, split, i, seed, knobs) for i in range(n))


@dataclass(frozen=True)
class NaturalTask:
    """One natural-language domain (``nl-math``, ``nl-code``, ``nl-mcqa``) as a task (``Task`` protocol).

    ``knobs`` (None: the domain's defaults) set the difficulty; sizes as in the toy world.
    """

    domain: str
    seed: int = 0
    train_size: int = 4000
    test_size: int = 100
    knobs: Knobs | None = field(default=None)

    @property
    def name(self) -> str:
        return f"nl-{self.domain}"

    def items(self, split: str) -> list[Item]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for {self.name}; expected one of {SPLITS}")
        n = self.train_size if split == "train" else self.test_size
        return list(_items(self.domain, split, n, self.seed, self.knobs))

    def verify(self, item: Item, completion: str) -> bool:
        from selfdistill.tasks.verify import verify_item

        return verify_item(item, completion)

