"""Loading items from JSONL files and HF-format datasets (selfdistill.tasks.loaders)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from selfdistill.tasks.base import ANSWER_MARKER, Item, Task
from selfdistill.tasks.loaders import (
    FileTask,
    HFTask,
    TaskDataError,
    guess_format,
    is_local,
    load_hf_task,
    load_jsonl,
    mmlu_item,
)
from selfdistill.tasks.verify import verify_item

FIX = Path(__file__).parent / "fixtures"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIX / name).read_text().splitlines()]


# ---------------------------------------------------------------- JSONL

USER_COLUMNS = {"id": "qid", "prompt": "question", "solution": "reasoning", "answer": "final"}


def test_load_jsonl_with_column_mapping() -> None:
    items = load_jsonl(FIX / "user_qa.jsonl", columns=USER_COLUMNS)
    assert [it.id for it in items] == ["q1", "q2", "q3"]
    first = items[0]
    assert first == Item("q1", "What is 6 times 7?", "6 * 7 = 42.\n#### 42", "42", "math")  # number -> "42"
    assert items[1].domain == "mcqa" and items[1].meta == {"letters": "AB"}
    assert items[2].solution == ""  # optional unless required
    assert all(verify_item(it, it.solution) for it in items[:2])


def test_load_jsonl_defaults(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "plain.jsonl", [
        json.dumps({"prompt": "1+1?", "solution": "#### 2", "answer": "2"}),
        "",  # blank lines are skipped but still counted
        json.dumps({"prompt": "2+2?", "answer": 4.0}),
    ])
    items = load_jsonl(path, domain="math")
    assert [it.id for it in items] == ["plain-1", "plain-3"]
    assert items[1].answer == "4.0" and items[1].meta == {}


def test_load_jsonl_prompt_only_for_label_free_methods(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "Tell me a story."})])
    assert load_jsonl(path, require_answer=False)[0].answer == ""


@pytest.mark.parametrize(
    "line, kwargs, message",
    [
        ('{"prompt": "ok", "answer": "1"', {}, "row 2: invalid JSON (Expecting ',' delimiter at column 31)"),
        ('["a", "b"]', {}, "row 2: expected a JSON object, got list"),
        ('{"answer": "1"}', {}, "row 2, field 'prompt': missing"),
        ('{"prompt": "   ", "answer": "1"}', {}, "row 2, field 'prompt': is empty"),
        ('{"prompt": 7, "answer": "1"}', {}, "row 2, field 'prompt': must be a string, got int"),
        ('{"prompt": null, "answer": "1"}', {}, "row 2, field 'prompt': is null"),
        ('{"prompt": "q"}', {}, "row 2, field 'answer': missing"),
        ('{"prompt": "q", "answer": true}', {}, "row 2, field 'answer': must be a string, got bool"),
        ('{"prompt": "q", "answer": "1"}', {"require_solution": True}, "row 2, field 'solution': missing"),
        ('{"prompt": "q", "answer": "1", "solution": ""}', {"require_solution": True}, "row 2, field 'solution': is empty"),
        ('{"prompt": "q", "answer": "1", "domain": "chess"}', {}, "row 2, field 'domain': unknown domain 'chess'"),
        ('{"prompt": "q", "answer": "1", "meta": [1]}', {}, "row 2, field 'meta': must be an object, got list"),
        ('{"prompt": "q", "answer": "1", "id": "a"}', {}, "row 2, field 'id': duplicate id 'a' (first on row 1)"),
    ],
)
def test_load_jsonl_bad_rows(tmp_path: Path, line: str, kwargs: dict[str, Any], message: str) -> None:
    good = json.dumps({"id": "a", "prompt": "fine", "solution": "#### 1", "answer": "1"})
    path = write_lines(tmp_path / "data.jsonl", [good, line])
    with pytest.raises(TaskDataError) as err:
        load_jsonl(path, **kwargs)
    assert str(err.value).startswith(f"{path}, {message}")


def test_load_jsonl_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(TaskDataError, match=r"latin1.jsonl, row 2: not valid UTF-8 \(at byte column 16\)$"):
        load_jsonl(path)


def test_load_jsonl_error_names_the_user_column() -> None:
    with pytest.raises(TaskDataError) as err:
        load_jsonl(FIX / "user_qa.jsonl", columns=USER_COLUMNS, require_solution=True)
    assert str(err.value) == f"{FIX / 'user_qa.jsonl'}, row 3, field 'reasoning' (solution): missing"


def test_load_jsonl_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"columns: unknown field\(s\) \['question'\]"):
        load_jsonl(FIX / "user_qa.jsonl", columns={"question": "prompt"})
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="domain 'chess'"):
        load_jsonl(FIX / "user_qa.jsonl", domain="chess")


def test_file_task() -> None:
    task: Task = FileTask({"train": FIX / "user_qa.jsonl", "test_id": FIX / "user_qa.jsonl"}, columns=USER_COLUMNS, name="qa")
    assert (task.name, task.domain) == ("qa", "math")
    train = task.items("train")
    assert train is task.items("train") and len(train) == 3  # cached
    assert task.verify(train[0], "6*7 is\n#### 42") and not task.verify(train[0], "#### 41")
    with pytest.raises(KeyError, match="no split 'test_ood' \\(splits: train, test_id\\)"):
        task.items("test_ood")


# ---------------------------------------------------------------- HF format adapters (local files)

def test_gsm8k_adapter() -> None:
    items = load_hf_task(str(FIX / "gsm8k.jsonl"), "test", format="gsm8k")
    assert [it.answer for it in items] == ["18", "3", "15000"]
    it = items[0]
    assert it.id == "gsm8k/test/0" and it.domain == "math"
    assert it.prompt.startswith("Janet's ducks") and ANSWER_MARKER in it.prompt  # format instruction
    assert "<<" not in it.solution and it.solution.endswith("#### 18")
    assert all(verify_item(x, x.solution) for x in items)


def test_math_adapter() -> None:
    items = load_hf_task(str(FIX / "math.jsonl"), "test", format="math")
    assert [it.answer for it in items] == ["\\frac{3}{4}", "2\\sqrt{2}", "\\{-1, 1\\}"]
    assert items[0].meta == {"source": "math", "level": "Level 1", "type": "Prealgebra"}
    assert items[0].solution.endswith("\n#### \\frac{3}{4}")
    assert all(verify_item(x, x.solution) for x in items)
    assert verify_item(items[0], "so it is 0.75\n#### 0.75")


def test_math_500_answer_column() -> None:
    from selfdistill.tasks.loaders import math_item

    it = math_item({"problem": "p", "solution": "\\boxed{3}", "answer": "3", "unique_id": "test/x.json"}, "f")
    assert (it.id, it.answer) == ("test/x.json", "3")


def test_mbpp_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    items = load_hf_task(str(FIX / "mbpp.jsonl"), "test", format="mbpp", limit=1)
    assert len(items) == 1
    it = items[0]
    assert it.id == "2" and it.domain == "code"
    assert it.meta["kind"] == "tests" and it.meta["entry_point"] == "similar_elements"
    assert "assert set(similar_elements((3, 4, 5, 6)" in it.prompt  # tests shown, as in the paper
    assert it.solution.startswith("```python\ndef similar_elements")
    _install_fake_sandbox(monkeypatch)
    assert verify_item(it, it.solution)
    assert not verify_item(it, "```python\ndef similar_elements(a, b):\n    return ()\n```")


def test_humaneval_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    items = load_hf_task(str(FIX / "humaneval.jsonl"), "test", format="humaneval")
    it = items[0]
    assert it.id == "HumanEval/0" and it.meta["entry_point"] == "has_close_elements"
    assert it.meta["code_prompt"].startswith("from typing import List")
    assert "def has_close_elements" in it.prompt
    _install_fake_sandbox(monkeypatch)
    assert all(verify_item(x, x.solution) for x in items)
    body = "```python\n" + rows("humaneval.jsonl")[1]["canonical_solution"] + "```"
    assert verify_item(items[1], body)  # a body continuing the prompt also counts
    assert not verify_item(items[1], "```python\ndef truncate_number(x):\n    return x\n```")


def test_mmlu_adapter_jsonl_and_parquet(tmp_path: Path) -> None:
    import datasets

    parquet = tmp_path / "mmlu.parquet"
    datasets.Dataset.from_list(rows("mmlu.jsonl")).to_parquet(str(parquet))
    for source in (FIX / "mmlu.jsonl", parquet):
        items = load_hf_task(str(source), "test", format="mmlu")
        assert [it.answer for it in items] == ["B", "C", "A"]
        it = items[0]
        assert it.domain == "mcqa" and it.meta["letters"] == "ABCD" and it.meta["subject"] == "geography"
        assert "A. Berlin\nB. Paris\nC. Rome\nD. Madrid" in it.prompt
        assert it.solution == "B. Paris\n#### B"
        assert verify_item(it, "Paris is the capital.\n#### B") and not verify_item(it, "#### A")


def test_mmlu_letter_answer_and_more_options() -> None:
    it = mmlu_item({"question": "q", "choices": list("vwxyz"), "answer": "e"}, "k")
    assert (it.answer, it.meta["letters"]) == ("E", "ABCDE")


@pytest.mark.parametrize(
    "fmt, row, message",
    [
        ("gsm8k", {"question": "q", "answer": "it is 3"}, "row 1, field 'answer': no '####' final answer"),
        ("gsm8k", {"question": "", "answer": "#### 3"}, "row 1, field 'question': is empty"),
        ("math", {"problem": "p", "solution": "it is 3"}, "row 1, field 'solution': no \\boxed{} final answer"),
        ("mmlu", {"question": "q", "choices": ["a", "b"], "answer": 5}, "row 1, field 'answer': 5 is not an option index 0..1 or letter"),
        ("mmlu", {"question": "q", "choices": ["a"], "answer": 0}, "row 1, field 'choices': needs 2..26 options, got 1"),
        ("mbpp", {"text": "t", "code": "c", "test_list": [1]}, "row 1, field 'test_list': must be a list of strings"),
        ("humaneval", {"prompt": "p", "canonical_solution": "c", "test": "t"}, "row 1, field 'entry_point': missing"),
    ],
)
def test_adapter_bad_rows(tmp_path: Path, fmt: str, row: dict[str, Any], message: str) -> None:
    path = write_lines(tmp_path / f"{fmt}_bad.jsonl", [json.dumps(row)])
    with pytest.raises(TaskDataError) as err:
        load_hf_task(str(path), "test", format=fmt)
    assert str(err.value).startswith(f"{path}, {message}")


def test_local_file_needs_format() -> None:
    with pytest.raises(ValueError, match="cannot tell the dataset format; pass format="):
        load_hf_task(str(FIX / "gsm8k.jsonl"), "test")
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        load_hf_task(str(FIX / "gsm8k.jsonl"), "test", format="csv")


# ---------------------------------------------------------------- hub names (load_dataset faked)

@pytest.mark.parametrize(
    "name, fmt",
    [("openai/gsm8k", "gsm8k"), ("gsm8k", "gsm8k"), ("hendrycks/competition_math", "math"),
     ("EleutherAI/hendrycks_math", "math"), ("HuggingFaceH4/MATH-500", "math"), ("mbpp", "mbpp"),
     ("google-research-datasets/mbpp", "mbpp"), ("openai_humaneval", "humaneval"),
     ("openai/openai_humaneval", "humaneval"), ("cais/mmlu", "mmlu"), ("someone/poems", None)],
)
def test_guess_format(name: str, fmt: str | None) -> None:
    assert guess_format(name) == fmt


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """datasets.load_dataset for hub names served from the fixtures; records calls."""
    import datasets

    calls: list[tuple[Any, ...]] = []
    real = datasets.load_dataset
    by_name = {"openai/gsm8k": "gsm8k.jsonl", "EleutherAI/hendrycks_math": "math.jsonl", "cais/mmlu": "mmlu.jsonl"}

    def fake(path: str, name: str | None = None, split: str | None = None, **kw: Any) -> Any:
        if path in ("json", "parquet", "csv"):
            return real(path, name, split=split, **kw)
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows(by_name[path]))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def test_load_hf_task_by_name(fake_hub: list[tuple[Any, ...]]) -> None:
    items = load_hf_task("openai/gsm8k", "test", limit=2)
    assert fake_hub == [("openai/gsm8k", "main", "test")]  # GSM8K's config defaults to main
    assert [it.answer for it in items] == ["18", "3"]
    load_hf_task("cais/mmlu", "validation", config="anatomy")
    assert fake_hub[-1] == ("cais/mmlu", "anatomy", "validation")


def test_hendrycks_math_without_config_loads_every_subject(fake_hub: list[tuple[Any, ...]]) -> None:
    items = load_hf_task("EleutherAI/hendrycks_math", "test")
    assert len(fake_hub) == 7 and {c[1] for c in fake_hub} >= {"algebra", "precalculus"}
    assert len(items) == 7 * 3


def test_hub_row_errors_name_dataset_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"question": "q", "answer": "7"}]))
    with pytest.raises(TaskDataError, match=r"^openai/gsm8k\[test\], row 1, field 'answer': no '####'"):
        load_hf_task("openai/gsm8k", "test")


def test_hf_task(fake_hub: list[tuple[Any, ...]]) -> None:
    task: Task = HFTask("openai/gsm8k", splits={"train": "train", "test_id": "test"})
    assert (task.name, task.domain) == ("openai/gsm8k", "math")
    assert len(task.items("test_id")) == 3 and fake_hub[-1] == ("openai/gsm8k", "main", "test")
    assert task.items("test_id") is task.items("test_id")
    assert task.verify(task.items("train")[0], "#### 18")
    with pytest.raises(KeyError, match="no split 'test_ood'"):
        task.items("test_ood")


def test_hf_task_on_local_files() -> None:
    task = HFTask("mmlu-local", format="mmlu", splits={"test_id": str(FIX / "mmlu.jsonl")})
    assert task.domain == "mcqa" and [it.answer for it in task.items("test_id")] == ["B", "C", "A"]
    with pytest.raises(ValueError, match="pass format="):
        HFTask(str(FIX / "gsm8k.jsonl"))


# ---------------------------------------------------------------- gzip, and local files in hf: specs


def gz(text: str, path: Path) -> Path:
    """Write ``text`` gzipped to ``path``."""
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


def test_gzipped_jsonl_reads_like_plain(tmp_path: Path) -> None:
    zipped = gz((FIX / "user_qa.jsonl").read_text(), tmp_path / "user_qa.jsonl.gz")
    assert load_jsonl(zipped, columns=USER_COLUMNS) == load_jsonl(FIX / "user_qa.jsonl", columns=USER_COLUMNS)
    items = load_jsonl(gz('{"prompt": "1+1?", "answer": "2"}\n', tmp_path / "d.jsonl.gz"))
    assert [it.id for it in items] == ["d-1"]  # the default id drops both suffixes
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"prompt": "p", "answer": "1"}\n' * 100)[:-12])
    with pytest.raises(TaskDataError, match=r"cut\.jsonl\.gz, row \d+: not readable as gzip"):
        load_jsonl(cut)


def test_gzipped_json_files_are_local_files(tmp_path: Path) -> None:
    assert is_local("data/HumanEval.jsonl.gz") and is_local("x.json.gz") and is_local("x.JSONL.GZ")
    assert not is_local("x.parquet.gz") and not is_local("notes.gz") and not is_local("openai/gsm8k")
    he = gz((FIX / "humaneval.jsonl").read_text(), tmp_path / "HumanEval.jsonl.gz")
    plain = load_hf_task(str(FIX / "humaneval.jsonl"), "test", format="humaneval")
    assert load_hf_task(str(he), "test", format="humaneval") == plain
    array = gz(json.dumps(rows("gsm8k.jsonl")), tmp_path / "gsm8k.json.gz")  # .json: one JSON array
    assert [it.answer for it in load_hf_task(str(array), "train", format="gsm8k")] == ["18", "3", "15000"]


def test_jsonl_spec_takes_gzipped_files_and_folders(tmp_path: Path) -> None:
    from selfdistill.config import DataConfig
    from selfdistill.tasks.registry import build_task

    row = '{"prompt": "1+1?", "answer": "2"}\n'
    one = build_task(f"jsonl:{gz(row, tmp_path / 'd.jsonl.gz')}", DataConfig())
    assert one.name == "d" and [it.answer for it in one.items("train")] == ["2"]
    folder = tmp_path / "data"
    folder.mkdir()
    gz(row, folder / "train.jsonl.gz")
    write_lines(folder / "test_id.jsonl", [row.strip()])
    task = build_task(f"jsonl:{folder}", DataConfig())
    assert set(task.files) == {"train", "test_id"}  # type: ignore[attr-defined]
    assert task.items("train")[0].prompt == task.items("test_id")[0].prompt == "1+1?"


def test_hf_spec_names_a_local_file_with_its_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfdistill.config import DataConfig
    from selfdistill.config_io import ConfigError
    from selfdistill.tasks.registry import build_task

    he = gz((FIX / "humaneval.jsonl").read_text(), tmp_path / "HumanEval.jsonl.gz")
    task = build_task(f"hf:humaneval@{he}", DataConfig())
    assert (task.name, task.domain) == ("HumanEval", "code")
    assert [it.id for it in task.items("test_id")] == ["HumanEval/0", "HumanEval/2"]
    assert task.items("train") == task.items("test_id")  # the file stands for the whole dataset
    _install_fake_sandbox(monkeypatch)
    assert all(task.verify(it, it.solution) for it in task.items("test_id"))
    array = gz(json.dumps(rows("gsm8k.jsonl")), tmp_path / "gsm8k.json.gz")
    assert build_task(f"hf:openai/gsm8k@{array}", DataConfig()).items("train")[0].answer == "18"  # format from a hub name
    for spec, message in [
        (f"hf:poems@{he}", "unknown format 'poems'"),
        (f"hf:humaneval@{tmp_path / 'none.jsonl.gz'}", "none.jsonl.gz does not exist"),
        (f"hf:humaneval@{tmp_path / 'notes.txt'}", "is not a .jsonl, .json"),
        (f"hf:{he}", "a local file needs its format: hf:FORMAT@"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_task(spec, DataConfig())


def _install_fake_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for selfdistill.tasks.sandbox (same run_python signature, no isolation)."""
    from fakesandbox import install_fake_sandbox

    install_fake_sandbox(monkeypatch)
