"""SSD, simple self-distillation (arXiv 2604.01193): the signal-free baseline.

Paper: sample the model's own outputs at a training temperature with top-k /
top-p truncation, keep them all (no filter, verifier or reward), fine-tune on
them with the next-token loss. We do exactly that, through the shared
self-generation recipe; the sampling settings are ``rollout.*``.
"""

from __future__ import annotations

from selfdistill.methods.base import register
from selfdistill.methods.selfgen import SelfGenMethod


@register
class SSD(SelfGenMethod):
    name = "ssd"
    sections = ("ssd",)
    paper = "arXiv 2604.01193"
    summary = "simple self-distillation: SFT on the model's own raw (truncated-temperature) samples"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.rounds = ctx.cfg.ssd.rounds
        self.samples_per_prompt = ctx.cfg.ssd.samples_per_prompt
