"""OPCoD's teacher views (arXiv 2606.14368): own correct rollout + gated, anchored peer feedback.

Pure functions of the two models' rollouts on the same problems, so the
cognizance gate and the anchoring are tested without a model.

- :func:`gate_open`: does the peer *know* this problem? (``opcod.gate``)
- :func:`peer_feedback`: the feedback text built from the peer's best
  rollout, anchored to the problem (``opcod.anchor``);
- :func:`teacher_views`: per student rollout, the teacher's user message (or
  None: no teacher signal), with gate statistics for the logs.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Sequence

from selfdistill.method_configs import OPCoDConfig
from selfdistill.tasks.base import ANSWER_MARKER, Item

_NUM = re.compile(r"\d+(?:\.\d+)?")  # unsigned: a minus is usually an operator


@dataclass
class Attempts:
    """One model's rollouts on one problem: texts, verifier rewards, answer confidences (mean token log-prob)."""

    texts: list[str]
    rewards: list[float]
    confidences: list[float]

    @property
    def success(self) -> float:
        return sum(r > 0 for r in self.rewards) / max(1, len(self.rewards))

    def best(self) -> int | None:
        """The rollout to build feedback from: the most confident verified one, else the most confident."""
        if not self.texts:
            return None
        order = sorted(range(len(self.texts)), key=lambda i: (self.rewards[i] > 0, self.confidences[i]), reverse=True)
        return order[0]


def gate_open(cfg: OPCoDConfig, peer: Attempts, student_success: float = 0.0) -> bool:
    """The cognizance gate: whether the peer's feedback on this problem is given.

    verified: the peer's verified success rate is > 0 and >= ``min_peer_success``;
    confidence: its best rollout's answer confidence >= ``confidence_threshold``;
    both: the two; always / never. ``gate_relative`` also requires the peer's
    success rate to exceed the student's.
    """
    if cfg.gate == "never" or not peer.texts:
        return False
    verified = peer.success > 0 and peer.success >= cfg.min_peer_success
    best = peer.best()
    confident = best is not None and peer.confidences[best] >= cfg.confidence_threshold
    ok = {"verified": verified, "confidence": confident, "both": verified and confident, "always": True}[cfg.gate]
    if ok and cfg.gate_relative:
        ok = peer.success > student_success
    return ok


def problem_quantities(item: Item) -> list[str]:
    """The numbers of the problem statement, in order of first appearance."""
    return list(dict.fromkeys(_NUM.findall(item.prompt.replace(",", ""))))


def up_to_answer(text: str) -> str | None:
    """``text`` up to and including its final-answer line (``#### ...``); None if it has none."""
    idx = text.rfind(ANSWER_MARKER)
    if idx < 0:
        return None
    end = text.find("\n", idx)
    return (text if end < 0 else text[:end]).strip() or None


def peer_feedback(cfg: OPCoDConfig, item: Item, peer: Attempts) -> str | None:
    """Feedback from the peer's best rollout, or None when anchoring rejects it.

    Anchored (default): the problem's quantities are restated, the solution is
    kept up to its answer line, and feedback without an answer line or that
    mentions none of the problem's numbers (when it has some) is dropped.
    """
    best = peer.best()
    if best is None:
        return None
    solution = peer.texts[best].strip()
    quantities = ""
    if cfg.anchor:
        solution = up_to_answer(solution)
        if solution is None:
            return None
        qs = problem_quantities(item)
        if qs and not set(_NUM.findall(solution)) & set(qs):
            return None
        if qs:
            quantities = f"The problem's quantities: {', '.join(qs)}.\n"
    if not solution:
        return None
    return cfg.feedback_template.format(quantities=quantities, solution=solution)


def teacher_views(cfg: OPCoDConfig, items: Sequence[Item], student: Sequence[Attempts],
                  peer: Sequence[Attempts]) -> tuple[list[list[str | None]], dict[str, float]]:
    """Per problem, per student rollout: the teacher's user message (None = no signal), and statistics."""
    views: list[list[str | None]] = []
    opened = given = own_used = 0
    for item, mine, theirs in zip(items, student, peer):
        is_open = gate_open(cfg, theirs, mine.success)
        fb = peer_feedback(cfg, item, theirs) if is_open else None
        opened += is_open
        given += fb is not None
        row: list[str | None] = []
        for i in range(len(mine.texts)):
            context = ""
            if cfg.own_attempt == "other":
                others = [j for j in range(len(mine.texts)) if j != i and mine.rewards[j] > 0]
                if others:
                    j = others[random.Random(f"{item.id}/{i}").randrange(len(others))]
                    context += f"A correct attempt at this problem:\n{mine.texts[j].strip()}\n\n"
                    own_used += 1
            if fb is not None:
                context += f"Feedback from a peer:\n{fb}\n\n"
            row.append(cfg.template.format(problem=item.prompt, context=context) if context else None)
        views.append(row)
    n, rows = max(1, len(items)), max(1, sum(len(s.texts) for s in student))
    stats = {"gate_open_frac": opened / n, "feedback_frac": given / n, "own_attempt_frac": own_used / rows,
             "reward_mean": sum(sum(s.rewards) for s in student) / rows}
    return views, stats


def mean_answer_logprob(logprobs: Sequence[float], answer_mask: Sequence[int]) -> float:
    """Mean log-prob over the answer tokens; -inf when there are none (a rollout with no answer knows nothing)."""
    picked = [lp for lp, m in zip(logprobs, answer_mask) if m]
    return sum(picked) / len(picked) if picked else -math.inf
