"""Teachers: which weights score the teacher view.

- ``initial``: the model as it was at the start. With LoRA this is the base
  model with the adapter disabled (no second copy in memory); without LoRA a
  frozen copy.
- ``live``: the current student weights (under no-grad).
- ``ema``: an exponential moving average of the student, updated every
  ``ema_every`` steps with rate ``ema_rate``.
- ``path`` (with ``initial``): a separate, frozen teacher model loaded from a
  folder or hub id; it must share the student's vocabulary (checked before a
  run starts, see :mod:`selfdistill.validation`).
Teacher logits are always computed under ``torch.no_grad``.

Under FSDP (:mod:`selfdistill.distributed`) the frozen copies (``initial`` without LoRA, ``ema``, ``path``)
are made before the student is sharded and stay whole on every process (replicated: a teacher has no
gradients nor optimizer state to shard); ``live`` and LoRA's adapter-disabled base are the sharded student
itself, scored inside its loss, where its parameters are whole.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch

from selfdistill.config import TeacherConfig  # noqa: F401  (defined with the config tree, torch-free)


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Teacher:
    """Scores teacher views with the configured weights."""

    def __init__(self, model, cfg: TeacherConfig) -> None:
        self.model, self.cfg = model, cfg
        self.copy = None
        if cfg.path:
            from transformers import AutoModelForCausalLM

            from selfdistill.models import resolve_model_path

            p = next(model.parameters())
            self.copy = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.path), dtype=p.dtype)
            self.copy = self.copy.to(p.device).eval()
            for q in self.copy.parameters():
                q.requires_grad_(False)
            from selfdistill.scoring import check_head

            check_head(self.copy, setting="teacher.path")
        elif cfg.kind == "ema" or (cfg.kind == "initial" and not _is_peft(model)):
            self.copy = copy.deepcopy(model).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    @contextlib.contextmanager
    def scoring(self) -> Iterator[Any]:
        """Yields the module to run the teacher forward with, in eval mode, no grad."""
        if self.copy is not None:
            with torch.no_grad():
                yield self.copy
            return
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if self.cfg.kind == "initial":
                    with self.model.disable_adapter():
                        yield self.model
                else:
                    yield self.model
        finally:
            self.model.train(was)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """EMA update after optimizer step ``step`` (0-based)."""
        if self.cfg.kind != "ema" or (step + 1) % self.cfg.ema_every:
            return
        from selfdistill.models import full_params

        r = self.cfg.ema_rate
        with full_params(self.model):  # the student's whole weights under FSDP (the copy is never sharded)
            for t, s in zip(self.copy.parameters(), self.model.parameters()):
                t.mul_(1 - r).add_(s.detach().to(t.dtype), alpha=r)

    def state_dict(self) -> dict[str, Any]:
        if self.cfg.kind == "ema":
            return {"ema": {k: v.detach().cpu().clone() for k, v in self.copy.state_dict().items()}}
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cfg.kind == "ema" and "ema" in state:
            self.copy.load_state_dict(state["ema"])
