"""Context templates of the toy world: the paraphrases seen in pretraining, and held-out ones.

A teacher view should work because the model *reads* the context, not because
it recognises a template. So pretraining uses the ``PRETRAIN`` paraphrases of
each context kind, and the methods' default templates (and the
preconditions check) use the ``HELD_OUT`` ones, which never occur in
pretraining but are made of words that do (:func:`vocabulary` checks it).
Placeholders: ``{problem}`` and ``{ctx}``.
"""

from __future__ import annotations

import re

PRETRAIN: dict[str, tuple[str, ...]] = {
    "reference": (
        "{problem}\n\nReference solution:\n{ctx}\n\nSolve the problem in your own words.",
        "{problem}\n\nA worked solution is shown below.\n{ctx}\n\nNow write your own solution.",
        "Problem:\n{problem}\n\nSolution from a teacher:\n{ctx}\n\nWrite a solution of your own.",
        "{problem}\n\nSomeone solved it like this:\n{ctx}\n\nGive your solution.",
    ),
    "demonstration": (
        "{problem}\n\nA good answer looks like this:\n{ctx}\n\nAnswer the same way.",
        "Here is an answer to learn from:\n{ctx}\n\nNow the problem:\n{problem}",
        "{problem}\n\nModel answer:\n{ctx}\n\nWrite your answer like the model answer.",
    ),
    "example": (
        "Here is a worked example.\n{ctx}\n\nNow solve this problem the same way:\n{problem}",
        "Example:\n{ctx}\n\nProblem:\n{problem}",
        "{problem}\n\nA similar problem, solved:\n{ctx}\n\nSolve the problem above.",
    ),
    "correct_attempt": (
        "{problem}\n\nThis attempt is correct:\n{ctx}\n\nGive your own solution.",
        "{problem}\n\nA successful attempt:\n{ctx}\n\nNow solve it yourself.",
        "{problem}\n\nAn attempt that got the right answer:\n{ctx}\n\nWrite your solution.",
    ),
    "wrong_attempt": (
        "{problem}\n\nThis attempt is wrong:\n{ctx}\n\nGive a correct solution.",
        "{problem}\n\nAn incorrect attempt:\n{ctx}\n\nNow solve it correctly.",
        "{problem}\n\nAn attempt with a mistake:\n{ctx}\n\nWrite a correct solution.",
    ),
    "verdict": (
        "{problem}\n\nAn earlier attempt:\n{ctx}\n\nThat attempt was {verdict}. Solve the problem.",
        "{problem}\n\nFirst try:\n{ctx}\n\nVerdict: {verdict}. Give your solution.",
        "{problem}\n\nA previous answer:\n{ctx}\n\nIt was {verdict}. Now write the solution.",
        "{problem}\n\nYour earlier answer:\n{ctx}\n\nThis answer was {verdict}. Solve it again.",
    ),
    "critique": (
        "{problem}\n\nAn earlier attempt, checked line by line:\n{ctx}\n\nWrite the corrected solution.",
        "{problem}\n\nChecked attempt (wrong lines corrected):\n{ctx}\n\nSolve the problem.",
        "{problem}\n\nFeedback on each step of a previous attempt:\n{ctx}\n\nNow give the solution.",
    ),
    "hint": (
        "{problem}\n\nHint: {ctx}\n\nUse the hint.",
        "{problem}\n\nA hint: {ctx}",
        "Hint: {ctx}\n\n{problem}",
    ),
    "partial": (
        "{problem}\n\nThe start of a solution:\n{ctx}\n\nFinish the solution.",
        "{problem}\n\nBegin from these lines:\n{ctx}",
        "{problem}\n\nFirst steps:\n{ctx}\n\nComplete the solution.",
    ),
    "skill": (
        "{ctx}\n\n{problem}",
        "Skills to use:\n{ctx}\n\n{problem}",
        "{problem}\n\nRemember:\n{ctx}",
        "Apply these skills:\n{ctx}\n\n{problem}",
    ),
    "peer": (
        "{problem}\n\nA friend solved it:\n{ctx}\n\nGive your solution.",
        "{problem}\n\nAnother student wrote:\n{ctx}\n\nNow write your own solution.",
    ),
}

#: Held out of pretraining; the methods' default teacher templates.
HELD_OUT: dict[str, str] = {
    "reference": "{problem}\n\nHere is a reference solution:\n{ctx}\n\nUse it to solve the problem in your own words.",
    "demonstration": "{problem}\n\nAn example of a good answer:\n{ctx}\n\nWrite your answer in the same way.",
    "correct_attempt": "{problem}\n\nHere is a correct attempt:\n{ctx}\n\nUse it to solve the problem in your own words.",
    "verdict": "{problem}\n\nYour previous attempt:\n{ctx}\n\nYour previous attempt was {verdict}. Now solve the problem.",
    "critique": ("{problem}\n\nYour previous attempt, checked step by step (wrong steps corrected):\n{ctx}\n\n"
                 "Now solve the problem."),
    "skill": "{problem}\n\nUse these skills:\n{ctx}",
    "peer": "{problem}\n\nA student wrote this:\n{ctx}\n\nUse it to solve the problem in your own words.",
}

ACKS = ("Noted.", "Got it.", "OK, go on.")
#: Instructions of the pretraining ``copy`` part (exact copies; no method uses them).
COPY = ("Copy this exactly:\n{text}", "Repeat the text below.\n{text}", "{text}\n\nWrite the text above again.")
CRITIQUE_MARK = "   <- corrected (you wrote: {orig})"
MISSING_MARK = "   <- missing step"

_WORD = re.compile(r"[A-Za-z]{2,}")


def fill(template: str, problem: str, ctx: str, **kw: str) -> str:
    return template.format(problem=problem, ctx=ctx, **kw)


def words(text: str) -> set[str]:
    """The alphabetic words (2+ letters) of ``text``."""
    return set(_WORD.findall(text))
