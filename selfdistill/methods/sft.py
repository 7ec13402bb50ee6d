"""SFT on reference solutions: the supervised reference point (uses labels).

Not a self-distillation method: it is the "what labels would buy" row of the
results table, and a deterministic method (no sampling) for exactness tests.
"""

from __future__ import annotations

import torch

from selfdistill.methods.base import Method, TrainBatch, register
from selfdistill.scoring import next_token_loss
from selfdistill.sequences import chat_prompt, encode_prompts, make_batch
from selfdistill.tasks.base import Item


@register
class SFT(Method):
    name = "sft"
    paper = "-"
    summary = "supervised fine-tuning on the reference solutions (labels; a reference row, not self-distillation)"
    requires_solution = True

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        tok = self.ctx.tokenizer
        for it in items:
            if not it.solution:
                raise ValueError(f"item {it.id}: method sft needs a reference solution and the item has none")
        prompts = encode_prompts(tok, [chat_prompt(tok, it.prompt, self.ctx.system) for it in items])
        targets = [tok(it.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for it in items]
        return TrainBatch(make_batch(prompts, targets, tok.pad_token_id))

    def loss(self, micro: TrainBatch, num_tokens: torch.Tensor):
        return next_token_loss(self.ctx.model, micro.student.to(self.ctx.device), num_tokens)
