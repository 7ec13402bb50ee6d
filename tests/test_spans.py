"""Issue 15, item 2: one answer finder for the verifiers and SPD's selector, for every form they read."""

from __future__ import annotations

import pytest

from selfdistill.methods.spd.selectors import correctness_span, select_tokens
from selfdistill.tasks.base import Item
from selfdistill.tasks.spans import answer_span
from selfdistill.tasks.verify import extract_choice, extract_math_answer, verify_item

MATH = Item("m", "What is 6*7?", "6*7=42\n#### 42", "42", "math")
MCQA = Item("q", "Pick", "#### B", "B", "mcqa", {"letters": "ABCD"})

MATH_FORMS = [
    ("6*7 = 42\n#### 42", "42"),
    ("6*7 = 42, so the result is \\boxed{42}.", "42"),
    ("We multiply. The answer is 42. Done.", "42"),
    ("The answer is: $42$", "$42$"),
    ("six times seven gives 1,042 or rather 42", "42"),
    ("####\n 42 ", "42"),
]


@pytest.mark.parametrize("text,stated", MATH_FORMS)
def test_math_span_is_where_the_verifier_reads_the_answer(text, stated):
    s, e = answer_span(MATH, text)
    assert text[s:e] == stated
    assert verify_item(MATH, text)
    assert extract_math_answer(text) == "42"


@pytest.mark.parametrize("text,letter", [
    ("Option B is 5.\n#### B", "B"), ("so \\boxed{C}", "C"), ("The answer is (D) because", "D"),
    ("I think\n(a)", "A"), ("the answer is a prime\n#### B", "B"),
])
def test_choice_span_covers_the_chosen_letter(text, letter):
    s, e = answer_span(MCQA, text)
    assert text[s:e].upper() == letter and extract_choice(text) == letter


def test_no_answer_anywhere_gives_no_span():
    assert answer_span(MATH, "I do not know") is None
    assert answer_span(MCQA, "no idea at all") is None


def test_codegen_span_is_the_block_the_verifier_runs():
    item = Item("c", "Write f", "", "", "code", {"kind": "tests", "tests": "assert f() == 1", "entry_point": "f"})
    text = "Here:\n```python\ndef f():\n    return 1\n```\nUsage:\n```python\nprint(f())\n```"
    s, e = correctness_span(item, text)
    assert text[s:e] == "def f():\n    return 1\n"


def test_spd_selector_marks_a_boxed_answer():
    """A model that writes \\boxed{x} (not ``#### x``) gives SPD answer tokens instead of stopping the run."""
    from selfdistill.toy.tokenizer import build_toy_tokenizer

    tiny_tokenizer = build_toy_tokenizer()
    text = "6*7 is \\boxed{42}."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    marks = select_tokens(tiny_tokenizer, MATH, ids, text, "answer")
    chosen = tiny_tokenizer.decode([i for i, m in zip(ids, marks) if m])
    assert "42" in chosen and "is" not in chosen
