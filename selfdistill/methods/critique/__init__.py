"""Step-aligned critique (arXiv 2606.11173): the teacher sees feedback from a frozen critic.

Three teacher contexts (``critique.feedback``) on the same on-policy recipe
(:mod:`selfdistill.methods.onpolicy`, objective ``distill.*``):

- ``reward``: the attempt and "Your previous attempt was correct/incorrect";
- ``reference``: the reference solution;
- ``step``: the attempt checked step by step by a frozen critic, correct steps
  copied verbatim, wrong ones corrected (:mod:`selfdistill.methods.critique.critic`): exact
  recomputation on the toy world, a prompted frozen model elsewhere.
"""

from __future__ import annotations

import copy

from selfdistill.methods.critique.critic import ModelCritic, exact_critique
from selfdistill.methods.base import TrainBatch, register
from selfdistill.methods.onpolicy import Group, OnPolicyMethod
from selfdistill.models import unwrap
from selfdistill.sequences import fill_template
from selfdistill.tasks.base import Item
from selfdistill.toy.steps import is_toy


@register
class Critique(OnPolicyMethod):
    name = "critique"
    sections = ("onpolicy", "distill", "teacher", "critique")
    paper = "arXiv 2606.11173"
    summary = "step-aligned critique: teacher = same model + a frozen critic's feedback (reward|reference|step)"
    needs_rewards = True

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg.critique
        self._critic_model = None
        self._stats: dict[str, float] = {}
        needs_model = cfg.feedback == "step" and (
            cfg.critic == "model" or (cfg.critic == "auto" and any(not is_toy(it) for it in ctx.stream.items)))
        if needs_model:  # frozen now, before training changes the weights
            if cfg.critic_model:
                from transformers import AutoModelForCausalLM

                from selfdistill.models import load_tokenizer, resolve_model_path

                path = resolve_model_path(cfg.critic_model)
                m = AutoModelForCausalLM.from_pretrained(path).to(ctx.device).eval()
                tok = load_tokenizer(path)
            elif self.teacher.copy is not None and ctx.cfg.teacher.kind == "initial":
                m, tok = self.teacher.copy, ctx.tokenizer  # the frozen initial model is already here
            else:
                m, tok = copy.deepcopy(unwrap(ctx.model)).eval(), ctx.tokenizer
                for p in m.parameters():
                    p.requires_grad_(False)
            self._critic_model = ModelCritic(m, tok, cfg.critic_template, cfg.critic_max_new_tokens, ctx.system,
                                             ctx.cfg.rollout.batch_size)

    def critiques(self, items: list[Item], attempts: list[str]) -> list[str]:
        """The step-aligned critique of each attempt (exact critic where it applies, else the model critic)."""
        cfg = self.ctx.cfg.critique
        out: list[str | None] = [None] * len(items)
        wrong, checked = 0, 0
        for i, (it, a) in enumerate(zip(items, attempts)):
            if cfg.critic == "model":
                continue
            crit = exact_critique(it, a, chain=cfg.chain)
            if crit is None:
                if cfg.critic == "exact":
                    raise ValueError(f"item {it.id}: critique.critic=exact has no exact critic for this item "
                                     "(toy world only); use --critique.critic model or auto")
                continue
            out[i] = crit.render()
            checked += 1
            wrong += sum(c.kind == "step" and not c.ok for c in crit.checks)
        rest = [i for i, o in enumerate(out) if o is None]
        if rest:
            if self._critic_model is None:
                raise ValueError(f"item {items[rest[0]].id}: no exact critic for this item and no model critic")
            for i, text in zip(rest, self._critic_model([items[i] for i in rest], [attempts[i] for i in rest])):
                out[i] = text
        self._stats = {"critique_wrong_steps": wrong / max(1, checked)} if checked else {}
        return [o or "" for o in out]

    def teacher_prompts(self, groups: list[Group]) -> list[list[str | None]]:
        cfg = self.ctx.cfg.critique
        if cfg.feedback == "reward":
            return [[fill_template(cfg.reward_template, "critique.reward_template", problem=g.item.prompt, attempt=t,
                           verdict="correct" if r > 0 else "incorrect") for t, r in zip(g.texts, g.rewards)]
                    for g in groups]
        if cfg.feedback == "reference":
            out = []
            for g in groups:
                if not g.item.solution:
                    raise ValueError(f"item {g.item.id}: critique.feedback=reference needs a reference solution "
                                     "and the item has none")
                out.append([fill_template(cfg.reference_template, "critique.reference_template", problem=g.item.prompt,
                                  solution=g.item.solution) for _ in g.texts])
            return out
        crits = self.critiques([g.item for g in groups for _ in g.texts], [t for g in groups for t in g.texts])
        out, k = [], 0
        for g in groups:
            row = []
            for t in g.texts:
                row.append(fill_template(cfg.step_template, "critique.step_template", problem=g.item.prompt, attempt=t,
                                 critique=crits[k]))
                k += 1
            out.append(row)
        return out

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        batch = super().make_batch(step, items)
        batch.info.update(self._stats)
        return batch
