"""What a method is: how a step's batch is made, and its loss.

The trainer owns the loop (data order, optimizers, accumulation, logging,
checkpoints, evaluation). A method composes the core pieces (rollout, views,
objective) into two calls: :meth:`Method.make_batch` and :meth:`Method.loss`.
A method that trains a second model (OPCoD's peer) declares it as a
:class:`Trainee` and puts its batch in :attr:`TrainBatch.others`; the trainer
steps it with the same loop and guarantees as the run's model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from selfdistill.config import TrainConfig
from selfdistill.sequences import SequenceBatch
from selfdistill.tasks.base import Item, Task


@dataclass
class TrainBatch:
    """One step's training data: student sequences, and per-method extras.

    Tensor fields are split along dim 0 into micro-batches by :meth:`split`;
    those named ``*_BT`` are per position of the student sequence (column t is
    about token t) and are trimmed with its padding.
    """

    student: SequenceBatch
    teacher: SequenceBatch | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)
    #: This step's batches of the method's other trainees, by :attr:`Trainee.name` (split on their own).
    others: dict[str, "TrainBatch"] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.student.input_ids_BT.shape[0]

    def split(self, size: int) -> list["TrainBatch"]:
        """Micro-batches of ``size`` sequences (padding columns trimmed)."""
        out = []
        for s in range(0, len(self), size):
            sl = slice(s, s + size)
            student = _slice_seq(self.student, sl)
            T = student.input_ids_BT.shape[1]
            tensors = {k: (v[sl, :T] if k.endswith("_BT") else v[sl]) for k, v in self.tensors.items()}
            out.append(TrainBatch(student, _slice_seq(self.teacher, sl) if self.teacher is not None else None,
                                  tensors, dict(self.info)))
        return out


def _slice_seq(b: SequenceBatch, sl: slice) -> SequenceBatch:
    parts = [getattr(b, f.name)[sl] for f in fields(b)]
    T = int(parts[1].sum(-1).max().item()) if parts[1].numel() else 0
    return SequenceBatch(*(p[:, :max(T, 1)] for p in parts))


@dataclass
class Trainee:
    """A model a method trains besides the run's own (:meth:`Method.trainees`).

    The trainer gives it an optimizer and schedule with the run's settings, splits its batch
    (``TrainBatch.others[name]``) into micro-batches normalised by its own global token count, averages its
    gradients over processes, clips, skips non-finite steps (counted towards ``max_bad_steps``), checkpoints
    its weights, optimizer and scheduler, restores them on resume, and publishes it as ``OUTPUT/<name>_model``.
    """

    name: str
    model: Any
    loss: Callable[["TrainBatch", torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
    token_mask: Callable[["TrainBatch"], torch.Tensor]


@dataclass
class Context:
    """What a method may use: the run's config, model, tokenizer, tasks, helpers."""

    cfg: TrainConfig
    model: Any
    tokenizer: Any
    tasks: list[Task]
    accelerator: Any
    out_dir: Path
    log: Callable[[str], None] = print
    system: str | None = None
    stream: Any = None  # ItemStream: the training items of any step
    step: int = 0  # the step being made (set by the trainer before make_batch)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def items_for_step(self, step: int) -> list[Item]:
        """This process's share of step ``step``'s prompts."""
        return self.stream.for_step(step, self.rank, self.world)

    def sample_seeds(self, step: int, n_items: int, k: int, tag: str = "") -> list[int]:
        """Seeds of this process's ``n_items`` prompts of ``step`` x ``k`` samples each (item-major), keyed by
        (run seed, tag, step, position in the global batch, sample index): a completion is the same whether
        one process or several share the batch (:func:`selfdistill.rollout.generate`'s ``row_seeds``)."""
        from selfdistill.rollout import row_seed

        return [row_seed(self.cfg.seed, tag, step, self.rank + self.world * i, j)
                for i in range(n_items) for j in range(k)]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Method:
    """Base class: subclasses set ``name``, ``paper``, ``summary`` and fill the hooks."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: TrainConfig sections the method reads beyond the common ones (``selfdistill train --method NAME --help``
    #: shows these); a literal tuple, read from the source by :mod:`selfdistill.catalog`.
    sections: ClassVar[tuple[str, ...]] = ()
    #: The method reads every train item's reference solution (checked before a run writes anything).
    requires_solution: ClassVar[bool] = False
    #: The models it trains (:func:`selfdistill.models.model_kind`): ``causal`` LMs, ``masked`` diffusion LMs.
    model_kinds: ClassVar[tuple[str, ...]] = ("causal",)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @classmethod
    def check(cls, cfg: TrainConfig, tasks: list[Task]) -> None:
        """Validate the method's own settings and data before a run writes anything (raise ConfigError)."""

    def precheck(self) -> None:
        """Checks that need the loaded model, before the run's folder exists and before the first evaluation
        (not on resume); raise ConfigError. Write no files here (``ctx.out_dir`` is not created yet)."""

    def setup(self) -> None:
        """Once, before the first step (after a resume too)."""

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        """This step's data for ``items`` (this process's share of the global batch)."""
        raise NotImplementedError

    def loss(self, micro: TrainBatch, num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch, normalised by the global token count ``num_tokens``."""
        raise NotImplementedError

    def token_mask(self, batch: TrainBatch) -> torch.Tensor:
        """The mask whose sum is the global token count (default: completion targets)."""
        return batch.student.completion_mask_BT[:, 1:]

    def after_step(self, step: int) -> None:
        """After each optimizer step (e.g. an EMA teacher update)."""

    def trainees(self) -> list[Trainee]:
        """Models this method trains besides ``ctx.model`` (default: none). Asked once, after ``__init__``."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Method state saved in checkpoints (buffers, EMA weights, subspaces...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    from selfdistill.methods import load_all

    load_all()  # imports register every method

    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
