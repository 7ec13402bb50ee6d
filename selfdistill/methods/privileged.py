"""Privileged-context self-distillation: OPSD, SDFT, SDPO.

The teacher is the same model given something the student does not see;
templates are configurable (``{problem}``, ``{solution}``, ``{demonstration}``,
``{attempt}`` placeholders). Student and teacher prompts both go through the
chat template (see :func:`selfdistill.sequences.chat_prompt`).
"""

from __future__ import annotations

import random

from selfdistill.methods.base import register
from selfdistill.methods.onpolicy import Group, OnPolicyMethod
from selfdistill.sequences import fill_template


def _fill_teacher(template: str, **kw: str) -> str:
    return fill_template(template, "teacher template", **kw)


def _need_solution(item) -> str:
    if not item.solution:
        raise ValueError(f"item {item.id}: this method needs a reference solution and the item has none")
    return item.solution


def _demonstration(cfg, item, pool) -> str:
    """SDFT's demonstration for ``item``: its own solution, or another train item's (fixed per item id)."""
    if cfg.demonstration == "own":
        return _need_solution(item)
    other = pool[random.Random(item.id).randrange(len(pool))]
    return f"Problem: {other.prompt}\nAnswer: {_need_solution(other)}"


@register
class OPSD(OnPolicyMethod):
    name = "opsd"
    sections = ("onpolicy", "distill", "teacher", "opsd")
    paper = "arXiv 2601.18734"
    summary = "on-policy self-distillation: teacher = same model + reference solution"
    requires_solution = True

    def teacher_prompts(self, groups: list[Group]) -> list[list[str | None]]:
        t = self.ctx.cfg.opsd.template
        return [[_fill_teacher(t, problem=g.item.prompt, solution=_need_solution(g.item)) for _ in g.texts]
                for g in groups]

    @classmethod
    def teacher_users_before_training(cls, cfg, items):
        return [_fill_teacher(cfg.opsd.template, problem=it.prompt, solution=it.solution or "") for it in items], ""


@register
class SDFT(OnPolicyMethod):
    name = "sdft"
    sections = ("onpolicy", "distill", "teacher", "sdft")
    paper = "arXiv 2601.19897"
    summary = "self-distillation fine-tuning: teacher = same model + a demonstration in context"
    requires_solution = True

    def teacher_prompts(self, groups: list[Group]) -> list[list[str | None]]:
        cfg = self.ctx.cfg.sdft
        pool = self.ctx.stream.items
        return [[_fill_teacher(cfg.template, problem=g.item.prompt, demonstration=_demonstration(cfg, g.item, pool))
                 for _ in g.texts] for g in groups]

    @classmethod
    def teacher_users_before_training(cls, cfg, items):
        return [_fill_teacher(cfg.sdft.template, problem=it.prompt, demonstration=_demonstration(cfg.sdft, it, items))
                for it in items], ""


@register
class SDPO(OnPolicyMethod):
    name = "sdpo"
    sections = ("onpolicy", "distill", "teacher", "sdpo")
    paper = "arXiv 2601.20802"
    summary = "self-distilled policy optimisation: teacher = same model + a successful rollout of the group"
    needs_rewards = True

    def teacher_prompts(self, groups: list[Group]) -> list[list[str | None]]:
        cfg = self.ctx.cfg.sdpo
        out = []
        for g in groups:
            rewards = g.rewards or [0.0] * len(g.texts)
            row: list[str | None] = []
            for i in range(len(g.texts)):
                if rewards[i] > 0 and not cfg.reprompt_on_self_success:
                    row.append(None)
                    continue
                peers = [j for j in range(len(g.texts)) if j != i and rewards[j] > 0]
                if not peers:
                    row.append(None)
                    continue
                j = peers[random.Random(f"{g.item.id}/{i}").randrange(len(peers))]
                row.append(_fill_teacher(cfg.template, problem=g.item.prompt, attempt=g.texts[j]))
            out.append(row)
        return out

    @classmethod
    def teacher_users_before_training(cls, cfg, items):
        return ([_fill_teacher(cfg.sdpo.template, problem=it.prompt, attempt="") for it in items],
                f", without the attempt it quotes: up to rollout.max_new_tokens={cfg.rollout.max_new_tokens} more")
