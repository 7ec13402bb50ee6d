"""Tasks from user data: JSONL files and Hugging Face datasets.

Two sources, one result (a list of :class:`Item`):

- :func:`load_jsonl` reads a file of ``{"prompt", "solution", "answer"}`` rows
  (user columns renamed through ``columns``) and rejects bad rows with a
  one-line error naming file, row (1-based line) and field.
- :func:`load_hf_task` loads a hub dataset by name (or a local json/parquet/csv
  file in a known format) and turns each row into an item with a format
  adapter: GSM8K, MATH, MBPP, HumanEval, MMLU.

Gzip-compressed ``.jsonl.gz`` / ``.json.gz`` files are read wherever ``.jsonl`` /
``.json`` are (HumanEval ships as ``HumanEval.jsonl.gz``).

:class:`FileTask` and :class:`HFTask` wrap them as :class:`Task` objects whose
``verify`` is :func:`selfdistill.tasks.verify.verify_item`.
"""

from __future__ import annotations

import gzip
import json
import re
import string
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from selfdistill.tasks.base import ANSWER_MARKER, DOMAINS, Item
from selfdistill.tasks.verify import last_boxed, verify_item

FIELDS = ("id", "prompt", "solution", "answer", "domain", "meta")

MATH_INSTRUCTION = f"Solve the problem step by step. Finish with a line '{ANSWER_MARKER} <final answer>'."
MCQA_INSTRUCTION = f"Finish with a line '{ANSWER_MARKER} <letter of the correct option>'."
CODE_INSTRUCTION = "Write the complete Python function in a ```python code block."


class TaskDataError(ValueError):
    """A row of user data that cannot become an item; the message names where."""


class FieldError(ValueError):
    """Raised by adapters for one bad field; the loader adds source and row."""

    def __init__(self, field: str, problem: str, label: str | None = None) -> None:
        self.where = f"field '{field}'" + (f" ({label})" if label and label != field else "")
        super().__init__(f"{self.where}: {problem}")
        self.problem = problem


def _row_error(source: str, row: int, err: FieldError) -> TaskDataError:
    return TaskDataError(f"{source}, row {row}, {err.where}: {err.problem}")


# ---------------------------------------------------------------- JSONL


def _str_field(row: Mapping[str, Any], col: str, label: str, *, required: bool, numeric_ok: bool = False) -> str:
    """A non-empty string field (numbers allowed where ``numeric_ok``); '' if optional and absent."""
    if col not in row or row[col] is None:
        if required:
            raise FieldError(col, "missing" if col not in row else "is null", label)
        return ""
    value = row[col]
    if numeric_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise FieldError(col, f"must be a string, got {type(value).__name__}", label)
    if required and not value.strip():
        raise FieldError(col, "is empty", label)
    return value


def _jsonl_item(
    row: dict[str, Any],
    *,
    default_id: str,
    domain: str,
    columns: Mapping[str, str],
    require_solution: bool,
    require_answer: bool,
) -> Item:
    col = {f: columns.get(f, f) for f in FIELDS}
    prompt = _str_field(row, col["prompt"], "prompt", required=True)
    solution = _str_field(row, col["solution"], "solution", required=require_solution)
    answer = _str_field(row, col["answer"], "answer", required=require_answer, numeric_ok=True)
    item_id = _str_field(row, col["id"], "id", required=False, numeric_ok=True) or default_id
    dom = _str_field(row, col["domain"], "domain", required=False) or domain
    if dom not in DOMAINS:
        raise FieldError(col["domain"], f"unknown domain {dom!r} (expected one of {', '.join(DOMAINS)})", "domain")
    meta = row.get(col["meta"]) or {}
    if not isinstance(meta, dict):
        raise FieldError(col["meta"], f"must be an object, got {type(meta).__name__}", "meta")
    return Item(id=item_id, prompt=prompt, solution=solution, answer=answer.strip(), domain=dom, meta=meta)


def load_jsonl(
    path: str | Path,
    *,
    domain: str = "math",
    columns: Mapping[str, str] | None = None,
    require_solution: bool = False,
    require_answer: bool = True,
) -> list[Item]:
    """Items from a JSONL file of ``prompt`` / ``solution`` / ``answer`` rows.

    ``columns`` maps our field names to the file's (``{"prompt": "question"}``).
    Optional fields: ``id`` (default ``<file stem>-<line>``), ``domain``
    (default ``domain``), ``meta`` (an object), ``solution`` unless
    ``require_solution`` (OPSD-style teachers need one), ``answer`` unless
    ``require_answer`` is False (SPD / SSD need no labels). Blank lines are skipped.
    """
    path = Path(path)
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ValueError(f"columns: unknown field(s) {unknown}; known: {', '.join(FIELDS)}")
    if domain not in DOMAINS:
        raise ValueError(f"domain {domain!r} is not one of {', '.join(DOMAINS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    items: list[Item] = []
    seen: dict[str, int] = {}
    for lineno, row in json_rows(path):
        try:
            item = _jsonl_item(
                row,
                default_id=f"{data_stem(path)}-{lineno}",
                domain=domain,
                columns=columns,
                require_solution=require_solution,
                require_answer=require_answer,
            )
        except FieldError as e:
            raise _row_error(str(path), lineno, e) from None
        if item.id in seen:
            raise TaskDataError(f"{path}, row {lineno}, field 'id': duplicate id {item.id!r} (first on row {seen[item.id]})")
        seen[item.id] = lineno
        items.append(item)
    return items


def json_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file (``.gz`` too); a line that is not UTF-8,
    not JSON, or not an object raises :class:`TaskDataError` naming the file and row."""
    path = Path(path)
    for lineno, raw in _lines(path):
        try:
            line = raw.decode("utf-8").rstrip()
        except UnicodeDecodeError as e:
            raise TaskDataError(f"{path}, row {lineno}: not valid UTF-8 (at byte column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}, row {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}, row {lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of a file, gunzipped when its name ends in ``.gz``."""
    if path.suffix.lower() != ".gz":
        with path.open("rb") as f:
            yield from enumerate(f, start=1)
        return
    lineno = 0
    try:
        with gzip.open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:
        raise TaskDataError(f"{path}, row {lineno + 1}: not readable as gzip ({e})") from None


# ---------------------------------------------------------------- HF format adapters

Adapter = Callable[[Mapping[str, Any], str], Item]
"""Turns one dataset row into an item; the second argument is the fallback id."""


def _get(row: Mapping[str, Any], name: str, kind: type | tuple[type, ...] = str) -> Any:
    if name not in row:
        raise FieldError(name, f"missing (fields present: {', '.join(sorted(row))})")
    value = row[name]
    if not isinstance(value, kind):
        raise FieldError(name, f"has wrong type {type(value).__name__}")
    if isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise FieldError(name, "is empty")
    return value


def _id(row: Mapping[str, Any], fallback: str) -> str:
    for key in ("task_id", "unique_id", "id"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    return fallback


def gsm8k_item(row: Mapping[str, Any], fallback_id: str) -> Item:
    """GSM8K: ``question``; ``answer`` is the worked solution ending ``#### N``.

    Calculator annotations ``<<48/2=24>>`` are removed from the solution so a
    privileged teacher reads plain text; the answer loses thousands commas.
    """
    question = _get(row, "question")
    worked = _get(row, "answer")
    if ANSWER_MARKER not in worked:
        raise FieldError("answer", f"no '{ANSWER_MARKER}' final answer")
    solution = re.sub(r"<<[^>]*>>", "", worked).strip()
    answer = solution.rsplit(ANSWER_MARKER, 1)[1].strip().replace(",", "")
    return Item(_id(row, fallback_id), f"{question}\n\n{MATH_INSTRUCTION}", solution, answer, "math", {"source": "gsm8k"})


def math_item(row: Mapping[str, Any], fallback_id: str) -> Item:
    """MATH (and MATH-500): ``problem``, ``solution`` with ``\\boxed{answer}``.

    The answer is the ``answer`` column where present (MATH-500), else the last
    boxed expression; the solution gets a final ``#### answer`` line so every
    reference solution ends the same way.
    """
    problem = _get(row, "problem")
    solution = _get(row, "solution").rstrip()
    answer = row.get("answer") or last_boxed(solution)
    if not answer:
        raise FieldError("solution", "no \\boxed{} final answer")
    meta = {"source": "math"}
    for key in ("level", "type", "subject"):
        if key in row:
            meta[key] = row[key]
    text = f"{solution}\n{ANSWER_MARKER} {answer}"
    return Item(_id(row, fallback_id), f"{problem}\n\n{MATH_INSTRUCTION}", text, str(answer).strip(), "math", meta)


_CALLED = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\(|set\()?\s*([A-Za-z_]\w*)\s*\(")


def mbpp_item(row: Mapping[str, Any], fallback_id: str) -> Item:
    """MBPP (full: ``text``; sanitized: ``prompt``), reference ``code``, ``test_list`` asserts.

    The prompt lists the tests, as in the MBPP paper: they fix the function name.
    """
    text = _get(row, "text") if "text" in row else _get(row, "prompt")
    code = _get(row, "code")
    tests = _get(row, "test_list", list)
    if not all(isinstance(t, str) for t in tests):
        raise FieldError("test_list", "must be a list of strings")
    test_src = "\n".join(tests)
    setup = "\n".join([row.get("test_setup_code") or "", *(row.get("test_imports") or [])]).strip()
    called = _CALLED.search(test_src)
    meta = {"source": "mbpp", "kind": "tests", "tests": test_src, "setup": setup,
            "entry_point": called.group(1) if called else None}
    prompt = f"{text}\nYour code should pass these tests:\n\n{test_src}\n\n{CODE_INSTRUCTION}"
    solution = f"```python\n{code.strip()}\n```"
    return Item(_id(row, fallback_id), prompt, solution, code.strip(), "code", meta)


def humaneval_item(row: Mapping[str, Any], fallback_id: str) -> Item:
    """HumanEval: ``prompt`` (signature + docstring), ``canonical_solution`` (body),
    ``test`` (``def check(candidate)``), ``entry_point``."""
    code_prompt = _get(row, "prompt")
    body = _get(row, "canonical_solution")
    test = _get(row, "test")
    entry = _get(row, "entry_point")
    full = code_prompt + body
    meta = {"source": "humaneval", "kind": "humaneval", "tests": test, "entry_point": entry, "code_prompt": code_prompt}
    prompt = f"Complete the following Python function.\n\n```python\n{code_prompt}```\n\n{CODE_INSTRUCTION}"
    return Item(_id(row, fallback_id), prompt, f"```python\n{full.strip()}\n```", full.strip(), "code", meta)


def mmlu_item(row: Mapping[str, Any], fallback_id: str) -> Item:
    """MMLU: ``question``, ``choices`` (list), ``answer`` (index, or a letter).

    The prompt lists lettered options; the answer is the letter. MMLU has no
    worked solution, so the reference solution is just the option itself.
    """
    question = _get(row, "question")
    choices = _get(row, "choices", list)
    if not 2 <= len(choices) <= 26:
        raise FieldError("choices", f"needs 2..26 options, got {len(choices)}")
    letters = string.ascii_uppercase[: len(choices)]
    raw = _get(row, "answer", (int, str))
    if isinstance(raw, str) and raw.strip().upper() in letters and len(raw.strip()) == 1:
        idx = letters.index(raw.strip().upper())
    elif isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(choices):
        idx = raw
    else:
        raise FieldError("answer", f"{raw!r} is not an option index 0..{len(choices) - 1} or letter")
    letter = letters[idx]
    options = "\n".join(f"{l}. {c}" for l, c in zip(letters, choices))
    prompt = f"{question}\n\n{options}\n\n{MCQA_INSTRUCTION}"
    solution = f"{letter}. {choices[idx]}\n{ANSWER_MARKER} {letter}"
    meta = {"source": "mmlu", "letters": letters, "choices": list(choices), "subject": row.get("subject")}
    return Item(_id(row, fallback_id), prompt, solution, letter, "mcqa", meta)


@dataclass(frozen=True)
class Format:
    """A dataset format: its row adapter and the domain of its items."""

    adapter: Adapter
    domain: str
    default_config: str | None = None


FORMATS: dict[str, Format] = {
    "gsm8k": Format(gsm8k_item, "math", "main"),
    "math": Format(math_item, "math"),
    "mbpp": Format(mbpp_item, "code"),
    "humaneval": Format(humaneval_item, "code"),
    "mmlu": Format(mmlu_item, "mcqa", "all"),
}

#: EleutherAI/hendrycks_math has one config per subject; no config means all.
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")


def guess_format(name: str) -> str | None:
    """The format a hub dataset name implies (``openai/gsm8k`` -> ``gsm8k``), or None."""
    n = name.lower()
    for key, fmt in (("gsm8k", "gsm8k"), ("humaneval", "humaneval"), ("mbpp", "mbpp"),
                     ("mmlu", "mmlu"), ("hendrycks_test", "mmlu"), ("competition_math", "math"),
                     ("hendrycks_math", "math"), ("math-500", "math"), ("math_500", "math")):
        if key in n:
            return fmt
    return "math" if n.rsplit("/", 1)[-1] == "math" else None


_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_GZIP_OK = (".jsonl", ".json")  # also local files when gzipped (".jsonl.gz")


def local_suffix(name_or_path: str | Path) -> str | None:
    """The data suffix of a local file name (``.jsonl`` for ``x.jsonl.gz``), or None for a hub name."""
    suffixes = [x.lower() for x in Path(name_or_path).suffixes]
    if suffixes[-2:-1] and suffixes[-1] == ".gz":
        return suffixes[-2] if suffixes[-2] in _GZIP_OK else None
    return suffixes[-1] if suffixes and suffixes[-1] in _LOCAL_BUILDERS else None


def is_local(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names a local data file rather than a hub dataset."""
    return local_suffix(name_or_path) is not None


def data_stem(path: str | Path) -> str:
    """A data file's name without its suffixes (``HumanEval`` for ``HumanEval.jsonl.gz``)."""
    name = Path(path).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return Path(name).stem


def _load_rows(name_or_path: str, split: str, config: str | None, fmt: str) -> Any:
    import datasets

    if is_local(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        builder = _LOCAL_BUILDERS[local_suffix(path) or ""]
        return datasets.load_dataset(builder, data_files=str(path), split="train")  # gunzips .gz itself
    config = config or FORMATS[fmt].default_config
    try:
        if config is None and "hendrycks_math" in name_or_path.lower():
            parts = [datasets.load_dataset(name_or_path, s, split=split) for s in MATH_SUBJECTS]
            return datasets.concatenate_datasets(parts)
        return datasets.load_dataset(name_or_path, config, split=split)
    except (ConnectionError, OSError, ValueError) as e:  # offline, unknown name, no such split/config
        if isinstance(e, ValueError) and "split" in str(e).lower():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskDataError(f"hf:{name_or_path}: cannot load it from the Hugging Face Hub ({first[:200]}); "
                            f"offline, download the file and use hf:{fmt}@FILE") from None


def load_hf_task(
    name_or_path: str,
    split: str,
    config: str | None = None,
    format: str | None = None,
    limit: int | None = None,
) -> list[Item]:
    """Items of one split of a hub dataset, or of a local json/jsonl/parquet/csv file.

    The adapter comes from ``format`` or else from the dataset name (see
    :func:`guess_format`); local files need an explicit ``format`` and ignore
    ``split`` (the file is the split). ``limit`` keeps the first rows.
    """
    fmt = format or (None if is_local(name_or_path) else guess_format(name_or_path))
    if fmt is None:
        raise ValueError(f"{name_or_path}: cannot tell the dataset format; pass format= one of {', '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    rows = _load_rows(str(name_or_path), split, config, fmt)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    adapter = FORMATS[fmt].adapter
    source = str(name_or_path) if is_local(name_or_path) else f"{name_or_path}[{split}]"
    items = []
    for i, row in enumerate(rows):
        try:
            items.append(adapter(row, f"{fmt}/{split}/{i}"))
        except FieldError as e:
            raise _row_error(source, i + 1, e) from None
    return items


# ---------------------------------------------------------------- Task classes


class FileTask:
    """A task whose splits are JSONL files (``{"train": "train.jsonl", ...}``)."""

    def __init__(
        self,
        files: Mapping[str, str | Path],
        *,
        name: str | None = None,
        domain: str = "math",
        columns: Mapping[str, str] | None = None,
        require_solution: bool = False,
        require_answer: bool = True,
    ) -> None:
        if not files:
            raise ValueError("FileTask needs at least one split file")
        unknown = sorted(set(columns or {}) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; known: {', '.join(FIELDS)}")
        self.files = {split: Path(p) for split, p in files.items()}
        self.name = name or data_stem(next(iter(self.files.values())))
        self.domain = domain
        self._options = dict(domain=domain, columns=columns, require_solution=require_solution,
                             require_answer=require_answer)
        self._cache: dict[str, list[Item]] = {}

    def items(self, split: str) -> list[Item]:
        """Items of ``split``, read once and cached."""
        if split not in self.files:
            raise KeyError(f"task {self.name!r} has no split {split!r} (splits: {', '.join(self.files)})")
        if split not in self._cache:
            self._cache[split] = load_jsonl(self.files[split], **self._options)
        return self._cache[split]

    def verify(self, item: Item, completion: str) -> bool:
        """:func:`verify_item`."""
        return verify_item(item, completion)


class HFTask:
    """A task on a Hugging Face dataset in one of :data:`FORMATS`.

    ``splits`` maps our split names to the dataset's split names
    (``{"train": "train", "test_id": "test"}``) or to local files in the
    same format; without it, split names pass through unchanged.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        splits: Mapping[str, str] | None = None,
        config: str | None = None,
        format: str | None = None,
        limit: int | None = None,
        name: str | None = None,
    ) -> None:
        fmt = format or (None if is_local(name_or_path) else guess_format(name_or_path))
        if fmt not in FORMATS:
            raise ValueError(f"{name_or_path}: unknown or unguessable format {fmt!r}; pass format= one of {', '.join(FORMATS)}")
        self.source, self.config, self.format, self.limit = name_or_path, config, fmt, limit
        self.splits = dict(splits) if splits else None
        self.name = name or name_or_path
        self.domain = FORMATS[fmt].domain
        self._cache: dict[str, list[Item]] = {}

    def items(self, split: str) -> list[Item]:
        """Items of ``split``, loaded once and cached."""
        if self.splits is not None and split not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {split!r} (splits: {', '.join(self.splits)})")
        if split not in self._cache:
            target = self.splits[split] if self.splits is not None else split
            if is_local(target):
                items = load_hf_task(target, split, format=self.format, limit=self.limit)
            else:
                items = load_hf_task(self.source, target, self.config, self.format, self.limit)
            self._cache[split] = items
        return self._cache[split]

    def verify(self, item: Item, completion: str) -> bool:
        """:func:`verify_item`."""
        return verify_item(item, completion)
