"""On-policy distillation with a teacher view: the shared recipe of OPSD, SDFT, SDPO, ...

Each step:

1. the student samples ``onpolicy.samples_per_prompt`` completions per prompt
   (on-policy, current weights);
2. the method's *view* writes the teacher's prompt for each sample (problem +
   privileged context), or ``None`` to give that sample no teacher signal;
3. student and teacher score the same completion tokens, each behind its
   own prompt (both through the chat template);
4. the objective library's per-token divergence (``distill.*``) is taken on
   the completion tokens, normalised by the global token count.

Subclasses only write :meth:`OnPolicyMethod.teacher_prompts`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from selfdistill.methods.base import Method, TrainBatch
from selfdistill.models import unwrap, unwrap_ddp
from selfdistill.rollout import Rollouts, generate
from selfdistill.scoring import lm_head
from selfdistill.objectives import divergence_from_hidden
from selfdistill.sequences import (SequenceBatch, chat_prompt, completion_values, encode_prompts, forward_hidden,
                                   make_batch)
from selfdistill.tasks.base import Item
from selfdistill.teachers import Teacher


@dataclass
class Group:
    """The rollouts of one prompt, with verifier rewards when a method asks for them."""

    item: Item
    texts: list[str]
    rewards: list[float] | None = None


def rollout_policy_logprobs(ro: Rollouts, student: SequenceBatch, tensors: dict[str, torch.Tensor]
                            ) -> dict[str, float]:
    """The rollout policy's log-probs for an importance ratio, and the metric that says where they come from.

    Sampled by an engine (vLLM): its own log-probs go to ``tensors["old_logp_BT"]`` (column t = log p of
    token t), and ``is_ratio_exact`` is 0. Sampled in process by the trained model, whose batch is used for
    exactly one optimizer step: the rollout policy is the model at these very weights, so the ratio is
    exactly 1, no "old" log-probs are stored (no extra forward) and ``is_ratio_exact`` is 1.
    """
    if ro.sampler_logprobs is None:
        return {"is_ratio_exact": 1.0}
    tensors["old_logp_BT"] = completion_values(student, ro.sampler_logprobs)
    return {"is_ratio_exact": 0.0}


class OnPolicyMethod(Method):
    """Student rollouts scored by a teacher view; loss from the objective library."""

    needs_rewards: bool = False
    sections = ("onpolicy", "distill", "teacher")
    #: Part of every rollout's sampling key: a second model rolling out the same prompts (OPCoD's peer) draws
    #: its own samples.
    sample_tag: str = "rollout"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.teacher = self.make_teacher()

    def make_teacher(self) -> Teacher | None:
        """The teacher whose views score the rollouts (``teacher.*``); a method without one returns None."""
        return Teacher(unwrap_ddp(self.ctx.model), self.ctx.cfg.teacher)

    # -- what subclasses write
    def teacher_prompts(self, groups: list[Group]) -> list[list[str | None]]:
        """Per group, per rollout: the teacher's user message, or None for no signal."""
        raise NotImplementedError

    def teacher_view(self, module) -> contextlib.AbstractContextManager:
        """An activation view installed on the teacher module for its forward (default: none)."""
        return contextlib.nullcontext()

    @classmethod
    def teacher_users_before_training(cls, cfg, items: list[Item]) -> tuple[list[str], str] | None:
        """Each train item's teacher message as far as it can be written before any rollout, and what it
        leaves out (``""``: nothing); None when it depends on the rollouts (then checked as they come)."""
        return None

    @classmethod
    def ratio_temperature(cls, cfg) -> float | None:
        """The temperature of the trained model's log-probs in the importance ratio against the rollout policy
        (``distill.temperature`` with ``distill.is_clip``), None when the method forms no ratio."""
        return cfg.distill.temperature if cfg.distill.is_clip is not None else None

    @classmethod
    def check(cls, cfg, tasks) -> None:
        """The longest teacher prompt that can be written up front fits ``onpolicy.max_teacher_prompt_tokens``."""
        items = [it for t in tasks for it in t.items("train")]
        users = cls.teacher_users_before_training(cfg, items)
        if users is not None:
            from selfdistill.validation import check_teacher_prompts

            check_teacher_prompts(cfg, items, *users)

    # -- the shared recipe
    def rollout(self, items: list[Item]) -> tuple[Rollouts, list[Group]]:
        ctx, k = self.ctx, self.ctx.cfg.onpolicy.samples_per_prompt
        prompts = [chat_prompt(ctx.tokenizer, it.prompt, ctx.system) for it in items for _ in range(k)]
        ro = generate(unwrap(ctx.model), ctx.tokenizer, prompts, ctx.cfg.rollout,
                      row_seeds=ctx.sample_seeds(ctx.step, len(items), k, self.sample_tag))
        groups = []
        for i, it in enumerate(items):
            texts = ro.texts[i * k:(i + 1) * k]
            rewards = None
            if self.needs_rewards:
                from selfdistill.tasks.verify import verify_item

                rewards = [float(verify_item(it, t)) for t in texts]
            groups.append(Group(it, texts, rewards))
        return ro, groups

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        t0 = time.perf_counter()
        ro, groups = self.rollout(items)
        return self.batch_from_rollouts(ro, groups, time.perf_counter() - t0)

    def batch_from_rollouts(self, ro: Rollouts, groups: list[Group], t_rollout: float = 0.0) -> TrainBatch:
        """Teacher views, student and teacher sequences, weights for rollouts already sampled."""
        t_users = [u for g in self.teacher_prompts(groups) for u in g]
        keep = [u is not None for u in t_users]
        items = [g.item for g in groups for _ in g.texts]
        t_ids = self.teacher_ids([u if u is not None else it.prompt for u, it in zip(t_users, items)], items)
        student, teacher = self.sequences(ro.prompt_ids, ro.completion_ids, t_ids)
        weights = torch.tensor([1.0 if k else 0.0 for k in keep])
        tensors = {"weights_B": weights}
        info = {"teacher_signal_frac": float(weights.mean()), "time_rollout_s": t_rollout,
                "completion_len": sum(len(c) for c in ro.completion_ids) / max(1, len(ro.completion_ids))}
        if self.ctx.cfg.distill.is_clip is not None:
            info.update(rollout_policy_logprobs(ro, student, tensors))
        if self.needs_rewards:
            rs = [r for g in groups for r in (g.rewards or [])]
            info["reward_mean"] = sum(rs) / max(1, len(rs))
        return TrainBatch(student, teacher, tensors, info)

    def teacher_ids(self, users: list[str], items: list[Item]) -> list[list[int]]:
        """Teacher prompts (user messages through the chat template) as ids, each within
        ``onpolicy.max_teacher_prompt_tokens`` (else an error naming its item)."""
        ctx = self.ctx
        ids_all = encode_prompts(ctx.tokenizer, [chat_prompt(ctx.tokenizer, u, ctx.system) for u in users])
        limit = ctx.cfg.onpolicy.max_teacher_prompt_tokens
        for ids, it in zip(ids_all, items):
            if len(ids) > limit:
                raise ValueError(f"teacher prompt for item {it.id} has {len(ids)} tokens, over "
                                 f"onpolicy.max_teacher_prompt_tokens={limit}")
        return ids_all

    def sequences(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  teacher_prompt_ids: list[list[int]]) -> tuple[SequenceBatch, SequenceBatch]:
        """The student's and the teacher's sequences of the same completions (row for row)."""
        pad = self.ctx.tokenizer.pad_token_id
        return make_batch(prompt_ids, completion_ids, pad), make_batch(teacher_prompt_ids, completion_ids, pad)

    def token_mask(self, batch: TrainBatch) -> torch.Tensor:
        return batch.student.completion_mask_BT[:, 1:] * batch.tensors["weights_B"][:, None].to(
            batch.student.completion_mask_BT.device)

    def loss(self, micro: TrainBatch, num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ctx = self.ctx
        s_batch, t_batch = micro.student.to(ctx.device), micro.teacher.to(ctx.device)
        s_mask = s_batch.completion_mask_BT[:, 1:].bool()
        t_mask = t_batch.completion_mask_BT[:, 1:].bool()
        s_rows = forward_hidden(ctx.model, s_batch)[:, :-1][s_mask]
        t0 = time.perf_counter()
        with self.teacher.scoring() as tm, self.teacher_view(tm):
            t_rows = forward_hidden(tm, t_batch)[:, :-1][t_mask]
            t_head = lm_head(tm).detach()
        t_teacher = time.perf_counter() - t0
        weights_N = micro.tensors["weights_B"].to(ctx.device)[:, None].expand_as(s_mask)[s_mask]
        ids_N = s_batch.input_ids_BT[:, 1:][s_mask]
        old = micro.tensors.get("old_logp_BT")
        old_N = old.to(ctx.device)[:, 1:][s_mask] if old is not None else None
        loss = self.objective(s_rows, lm_head(ctx.model), t_rows, t_head, weights_N, ids_N, old_N, num_tokens)
        return loss, {"time_teacher_s": t_teacher}

    def objective(self, s_rows, s_head, t_rows, t_head, weights_N, ids_N, old_N, num_tokens) -> torch.Tensor:
        """The per-token objective on the completion rows (default: ``distill.*`` from the objective library)."""
        dcfg, scale = self.ctx.cfg.distill, 1.0
        if dcfg.is_clip is not None and old_N is None:  # sampled at these weights: min(exp(0), c) = min(1, c)
            dcfg, scale = replace(dcfg, is_clip=None), min(1.0, dcfg.is_clip)
        loss = divergence_from_hidden(s_rows, s_head, t_rows, t_head, mask_N=weights_N, cfg=dcfg, token_ids_N=ids_N,
                                      old_logprobs_N=old_N, num_items_in_batch=num_tokens)
        return loss * scale if scale != 1.0 else loss

    def after_step(self, step: int) -> None:
        if self.teacher is not None:
            self.teacher.update(step)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.teacher is not None:
            self.teacher.load_state_dict(state.get("teacher", {}))
