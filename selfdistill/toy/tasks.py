"""The toy world: seeded procedural tasks in the SPD paper's three domains.

Each domain has a ``train`` split, a ``valid`` split (same distribution, for
choosing settings), an in-domain ``test_id`` split and a harder out-of-domain
``test_ood`` split. Every item carries a worked reference
solution that ends with ``#### answer``, so the same verifiers and answer-span
selectors serve toy and real data.

- math: multi-step integer arithmetic (a 2-digit number, then +/- operands
  up to 19), one worked line per operation; OOD has more steps.
- code: predict what a short straight-line Python program prints; the worked
  solution traces each assignment; OOD programs are longer and use ``if``.
- mcqa: "which option equals ...?" and "which option is largest?" questions
  with lettered options; OOD has six options and other phrasing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from selfdistill.tasks.base import ANSWER_MARKER, Item

SPLITS = ("train", "valid", "test_id", "test_ood")
DEFAULT_SIZES = {"train": 4000, "valid": 100, "test_id": 100, "test_ood": 100}
_SPLIT_SALT = {"train": 11, "valid": 17, "test_id": 23, "test_ood": 37}


def _rng(domain: str, split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{domain}/{split}/{seed}/{index}/{_SPLIT_SALT[split]}")


# ---------------------------------------------------------------- math
def _math_item(rng: random.Random, steps: int, idx: str) -> Item:
    value = rng.randint(10, 99)
    expr = str(value)
    lines = []
    for _ in range(steps):
        op = rng.choice("+-")
        operand = rng.randint(2, 19)
        if op == "-" and operand > value:
            op = "+"
        new = value + operand if op == "+" else value - operand
        lines.append(f"{value}{op}{operand}={new}")
        expr += f"{op}{operand}"
        value = new
    prompt = f"Compute {expr}"
    solution = "\n".join(lines) + f"\n{ANSWER_MARKER} {value}"
    return Item(id=idx, prompt=prompt, solution=solution, answer=str(value), domain="math",
                meta={"kind": "math"})


# ---------------------------------------------------------------- code
_VARS = "abcdxyz"


def _code_item(rng: random.Random, n_assign: int, use_if: bool, idx: str) -> Item:
    env: dict[str, int] = {}
    prog: list[str] = []
    trace: list[str] = []
    names = rng.sample(_VARS, k=min(len(_VARS), n_assign))
    for i, name in enumerate(names):
        if i == 0 or rng.random() < 0.2:
            val = rng.randint(1, 9)
            prog.append(f"{name} = {val}")
            env[name] = val
            trace.append(f"{name} = {val}")
            continue
        src = rng.choice(list(env))
        op = rng.choice("+-*")
        k = rng.randint(2, 9) if op != "*" else rng.randint(2, 3)
        val = env[src] + k if op == "+" else env[src] - k if op == "-" else env[src] * k
        prog.append(f"{name} = {src} {op} {k}")
        trace.append(f"{name} = {env[src]} {op} {k} = {val}")
        env[name] = val
    if use_if:
        src = rng.choice(list(env))
        thr = rng.randint(0, 20)
        k = rng.randint(1, 9)
        prog.append(f"if {src} > {thr}:")
        prog.append(f"    {src} = {src} - {k}")
        if env[src] > thr:
            trace.append(f"{env[src]} > {thr}: {src} = {env[src]} - {k} = {env[src] - k}")
            env[src] -= k
        else:
            trace.append(f"{env[src]} <= {thr}: skip")
    out = names[-1] if rng.random() < 0.7 else rng.choice(names)
    prog.append(f"print({out})")
    answer = str(env[out])
    program = "\n".join(prog)
    prompt = "What does this print?\n" + program
    solution = "\n".join(trace) + f"\n{ANSWER_MARKER} {answer}"
    return Item(id=idx, prompt=prompt, solution=solution, answer=answer, domain="code",
                meta={"kind": "code_output", "program": program})


# ---------------------------------------------------------------- mcqa
_LETTERS = "ABCDEF"


def _mcqa_item(rng: random.Random, n_opts: int, ood: bool, idx: str) -> Item:
    letters = _LETTERS[:n_opts]
    if rng.random() < 0.5:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        op = rng.choice("+-")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        target = a + b if op == "+" else a - b
        pool = {target}
        while len(pool) < n_opts:
            pool.add(max(0, target + rng.randint(-6, 6)))
        opts = rng.sample(sorted(pool), k=n_opts)
        q = (f"Pick the letter whose value is {a}{op}{b}." if ood
             else f"Which option equals {a}{op}{b}?")
        work = f"{a}{op}{b}={target}"
    else:
        opts = rng.sample(range(1, 100), k=n_opts)
        target = max(opts)
        q = "Pick the letter of the biggest value." if ood else "Which option is largest?"
        work = f"largest is {target}"
    ans = letters[opts.index(target)]
    body = "\n".join(f"{l}) {v}" for l, v in zip(letters, opts))
    prompt = f"{q}\n{body}"
    solution = f"{work}\n{ANSWER_MARKER} {ans}"
    return Item(id=idx, prompt=prompt, solution=solution, answer=ans, domain="mcqa",
                meta={"kind": "mcqa", "letters": letters})


def make_item(domain: str, split: str, index: int, seed: int = 0) -> Item:
    """The ``index``-th item of ``domain``/``split`` for ``seed`` (deterministic)."""
    rng = _rng(domain, split, seed, index)
    ood = split == "test_ood"
    idx = f"toy-{domain}-{split}-{seed}-{index}"
    if domain == "math":
        return _math_item(rng, steps=3 if ood else 2, idx=idx)
    if domain == "code":
        return _code_item(rng, n_assign=rng.randint(4, 5) if ood else rng.randint(2, 3),
                          use_if=ood, idx=idx)
    if domain == "mcqa":
        return _mcqa_item(rng, n_opts=6 if ood else 4, ood=ood, idx=idx)
    raise ValueError(f"unknown toy domain {domain!r}; expected one of math, code, mcqa")


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
