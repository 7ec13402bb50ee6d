"""SafeSteer (arXiv 2606.02530): localized on-policy distillation from an activation-steered teacher.

Everything about the method is in this folder: the recipe (here), the refusal direction
(:mod:`.direction`), the safety tokens (:mod:`.tokens`), its evaluation (:mod:`.evaluate`) and its
commands (:mod:`.cli`). The core pieces it composes: the on-policy recipe (student rollouts on harmful
prompts, the teacher scoring the same tokens behind the same prompt), a frozen teacher
(:mod:`selfdistill.teachers`), a residual-stream view (:mod:`selfdistill.residual`, installed for the
teacher's forward only) and the objective library's subset reverse KL
(:mod:`selfdistill.objectives.subset`). See docs/methods/safesteer.md.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from selfdistill.config_io import ConfigError
from selfdistill.methods.base import register
from selfdistill.methods.onpolicy import Group, OnPolicyMethod
from selfdistill.models import unwrap
from selfdistill.residual import add_direction


def refusal_task(tasks):
    """The one training task with harmless contrast prompts (``toy-refusal``, ``refusal:...``)."""
    from selfdistill.tasks.refusal import RefusalTask

    found = [t for t in tasks if isinstance(t, RefusalTask)]
    if len(found) != 1 or len(tasks) != 1:
        raise ConfigError("method safesteer trains on one refusal task: data.tasks: [toy-refusal] or "
                          f"[refusal:HARMFUL.jsonl,HARMLESS.jsonl]; got {[getattr(t, 'name', t) for t in tasks]}")
    return found[0]


@register
class SafeSteer(OnPolicyMethod):
    name = "safesteer"
    sections = ("onpolicy", "distill", "teacher", "safesteer")
    paper = "arXiv 2606.02530"
    summary = "safety by on-policy distillation from a refusal-steered copy, on a few safety tokens only"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.direction = None
        self.tokens = None

    @classmethod
    def check(cls, cfg, tasks) -> None:
        task = refusal_task(tasks)
        s = cfg.safesteer
        needs_harmless = not s.direction or (s.vocabulary == "safety" and not s.tokens)
        if needs_harmless and task.harmful and not task.harmless_prompts:
            raise ConfigError("method safesteer: the refusal direction and the safety tokens need harmless prompts "
                              "too: data.tasks: [refusal:HARMFUL,HARMLESS] (or pass safesteer.direction and "
                              "safesteer.tokens)")
        if cfg.teacher.kind != "initial":
            raise ConfigError("method safesteer: the steered teacher is the frozen initial model "
                              "(teacher.kind initial)")

    def precheck(self) -> None:
        """The direction and the safety tokens, read from files or found on the initial model, and checked
        against it: before the run's folder exists, so a model that refuses nothing (or a file made for
        another model) stops the run with one line and no files. Written to the folder in :meth:`setup`."""
        from selfdistill.methods.safesteer.direction import load_direction
        from selfdistill.methods.safesteer.tokens import load_tokens

        ctx, cfg = self.ctx, self.ctx.cfg.safesteer
        task = refusal_task(ctx.tasks)
        model = unwrap(ctx.model)
        self._found = set()
        if cfg.direction:
            self.direction = load_direction(cfg.direction)
        else:
            self.direction = find_direction(model, ctx.tokenizer, task, cfg, ctx.system, ctx.log)
            self._found.add("direction")
        hidden = model.config.get_text_config().hidden_size
        if self.direction.vector.numel() != hidden:
            raise ConfigError(f"safesteer.direction: a vector of {self.direction.vector.numel()} does not match "
                              f"the model's hidden size {hidden}")
        if cfg.vocabulary == "safety":
            if cfg.tokens:
                self.tokens = load_tokens(cfg.tokens)
            else:
                self.tokens = find_tokens(model, ctx.tokenizer, task, self.direction, cfg, ctx.system, ctx.log,
                                          ctx.cfg.seed)
                self._found.add("tokens")
            vocab = lm_head_weight_rows(ctx.model)
            if max(self.tokens.ids) >= vocab:
                raise ConfigError(f"safesteer.tokens: id {max(self.tokens.ids)} is outside the model's "
                                  f"vocabulary ({vocab})")

    def setup(self) -> None:
        """Save what :meth:`precheck` found in the run's ``safesteer/`` folder (a resumed run has the direction
        and tokens from its checkpoint and computes nothing)."""
        from selfdistill.methods.safesteer.direction import plot_direction

        if self.direction is None:  # neither prechecked nor resumed (e.g. a caller that skips precheck)
            self.precheck()
        found = getattr(self, "_found", set())
        out = self.ctx.out_dir / "safesteer"
        if self.ctx.rank == 0 and "direction" in found:
            self.direction.save(out)
            plot_direction(self.direction, out / "direction.png")
        if self.ctx.rank == 0 and "tokens" in found:
            self.tokens.save(out / "tokens.json")
        self._found = set()

    def teacher_prompts(self, groups: list[Group]) -> list[list[str | None]]:
        return [[g.item.prompt for _ in g.texts] for g in groups]  # the same prompt; the view is in the activations

    def teacher_view(self, module) -> contextlib.AbstractContextManager:
        d = self.direction
        return add_direction(module, d.layer, d.vector, steering_coeff(d))

    def objective(self, s_rows, s_head, t_rows, t_head, weights_N, ids_N, old_N, num_tokens) -> torch.Tensor:
        cfg = self.ctx.cfg.safesteer
        if cfg.vocabulary == "full":
            return super().objective(s_rows, s_head, t_rows, t_head, weights_N, ids_N, old_N, num_tokens)
        from selfdistill.objectives import subset_reverse_kl_from_hidden

        ids = torch.tensor(self.tokens.ids, device=s_rows.device)
        return subset_reverse_kl_from_hidden(s_rows, s_head, t_rows, t_head, ids, weights_N,
                                             renormalise=cfg.renormalise, chunk_size=self.ctx.cfg.distill.chunk_size,
                                             num_items_in_batch=num_tokens,
                                             detach_ratio=cfg.gradient == "ratio_detached")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.direction is not None:
            d = self.direction
            state["direction"] = {"layer": d.layer, "position": d.position, "vector": d.vector.cpu(),
                                  "info": {k: v for k, v in d.info.items() if k != "candidates"}}
        if self.tokens is not None:
            state["tokens"] = {"ids": list(self.tokens.ids), "info": self.tokens.info}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from selfdistill.methods.safesteer.direction import Direction
        from selfdistill.methods.safesteer.tokens import SafetyTokens

        super().load_state_dict(state)
        if "direction" in state:
            d = state["direction"]
            self.direction = Direction(d["layer"], d["position"], d["vector"], d["info"])
        if "tokens" in state:
            self.tokens = SafetyTokens(state["tokens"]["ids"], state["tokens"]["info"])


def find_direction(model, tokenizer, task, cfg, system=None, log=print):
    """The refusal direction of ``model`` from ``task``'s harmful and harmless prompts (``cfg``: safesteer)."""
    from selfdistill.methods.safesteer.direction import select_direction

    n = cfg.n_direction + cfg.n_select
    return select_direction(model, tokenizer, [it.prompt for it in task.harmful_pool(n)],
                            [it.prompt for it in task.harmless(n)], cfg, system, log)


def find_tokens(model, tokenizer, task, direction, cfg, system=None, log=print, seed: int = 0):
    """The safety tokens of ``model`` steered by ``direction``, voted on harmless prompts apart from those the
    direction was measured on."""
    from selfdistill.methods.safesteer.tokens import choose_tokens

    harmless = [it.prompt for it in task.harmless(cfg.n_direction + cfg.n_select + cfg.token_prompts)]
    return choose_tokens(model, tokenizer, harmless[-cfg.token_prompts:], direction.layer, direction.vector,
                         steering_coeff(direction), cfg, system, log, seed=seed)


def steering_coeff(direction) -> float:
    """The coefficient a direction was selected with (1.0, the paper's, for files that do not say)."""
    return float(direction.info.get("coeff", 1.0))


def lm_head_weight_rows(model) -> int:
    from selfdistill.scoring import lm_head

    return lm_head(model).weight_VH.shape[0]
