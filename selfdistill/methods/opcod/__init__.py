"""OPCoD, on-policy co-distillation (arXiv 2606.14368): two models tutor each other in one run.

The run's model (``model.path``, A) and a peer (``opcod.peer``, B) both
sample on-policy rollouts of the same prompts each step. Each model's
teacher is itself (``teacher.*``: by default its frozen initial weights)
shown the problem + another verified rollout of its own group + the other
model's feedback, when the cognizance gate says the other model knows the
problem; feedback is anchored to the problem (see
:mod:`selfdistill.methods.opcod.views`). Loss: the shared objective library
(``distill.*``) on each model's own rollout tokens.

How the two updates share the trainer's one loop (design): B is a
:class:`~selfdistill.methods.base.Trainee` named ``peer``, so the trainer
steps it exactly as it steps A (its own AdamW with the run's settings and
schedule, its own global token count, all-reduce, clipping, non-finite
skipping and ``max_bad_steps``, its weights, optimizer and scheduler in every
checkpoint, ``OUTPUT/peer_model`` at the end). :meth:`OPCoD.make_batch`
samples both models, builds both teacher views and both batches (the shared
recipe, :meth:`OnPolicyMethod.batch_from_rollouts`) and hands B's over in
``TrainBatch.others["peer"]``; the method owns only B's teacher and its
before/after evaluation (``OUTPUT/peer_results.json``).

``opcod.update_peer=false`` keeps B frozen (no trainee): one-way distillation into A.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import torch

from selfdistill.config_io import ConfigError
from selfdistill.methods.base import TrainBatch, Trainee, register
from selfdistill.methods.onpolicy import Group, OnPolicyMethod
from selfdistill.models import unwrap
from selfdistill.methods.opcod.views import Attempts, mean_answer_logprob, teacher_views
from selfdistill.rollout import Rollouts
from selfdistill.scoring import check_head, target_logprobs
from selfdistill.sequences import make_batch
from selfdistill.tasks.base import Item


class _Student(OnPolicyMethod):
    """One model of the pair as an on-policy student: rollouts with rewards, teacher, loss (shared recipe)."""

    needs_rewards = True

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.views: list[list[str | None]] = []

    def teacher_prompts(self, groups: list[Group]) -> list[list[str | None]]:
        return self.views

    @torch.no_grad()
    def attempts(self, ro: Rollouts, groups: list[Group]) -> list[Attempts]:
        """Per problem: texts, rewards and (if the gate reads them) answer confidences under this model."""
        from selfdistill.methods.spd.selectors import select_tokens

        ctx, ocfg = self.ctx, self.ctx.cfg.opcod
        conf = [0.0] * len(ro.texts)
        if ocfg.gate in ("confidence", "both"):
            items = [g.item for g in groups for _ in g.texts]
            mb = ctx.cfg.micro_batch_size
            for s in range(0, len(ro.texts), mb):
                batch = make_batch(ro.prompt_ids[s:s + mb], ro.completion_ids[s:s + mb], ctx.tokenizer.pad_token_id)
                logp = target_logprobs(unwrap(ctx.model), batch.to(ctx.device)).cpu()
                for b in range(len(batch.input_ids_BT)):
                    r = s + b
                    start, n = len(ro.prompt_ids[r]) - 1, len(ro.completion_ids[r])
                    mask = select_tokens(ctx.tokenizer, items[r], ro.completion_ids[r], ro.texts[r], "answer")
                    conf[r] = mean_answer_logprob(logp[b, start:start + n].tolist(), mask)
        out, pos = [], 0
        for g in groups:
            n = len(g.texts)
            out.append(Attempts(list(g.texts), list(g.rewards or [0.0] * n), conf[pos:pos + n]))
            pos += n
        return out


@register
class OPCoD(_Student):
    name = "opcod"
    sections = ("onpolicy", "distill", "teacher", "opcod")
    paper = "arXiv 2606.14368"
    summary = ("on-policy co-distillation: two models tutor each other; teacher = same model + own correct rollout "
               "+ gated, anchored peer feedback")

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        from selfdistill.models import load_model

        cfg = ctx.cfg
        self.check(cfg, ctx.tasks)
        peer_model, _ = load_model(replace(cfg.model, path=cfg.opcod.peer), device=ctx.device)
        check_head(peer_model, setting="opcod.peer")
        if not cfg.opcod.update_peer:
            for p in peer_model.parameters():
                p.requires_grad_(False)
        self.peer = _Student(replace(ctx, model=peer_model))
        self.peer.sample_tag = "peer"  # B draws its own samples of the same prompts
        self.peer_before: list[dict] | None = None

    def trainees(self) -> list[Trainee]:
        """B, stepped by the trainer like A (none when ``opcod.update_peer=false``)."""
        if not self.ctx.cfg.opcod.update_peer:
            return []
        return [Trainee("peer", self.peer.ctx.model, self.peer.loss, self.peer.token_mask)]

    @classmethod
    def check(cls, cfg, tasks) -> None:
        """The peer is set, a causal LM with weights, and shares the student's tokenizer."""
        from selfdistill.models import check_model_config, load_tokenizer, resolve_model_path
        from selfdistill.validation import _check_weights

        if not cfg.opcod.peer:
            raise ConfigError("method opcod needs the second model: --opcod.peer PATH (see `selfdistill opcod "
                              "make-peers`)")
        trust = cfg.model.trust_remote_code
        path = resolve_model_path(cfg.opcod.peer)
        check_model_config(path, trust, setting="opcod.peer")
        _check_weights(path, "opcod.peer")
        if load_tokenizer(path, trust).get_vocab() != load_tokenizer(resolve_model_path(cfg.model.path),
                                                                     trust).get_vocab():
            raise ConfigError(f"opcod.peer {cfg.opcod.peer}: its tokenizer differs from the student's "
                              f"(model.path {cfg.model.path}); the two models must share one")

    # -- evaluation of the peer (the trainer evaluates model A)
    def _eval_peer(self):
        from selfdistill.evaluate import evaluate

        ctx = self.ctx
        return evaluate(unwrap(self.peer.ctx.model), ctx.tokenizer, ctx.tasks, ctx.cfg.eval, ctx.system)

    def setup(self) -> None:
        from selfdistill.evaluate import results_to_json

        if self.ctx.cfg.eval_before and self.peer_before is None and not self.ctx.cfg.resume:
            self.peer_before = results_to_json(self._eval_peer())

    # -- one step
    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        ctx = self.ctx
        ocfg = ctx.cfg.opcod
        t0 = time.perf_counter()
        ro_a, groups_a = self.rollout(items)
        self.peer.ctx.step = ctx.step  # (B's context is a copy of the run's)
        ro_b, groups_b = self.peer.rollout(items)
        att_a, att_b = self.attempts(ro_a, groups_a), self.peer.attempts(ro_b, groups_b)
        t_rollout = time.perf_counter() - t0
        self.views, stats_a = teacher_views(ocfg, items, att_a, att_b)
        batch = self.batch_from_rollouts(ro_a, groups_a, t_rollout)
        batch.info.update(stats_a)
        self.peer.views, stats_b = teacher_views(ocfg, items, att_b, att_a)
        if ocfg.update_peer:
            batch.others["peer"] = self.peer.batch_from_rollouts(ro_b, groups_b)
        batch.info.update({f"peer_{k}": v for k, v in stats_b.items()})
        return batch

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self.ctx.cfg.opcod.update_peer:
            self.peer.teacher.update(step)
        if step + 1 == self.ctx.cfg.steps:
            self._finish()

    def _finish(self) -> None:
        """The peer's before/after evaluation (``peer_results.json``; the trainer saves ``peer_model``)."""
        from selfdistill.evaluate import SplitResult, format_table, results_to_json

        ctx = self.ctx
        after = results_to_json(self._eval_peer()) if ctx.cfg.eval_after else None
        if not ctx.accelerator.is_main_process:
            return
        (ctx.out_dir / "peer_results.json").write_text(json.dumps(
            {"peer": ctx.cfg.opcod.peer, "updated": ctx.cfg.opcod.update_peer, "before": self.peer_before,
             "after": after}, indent=2) + "\n")
        if self.peer_before and after:
            ctx.log("peer before/after:\n" + format_table([SplitResult(**r) for r in self.peer_before],
                                                           [SplitResult(**r) for r in after]))

    # -- checkpoints: the peer's teacher and first evaluation (its weights and optimizer: the trainer's)
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["peer"] = {"teacher": self.peer.teacher.state_dict(), "before": self.peer_before}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        peer = state.get("peer")
        if peer:
            self.peer.teacher.load_state_dict(peer.get("teacher", {}))
            self.peer_before = peer.get("before")
