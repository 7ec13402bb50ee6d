"""Task specs (``toy-math``, ``jsonl:PATH``, ``hf:NAME``) -> tasks; the training item stream.

Spec grammar, one string per task:

- ``toy-math`` | ``toy-code`` | ``toy-mcqa``: the embedded toy world;
- ``jsonl:DIR_OR_FILE[:domain]``: a folder with ``train.jsonl`` / ``test_id.jsonl``
  / ``test_ood.jsonl`` (whichever exist), or one file used as ``train``;
- ``hf:NAME[:config]``: a Hugging Face dataset in a known format (GSM8K, MATH,
  MBPP, HumanEval, MMLU), ``train`` and ``test`` splits mapped to
  ``train`` and ``test_id``.
"""

from __future__ import annotations

import random
from pathlib import Path

from selfdistill.config import DataConfig
from selfdistill.config_io import ConfigError
from selfdistill.tasks.base import DOMAINS, Item, Task
from selfdistill.toy.tasks import ToyTask

_SPLIT_FILES = ("train", "valid", "test_id", "test_ood")


def build_task(spec: str, data: DataConfig) -> Task:
    """One task from its spec string."""
    if spec.startswith("toy-"):
        domain = spec[4:]
        if domain not in DOMAINS:
            raise ConfigError(f"data.tasks: unknown toy task {spec!r}; expected toy-math, toy-code or toy-mcqa")
        return ToyTask(domain, seed=data.seed, train_size=data.train_size, test_size=data.test_size)
    if spec.startswith("jsonl:"):
        from selfdistill.tasks.loaders import FileTask

        rest = spec[len("jsonl:"):]
        path_s, _, domain = rest.partition(":") if not Path(rest).exists() else (rest, "", "")
        domain = domain or "math"
        if domain not in DOMAINS:
            raise ConfigError(f"data.tasks: {spec!r}: unknown domain {domain!r} (expected {', '.join(DOMAINS)})")
        path = Path(path_s)
        if path.is_dir():
            files = {s: path / f"{s}.jsonl" for s in _SPLIT_FILES if (path / f"{s}.jsonl").exists()}
            if not files:
                raise ConfigError(f"data.tasks: {spec!r}: folder {path} has none of "
                                  f"{', '.join(s + '.jsonl' for s in _SPLIT_FILES)}")
        elif path.is_file():
            files = {"train": path}
        else:
            raise ConfigError(f"data.tasks: {spec!r}: {path} does not exist")
        return FileTask(files, name=path.stem if path.is_file() else path.name, domain=domain)
    if spec.startswith("hf:"):
        from selfdistill.tasks.loaders import HFTask

        name, _, config = spec[3:].partition(":")
        return HFTask(name, config=config or None, splits={"train": "train", "test_id": "test"})
    raise ConfigError(f"data.tasks: cannot read task spec {spec!r}; use toy-math, jsonl:PATH or hf:NAME")


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
