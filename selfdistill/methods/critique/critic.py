"""Frozen critics: a critique aligned step by step to the student's own trace.

- :func:`exact_critique` (toy world): the steps are recomputed from the problem
  (:mod:`selfdistill.toy.steps`); line i of the trace is checked against step i
  (``chain=True``: a step that starts from a wrong earlier value is wrong too)
  or only for its own arithmetic (``chain=False``); correct lines are kept
  verbatim, wrong ones replaced by the right line, missing ones added, and the
  answer line is checked with the task's verifier.
- :class:`ModelCritic` (any data): a frozen local model asked through a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from selfdistill.sequences import fill_template
from selfdistill.tasks.base import ANSWER_MARKER, Item
from selfdistill.toy.steps import CODE_STEP_RE, apply, expected_steps, format_step, is_text_line, parse_step
from selfdistill.toy.templates import CRITIQUE_MARK, MISSING_MARK  # one format: the toy pretraining reads it too


@dataclass
class StepCheck:
    """One line of the student's trace and the critic's verdict.

    ``original`` is None for a step the student left out; ``corrected`` is
    None for a line that should not be there; ``span`` is the line's
    character span in the completion (None when left out); ``kind`` is
    ``step``, ``answer`` or ``text`` (not checked).
    """

    original: str | None
    corrected: str | None
    ok: bool
    kind: str
    span: tuple[int, int] | None = None


@dataclass
class Critique:
    """The checked trace."""

    checks: list[StepCheck]

    @property
    def wrong(self) -> list[StepCheck]:
        return [c for c in self.checks if not c.ok]

    def corrected_trace(self) -> str:
        """The trace with every wrong line replaced by its correction (correct lines verbatim)."""
        out = []
        for c in self.checks:
            line = c.original if c.ok else c.corrected
            if line is not None:
                out.append(line)
        return "\n".join(out)

    def render(self) -> str:
        """The critique as the teacher reads it: correct lines verbatim, wrong ones corrected and marked."""
        out = []
        for c in self.checks:
            if c.ok:
                out.append(c.original or "")
            elif c.original is None:
                out.append(f"{c.corrected}{MISSING_MARK}")
            elif c.corrected is None:
                out.append(f"(not needed: {c.original.strip()})")
            else:
                out.append(c.corrected + CRITIQUE_MARK.format(orig=c.original.strip()))
        return "\n".join(out)


def _lines(text: str) -> list[tuple[str, tuple[int, int]]]:
    out, pos = [], 0
    for line in text.split("\n"):
        out.append((line, (pos, pos + len(line))))
        pos += len(line) + 1
    return out


def _same(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())


def _local_check(line: str) -> tuple[bool, str] | None:
    """(ok, corrected line) from the line's own arithmetic, or None if it has none."""
    p = parse_step(line)
    if p is not None:
        a, op, b, c = p
        right = apply(a, op, b)
        return right == c, format_step(a, op, b, right, spaced=" " in line.strip())
    m = CODE_STEP_RE.match(line)
    if m is not None:
        v, op, k, r = int(m.group(4)), m.group(5), int(m.group(6)), int(m.group(7))
        right = apply(v, op, k)
        head = line[: m.start(7)]
        return right == r, f"{head}{right}".strip()
    return None


def exact_critique(item: Item, completion: str, chain: bool = True) -> Critique | None:
    """The step-aligned critique of ``completion`` for a toy item, or None if its steps are unknown."""
    from selfdistill.tasks.verify import verify_item

    expected = expected_steps(item)
    if expected is None:
        return None
    body = _lines(completion)
    if item.domain == "mcqa":  # the option line may come first (a style): check in the order written
        first = next((ln.strip() for ln, _ in body if ln.strip() and not is_text_line(ln)
                      and ANSWER_MARKER not in ln), "")
        if first.startswith("option ") and expected and expected[-1].startswith("option "):
            expected = [expected[-1]] + expected[:-1]
    answer_at = max((i for i, (ln, _) in enumerate(body) if ANSWER_MARKER in ln), default=None)
    steps: list[StepCheck] = []
    i = 0
    for j, (line, span) in enumerate(body):
        if not line.strip() or j == answer_at:
            continue
        if ANSWER_MARKER in line or is_text_line(line):  # earlier answer lines, style and asides: not steps
            steps.append(StepCheck(line, line, True, "text", span))
            continue
        exp = expected[i] if i < len(expected) else None
        if chain or (local := _local_check(line)) is None:
            ok = exp is not None and _same(line, exp)
            steps.append(StepCheck(line, line if ok else exp, ok, "step", span))
        else:
            steps.append(StepCheck(line, line if local[0] else local[1], local[0], "step", span))
        i += 1
    if chain:
        steps += [StepCheck(None, exp, False, "step") for exp in expected[i:]]
    want = f"{ANSWER_MARKER} {item.answer}"
    if answer_at is None:
        steps.append(StepCheck(None, want, False, "answer"))
    else:
        line, span = body[answer_at]
        ok = verify_item(item, line)
        steps.append(StepCheck(line, line if ok else want, ok, "answer", span))
    return Critique(steps)


class ModelCritic:
    """A frozen local model that writes a step-by-step critique through ``template`` (greedy)."""

    def __init__(self, model, tokenizer, template: str, max_new_tokens: int = 128, system: str | None = None,
                 batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens, self.system, self.batch_size = max_new_tokens, system, batch_size

    def prompt(self, item: Item, attempt: str) -> str:
        return fill_template(self.template, "critique template", problem=item.prompt, answer=item.answer,
                             attempt=attempt)

    def __call__(self, items: Sequence[Item], attempts: Sequence[str]) -> list[str]:
        from selfdistill.models import unwrap
        from selfdistill.rollout import SamplingConfig, generate
        from selfdistill.sequences import chat_prompt

        if not items:
            return []
        prompts = [chat_prompt(self.tokenizer, self.prompt(it, a), self.system) for it, a in zip(items, attempts)]
        cfg = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                             batch_size=self.batch_size)
        return [t.strip() for t in generate(unwrap(self.model), self.tokenizer, prompts, cfg).texts]
