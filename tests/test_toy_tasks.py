"""The toy world: deterministic items, self-consistent solutions, real program outputs."""

from __future__ import annotations

from selfdistill.tasks.base import answer_char_span, extract_after_marker
from selfdistill.tasks.sandbox import run_many
from selfdistill.tasks.verify import verify_item
from selfdistill.toy.tasks import SPLITS, ToyTask, make_item


def test_items_are_deterministic_and_splits_differ():
    for d in ("math", "code", "mcqa"):
        assert make_item(d, "train", 5, seed=1) == make_item(d, "train", 5, seed=1)
        assert make_item(d, "train", 5, seed=1) != make_item(d, "train", 5, seed=2)
        prompts = {s: {make_item(d, s, i).prompt for i in range(50)} for s in SPLITS}
        assert not prompts["test_id"] & prompts["test_ood"]


def test_reference_solutions_verify_and_wrong_answers_do_not():
    for d in ("math", "code", "mcqa"):
        task = ToyTask(d, train_size=50, test_size=50)
        for split in SPLITS:
            for it in task.items(split):
                assert extract_after_marker(it.solution) == it.answer
                assert task.verify(it, it.solution), it
                wrong = "0" if it.answer != "0" else "1"
                if d == "mcqa":
                    wrong = "A" if it.answer != "A" else "B"
                assert not task.verify(it, f"#### {wrong}")


def test_code_answers_are_what_the_program_prints():
    items = [make_item("code", s, i) for s in ("test_id", "test_ood") for i in range(15)]
    results = run_many([it.meta["program"] for it in items], workers=2)
    for it, r in zip(items, results):
        assert r.ok, r
        assert r.stdout.strip() == it.answer


def test_ood_is_harder_by_construction():
    def mean_len(split: str, d: str) -> float:
        return sum(len(make_item(d, split, i).prompt + make_item(d, split, i).solution) for i in range(100)) / 100

    for d in ("math", "code", "mcqa"):
        assert mean_len("test_ood", d) >= mean_len("test_id", d)
    assert all("F)" in make_item("mcqa", "test_ood", i).prompt for i in range(10))


def test_answer_span_is_found_by_format():
    text = "12+3=15\n#### 15"
    s, e = answer_char_span(text)
    assert text[s:e] == "15"
    assert answer_char_span("no marker here") is None
    assert verify_item(make_item("math", "train", 0), make_item("math", "train", 0).solution)
