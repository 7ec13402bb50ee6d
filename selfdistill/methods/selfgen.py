"""Self-generation methods: sample a round's data from the model (under a view), SFT on it.

SSD and SPD share this: at the start of each round the current model samples
completions for every prompt of the round's steps (SPD with its K/V
projection active, SSD plainly), with no filtering of any kind; each step
then fine-tunes on its share with the next-token loss. With one round this
is the papers' offline recipe (sample once from the base model, then SFT).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ContextManager

import torch

from selfdistill.methods.base import Method, TrainBatch
from selfdistill.models import unwrap
from selfdistill.rollout import generate
from selfdistill.scoring import next_token_loss
from selfdistill.sequences import chat_prompt, make_batch
from selfdistill.tasks.base import Item


class SelfGenMethod(Method):
    """Round-based self-generation + next-token loss; subclasses choose the view."""

    rounds: int = 1
    samples_per_prompt: int = 1

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.buffer: dict[int, tuple[list[list[int]], list[list[int]]]] = {}
        self.round = -1

    # -- what subclasses change
    def view(self) -> ContextManager[Any]:
        """The activation view active while the round's data is sampled."""
        return contextlib.nullcontext()

    def on_round_start(self, round_idx: int) -> None:
        """Before a round's sampling (SPD recomputes its subspace here)."""

    # -- the shared recipe
    def round_of(self, step: int) -> tuple[int, int, int]:
        """(round index, first step, end step) of the round containing ``step``."""
        per = math.ceil(self.ctx.cfg.steps / max(1, self.rounds))
        r = step // per
        return r, r * per, min(self.ctx.cfg.steps, (r + 1) * per)

    def _sample_round(self, first: int, end: int) -> None:
        ctx = self.ctx
        k = self.samples_per_prompt
        steps = list(range(first, end))
        items_by_step = {s: ctx.items_for_step(s) for s in steps}
        prompts = [chat_prompt(ctx.tokenizer, it.prompt, ctx.system)
                   for s in steps for it in items_by_step[s] for _ in range(k)]
        seeds = [x for s in steps for x in ctx.sample_seeds(s, len(items_by_step[s]), k, "selfgen")]
        model = unwrap(ctx.model)
        with self.view():
            ro = generate(model, ctx.tokenizer, prompts, ctx.cfg.rollout, desc=f"{ctx.cfg.method} samples",
                          row_seeds=seeds)
        pos = 0
        self.buffer = {}
        for s in steps:
            n = len(items_by_step[s]) * k
            self.buffer[s] = (ro.prompt_ids[pos:pos + n], ro.completion_ids[pos:pos + n])
            pos += n
        done = sum(ro.finished) / max(1, len(ro.finished))
        mean_len = sum(len(c) for c in ro.completion_ids) / max(1, len(ro.completion_ids))
        self.last_round_info = {"finished_frac": done, "completion_len": mean_len}
        ctx.log(f"round sampled: {len(prompts)} completions, {100 * done:.0f}% finished, "
                f"mean length {mean_len:.1f} tokens")

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        r, first, end = self.round_of(step)
        if r != self.round or step not in self.buffer:
            self.round = r
            self.on_round_start(r)
            self._sample_round(first, end)
        prompt_ids, completion_ids = self.buffer.pop(step)
        batch = make_batch(prompt_ids, completion_ids, self.ctx.tokenizer.pad_token_id)
        return TrainBatch(batch, info=dict(getattr(self, "last_round_info", {})))

    def loss(self, micro: TrainBatch, num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return next_token_loss(self.ctx.model, micro.student.to(self.ctx.device), num_tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "round": self.round,
                "last_round_info": getattr(self, "last_round_info", {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = state.get("buffer", {})
        self.round = state.get("round", -1)
        self.last_round_info = state.get("last_round_info", {})
