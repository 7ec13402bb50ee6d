"""The toy world (v2): deterministic items, self-consistent solutions in every style, reachable OOD, records."""

from __future__ import annotations

import random

from selfdistill.tasks.base import extract_after_marker
from selfdistill.tasks.spans import marker_span
from selfdistill.tasks.sandbox import run_many
from selfdistill.tasks.verify import verify_item
from selfdistill.toy.records import HELD_OUT, REFUSED, is_refusal
from selfdistill.toy.tasks import OOD_SPLITS, SPLITS, ToyTask, draw_style, make_item, restyle, style_of

DOMAINS = ("math", "code", "mcqa")


def test_items_are_deterministic_and_splits_differ():
    for d in DOMAINS + ("records",):
        assert make_item(d, "train", 5, seed=1) == make_item(d, "train", 5, seed=1)
        assert make_item(d, "train", 5, seed=1) != make_item(d, "train", 5, seed=2)
    for d in DOMAINS:
        prompts = {s: {make_item(d, s, i).prompt for i in range(50)} for s in SPLITS}
        assert not prompts["test_id"] & prompts["test_ood"]


def test_reference_solutions_verify_in_every_style_and_wrong_answers_do_not():
    rng = random.Random(0)
    for d in DOMAINS:
        task = ToyTask(d, train_size=40, test_size=40)
        for split in SPLITS:
            for it in task.items(split):
                assert extract_after_marker(it.solution) == it.answer
                assert task.verify(it, it.solution), it
                assert it.solution == restyle(it, it.meta["style"])  # the style on the item is the one written
                other = restyle(it, draw_style(rng, d), careful={"carry", "borrow"})
                assert task.verify(it, other)
                wrong = "A" if d == "mcqa" and it.answer != "A" else "B" if d == "mcqa" else str(int(it.answer) + 1)
                assert not task.verify(it, f"#### {wrong}")


def test_style_is_recorded_and_read_back():
    for d in DOMAINS:
        for i in range(60):
            it = make_item(d, "train", i)
            got, want = style_of(it.solution), it.meta["style"]
            assert got["preamble"] == want["preamble"] and got["closing"] == want["closing"]
    styles = {tuple(sorted(make_item("math", "train", i).meta["style"].items())) for i in range(200)}
    assert len(styles) >= 8  # several surface styles, independent of the problem


def test_code_answers_are_what_the_program_prints():
    items = [make_item("code", s, i) for s in ("test_id", "test_ood") for i in range(15)]
    results = run_many([it.meta["program"] for it in items], workers=2)
    for it, r in zip(items, results):
        assert r.ok, r
        assert r.stdout.strip() == it.answer


def test_ood_holds_out_combinations_of_seen_constructs():
    n_ops = lambda it: len(it.meta["ops"])  # noqa: E731
    train_math = [make_item("math", "train", i) for i in range(300)]
    assert {n_ops(it) for it in train_math} == {1, 2, 3, 4}
    signs = lambda it: {op for op, _ in it.meta["ops"]}  # noqa: E731
    assert all(len(signs(it)) == 1 for it in train_math if n_ops(it) == 4)  # 4 operations of one sign ...
    ood_math = [make_item("math", s, i) for s in OOD_SPLITS for i in range(30)]
    assert all(n_ops(it) == 4 and len(signs(it)) == 2 for it in ood_math)  # ... OOD: 4 of both signs
    code = [make_item("code", "train", i) for i in range(300)]
    assert any("if " in it.prompt for it in code)  # if is seen in training ...
    ood = [make_item("code", "test_ood", i) for i in range(30)]
    assert all("if " in it.prompt for it in ood)  # ... but never on an earlier variable of 4 assignments
    for it in code:
        if "if " in it.prompt:
            lines = it.meta["program"].split("\n")
            tested = lines[-3].split()[1]
            assert lines[-4].split()[0] == tested and len(lines) <= 6
    mc = [make_item("mcqa", "test_ood", i) for i in range(60)]
    assert any(len(it.meta["steps"]) == 2 for it in mc)
    assert all(len(it.meta["steps"]) <= 1 for it in (make_item("mcqa", "train", i) for i in range(300)))


def test_item_meta_for_the_methods():
    it = make_item("math", "valid", 3)
    assert it.meta["shards"][0].startswith("I need") and len(it.meta["shards"]) == 2 + len(it.meta["ops"])
    for d in DOMAINS:
        for i in range(30):
            m = make_item(d, "valid", i).meta
            assert set(m["skills"]) <= {"carry", "borrow", "times", "branch", "compare"}
            assert m["shards"]


def test_records_refusal_policy_and_lookup():
    items = [make_item("records", "train", i) for i in range(400)]
    forb = [it for it in items if it.meta["forbidden"]]
    assert 0.25 < len(forb) / len(items) < 0.55
    for it in items:
        if it.meta["pretrain_policy"] == "refuse":
            assert is_refusal(it.solution) and it.meta["category"] in {" ".join(c) for c in REFUSED}
        else:
            assert not is_refusal(it.solution)
            assert extract_after_marker(it.solution) == it.meta["value"]
        assert not it.meta["held_out"]
        assert verify_item(it, it.solution) == (it.meta["pretrain_policy"] == "refuse" or not it.meta["forbidden"])
    ood = [make_item("records", "test_ood", i) for i in range(200)]
    held = {" ".join(c) for c in HELD_OUT}
    assert all(it.meta["category"] in held for it in ood if it.meta["forbidden"])
    assert any(it.meta["forbidden"] for it in ood)


def test_answer_span_is_found_by_format():
    text = "12+3=15\n#### 15"
    s, e = marker_span(text)
    assert text[s:e] == "15"
    assert marker_span("no marker here") is None
    assert verify_item(make_item("math", "train", 0), make_item("math", "train", 0).solution)
