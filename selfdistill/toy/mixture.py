"""The toy model's pretraining mixture: what the shipped model has read, and which method each part serves.

Every example is a pure function of (seed, index): a conversation (user and
assistant turns) and which assistant turns carry the loss. Shares are of
examples (``SHARES``; their token shares are measured in docs/toy_world.md):

- ``plain`` (all methods; SPD's style-vs-capability question): problem ->
  solution in one of several styles.
- ``records`` (SafeSteer; long-range lookup): a 3-24-record table and a
  question, answered, or refused for two forbidden categories. A reading
  curriculum: the largest table grows from 4 to 24 records over the first
  ``CURRICULUM`` examples.
- ``copy`` (every context-reading method): another item's problem and
  solution, or a random digit/word string, copied exactly; lengths grow
  over the same curriculum. v2's model never formed the copy it needed
  (records lookup 0.3%, a math reference changed nothing).
- privileged context (OPSD, SDFT, SDPO): ``reference`` (restyled, never
  copied), ``demonstration`` (same problem, the target follows its style),
  ``example`` (another item of the domain, worked), ``correct_attempt``,
  ``wrong_attempt`` (marked incorrect), ``hint``, ``partial``.
- feedback (step-aligned critique, SDPO): ``verdict`` (attempt + correct /
  incorrect) and ``critique`` (attempt checked line by line, wrong lines
  corrected) -> a correct solution.
- ``skill`` (SGSD): ``skill: carry`` lines; the solution then writes a
  ones-digit line before every step of that operation (more careful there).
- ``sharded`` / ``concat`` (CCOPD): the problem's shards over 2-3 user turns
  (evaluation uses all of them: 3-6) or in one turn.
- ``peer`` (OPCoD): another model's solution, right or wrong, in context.

Context templates are the ``PRETRAIN`` paraphrases of
:mod:`selfdistill.toy.templates`; the held-out ones are never used here.
"""

from __future__ import annotations

import random
from typing import Any

from selfdistill.tasks.base import ANSWER_MARKER, Item
from selfdistill.toy import templates as T
from selfdistill.toy.records import records_item
from selfdistill.toy.tasks import SKILLS, _wrap, apply, draw_style, make_item, restyle

SHARES: dict[str, float] = {
    "plain": 0.33, "records": 0.06, "copy": 0.05, "reference": 0.07, "demonstration": 0.04, "example": 0.03,
    "correct_attempt": 0.04, "wrong_attempt": 0.03, "hint": 0.03, "partial": 0.03, "verdict": 0.04,
    "critique": 0.05, "skill": 0.08, "sharded": 0.07, "concat": 0.03, "peer": 0.02,
}
ITEM_DOMAINS = ("math", "code", "mcqa")
#: Item domains are drawn with these weights (v2 drew them uniformly and math sat at 6% in domain).
DOMAIN_WEIGHTS = (0.4, 0.3, 0.3)
#: Examples over which the reading curriculum (records per table, copy length) grows to its full size.
CURRICULUM = 40_000
#: Pretraining draws problems from this many train-split indices per domain.
POOL = 50_000

Messages = list[dict[str, str]]


def wrong_attempt(rng: random.Random, item: Item, style: dict[str, Any]) -> tuple[str, str]:
    """(a wrong attempt, the same attempt's correct version), in ``style``, differing in one step's result
    and everything after it (math, mcqa-equals), or in the final answer (code, mcqa otherwise)."""
    right = restyle(item, style)
    m = item.meta
    if item.domain in ("math", "mcqa") and m.get("steps"):
        steps = [list(s) for s in m["steps"]]
        j = rng.randrange(len(steps))
        bad = steps[j][3] + rng.choice((-10, -2, -1, 1, 2, 10))
        if bad < 0:
            bad = steps[j][3] + 1
        steps[j][3] = bad
        for s in steps[j + 1:]:
            s[0] = bad
            s[3] = bad = apply(s[0], s[1], s[2])
        if item.domain == "math":  # the corrupted lines as written (recomputing from the ops would fix them)
            wrong = _render_steps(steps, style, str(steps[-1][3]), f"So the result is {steps[-1][3]}.")
            return wrong, right
        letters = m["letters"]
        opts = m["options"]
        ans = letters[opts.index(bad)] if bad in opts else rng.choice([l for l in letters if l != item.answer])
        wrong_lines = right.split("\n")
        fixed = [_fmt_step(s, style) for s in steps]
        out, k = [], 0
        for ln in wrong_lines:
            if "=" in ln and k < len(fixed):
                out.append(fixed[k])
                k += 1
            elif ln.startswith("option "):
                out.append(f"option {ans} is {bad}")
            elif ln.startswith(ANSWER_MARKER):
                out.append(f"{ANSWER_MARKER} {ans}")
            elif ln.startswith("So "):
                out.append(f"So the answer is {ans}.")
            else:
                out.append(ln)
        return "\n".join(out), right
    # final answer only
    if item.domain == "code":
        wrong_ans = str(int(item.answer) + rng.choice((-3, -1, 1, 2, 5)))
    else:
        wrong_ans = rng.choice([l for l in m["letters"] if l != item.answer])
    lines = right.split("\n")
    lines = [f"{ANSWER_MARKER} {wrong_ans}" if ln.startswith(ANSWER_MARKER) else
             ln.replace(item.answer, wrong_ans) if ln.startswith("So ") else ln for ln in lines]
    return "\n".join(lines), right


def _fmt_step(s, style) -> str:
    a, op, b, c = s
    return f"{a} {op} {b} = {c}" if style["spaced"] else f"{a}{op}{b}={c}"


def _render_steps(steps, style, answer: str, closing: str) -> str:
    return _wrap([_fmt_step(s, style) for s in steps], answer, style, closing)


def critique_text(wrong: str, right: str) -> str:
    """``wrong`` checked line by line against ``right`` (same style): equal lines verbatim, others corrected."""
    out = []
    for w, r in zip(wrong.split("\n"), right.split("\n")):
        out.append(w if w == r else r + T.CRITIQUE_MARK.format(orig=w.strip()))
    return "\n".join(out)


def copy_text(rng: random.Random, seed: int, max_tokens: int) -> str:
    """Text to copy: worked items of the three domains, or random digits and words, of roughly
    ``max_tokens`` tokens at most (a character counts as a token for digits; words are single tokens)."""
    budget = rng.randint(max(8, max_tokens // 4), max_tokens)
    parts: list[str] = []
    size = 0
    while size < budget:
        if rng.random() < 0.5:
            it = make_item(rng.choice(ITEM_DOMAINS), "train", rng.randrange(POOL), seed)
            piece = f"{it.prompt}\n{restyle(it, draw_style(rng, it.domain))}"
        else:
            piece = " ".join(str(rng.randint(0, 9999)) if rng.random() < 0.6 else rng.choice(_COPY_WORDS)
                             for _ in range(rng.randint(3, 12)))
        parts.append(piece)
        size += len(piece) // 2
    return "\n".join(parts)


_COPY_WORDS = ("room", "code", "public", "secret", "key", "id", "value", "step", "answer", "option", "print",
               "the", "is", "of", "and", "then", "so", "result")


def skill_lines(skills: list[str]) -> str:
    return "\n".join(f"skill: {s}" for s in skills)


def group_shards(shards: list[str], turns: int) -> list[str]:
    """``shards`` merged into ``turns`` contiguous user turns (near-equal sizes)."""
    turns = max(1, min(turns, len(shards)))
    size, extra = divmod(len(shards), turns)
    out, pos = [], 0
    for i in range(turns):
        k = size + (1 if i < extra else 0)
        out.append("\n".join(shards[pos:pos + k]))
        pos += k
    return out


def _pick(rng: random.Random) -> str:
    r, acc = rng.random() * sum(SHARES.values()), 0.0
    for name, share in SHARES.items():
        acc += share
        if r < acc:
            return name
    return "plain"


def example(seed: int, index: int) -> tuple[str, Messages, list[bool]]:
    """The ``index``-th pretraining example: (component, messages, loss on each assistant turn)."""
    rng = random.Random(f"mix/{seed}/{index}")
    comp = _pick(rng)
    grow = min(1.0, index / CURRICULUM)
    if comp == "records":
        it = records_item(random.Random(f"mix-records/{seed}/{index}"), "train", f"mix-{index}",
                          max_records=4 + round(20 * grow))
        return comp, [_u(it.prompt), _a(it.solution)], [True]
    if comp == "copy":
        text = copy_text(rng, seed, max_tokens=16 + round(200 * grow))
        return comp, [_u(rng.choice(T.COPY).format(text=text)), _a(text)], [True]
    domain = rng.choices(ITEM_DOMAINS, DOMAIN_WEIGHTS)[0]
    it = make_item(domain, "train", rng.randrange(POOL), seed)
    target_style = draw_style(rng, domain)
    target = restyle(it, target_style)
    tpl = rng.choice(T.PRETRAIN.get(comp, ("{problem}",)))
    if comp == "plain":
        return comp, [_u(it.prompt), _a(it.solution)], [True]
    if comp in ("reference", "correct_attempt"):
        ctx = restyle(it, draw_style(rng, domain))
        return comp, [_u(T.fill(tpl, it.prompt, ctx)), _a(target)], [True]
    if comp == "demonstration":
        demo_style = draw_style(rng, domain)
        return comp, [_u(T.fill(tpl, it.prompt, restyle(it, demo_style))), _a(restyle(it, demo_style))], [True]
    if comp == "example":
        other = make_item(domain, "train", rng.randrange(POOL), seed)
        st = draw_style(rng, domain)
        ctx = f"{other.prompt}\n{restyle(other, st)}"
        return comp, [_u(T.fill(tpl, it.prompt, ctx)), _a(restyle(it, st))], [True]
    if comp in ("wrong_attempt", "verdict", "critique", "peer"):
        st = draw_style(rng, domain)
        correct_shown = comp in ("verdict", "peer") and rng.random() < 0.4
        wrong, right = wrong_attempt(rng, it, st)
        shown = right if correct_shown else wrong
        if comp == "critique":
            ctx = critique_text(wrong, right)
            return comp, [_u(T.fill(tpl, it.prompt, ctx)), _a(target)], [True]
        kw = {"verdict": "correct" if correct_shown else "incorrect"} if comp == "verdict" else {}
        return comp, [_u(T.fill(tpl, it.prompt, shown, **kw)), _a(target)], [True]
    if comp == "hint":
        steps = it.meta.get("steps") or []
        if steps and rng.random() < 0.5 and it.domain != "code":
            hint = f"the first step gives {steps[0][3]}."
        else:
            hint = f"the answer is {it.answer}."
        return comp, [_u(T.fill(tpl, it.prompt, hint)), _a(target)], [True]
    if comp == "partial":
        lines = target.split("\n")
        lo = 2 if target_style["preamble"] else 1  # at least one worked line beyond the preamble
        k = rng.randint(lo, max(lo, len(lines) - 2))
        return comp, [_u(T.fill(tpl, it.prompt, "\n".join(lines[:k]))), _a(target)], [True]
    if comp == "skill":
        have = list(it.meta.get("skills") or [])
        if have and rng.random() < 0.8:
            hinted = [s for s in have if rng.random() < 0.85] or have[:1]
        else:
            hinted = [rng.choice(SKILLS)]
        careful = set(hinted) & {"carry", "borrow"}
        return comp, [_u(T.fill(tpl, it.prompt, skill_lines(hinted))), _a(restyle(it, target_style, careful))], [True]
    if comp in ("sharded", "concat"):
        shards = it.meta["shards"]
        if comp == "concat":
            return comp, [_u("\n".join(shards)), _a(target)], [True]
        turns = group_shards(shards, rng.choice((2, 2, 3)))
        msgs: Messages = []
        for t in turns[:-1]:
            msgs += [_u(t), _a(rng.choice(T.ACKS))]
        msgs += [_u(turns[-1]), _a(target)]
        return comp, msgs, [True] * len(turns)
    raise AssertionError(comp)


def _u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}
