"""GRPO: the reward-only baseline of the feedback family (SGSD and critique papers compare with it).

Each step: ``onpolicy.samples_per_prompt`` student rollouts per prompt, a 0/1
reward per rollout from the task verifier, group-normalised advantages, and
the clipped-ratio policy-gradient loss of the objective library
(:func:`~selfdistill.objectives.policy_gradient_loss`) against the rollout
policy's log-probs, optionally with a k3 KL to the initial model; token-level
normalisation by the global completion-token count. Log-probs are taken at
:func:`grpo_temperature` (the sampling temperature unless ``grpo.temperature``
is set).

The rollout policy (see :func:`~selfdistill.methods.onpolicy.rollout_policy_logprobs`): sampled in
process, it is the model at the very weights the batch's one update starts from, so the ratio is exactly
1 and the "old" log-probs are the current ones, detached (no extra forward); sampled by vLLM, they are the
engine's own log-probs of its samples.
"""

from __future__ import annotations

import time

import torch

from selfdistill.methods.base import TrainBatch, register
from selfdistill.methods.onpolicy import OnPolicyMethod, rollout_policy_logprobs
from selfdistill.models import unwrap_ddp
from selfdistill.objectives import clip_fraction, group_advantages, policy_gradient_loss
from selfdistill.scoring import target_logprobs
from selfdistill.sequences import make_batch
from selfdistill.tasks.base import Item
from selfdistill.teachers import Teacher, TeacherConfig


def grpo_temperature(cfg) -> float:
    """The temperature of GRPO's log-probs: ``grpo.temperature`` if set, else the sampling temperature
    (``rollout.temperature``; 1 when sampling is greedy)."""
    t = cfg.grpo.temperature
    return float(t) if t is not None else cfg.rollout.logprob_temperature


@register
class GRPO(OnPolicyMethod):
    name = "grpo"
    sections = ("onpolicy", "grpo")
    paper = "arXiv 2402.03300"
    summary = "GRPO: verifier rewards, group-normalised advantages, clipped-ratio policy gradient"
    needs_rewards = True

    @classmethod
    def ratio_temperature(cls, cfg) -> float | None:
        return grpo_temperature(cfg)

    def make_teacher(self) -> Teacher | None:
        """No teacher view: only the initial model as the reference of the KL term, when it has a weight."""
        if self.ctx.cfg.grpo.kl_coef <= 0:
            return None
        return Teacher(unwrap_ddp(self.ctx.model), TeacherConfig(kind="initial"))

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        ctx, g = self.ctx, self.ctx.cfg.grpo
        t0 = time.perf_counter()
        ro, groups = self.rollout(items)
        t_rollout = time.perf_counter() - t0
        rewards_GK = torch.tensor([g_.rewards for g_ in groups], dtype=torch.float32)
        adv_B = group_advantages(rewards_GK, eps=g.adv_eps, scale=g.scale_rewards).reshape(-1)
        student = make_batch(ro.prompt_ids, ro.completion_ids, ctx.tokenizer.pad_token_id)
        tensors = {"adv_B": adv_B}
        solved = (rewards_GK.max(-1).values > rewards_GK.min(-1).values).float()
        info = {"reward_mean": float(rewards_GK.mean()), "time_rollout_s": t_rollout,
                "groups_with_signal": float(solved.mean()),
                "completion_len": sum(len(c) for c in ro.completion_ids) / max(1, len(ro.completion_ids))}
        info.update(rollout_policy_logprobs(ro, student, tensors))  # "old_logp_BT" only from an engine
        if self.teacher is not None:
            # Column t holds log p(token t): aligned with the student sequence (split trims it with the padding).
            with torch.no_grad(), self.teacher.scoring() as ref:
                tensors["ref_logp_BT"] = torch.nn.functional.pad(
                    target_logprobs(ref, student.to(ctx.device), temperature=grpo_temperature(ctx.cfg)).cpu(),
                    (1, 0))
        return TrainBatch(student, None, tensors, info)

    def token_mask(self, batch: TrainBatch) -> torch.Tensor:
        return batch.student.completion_mask_BT[:, 1:]

    def loss(self, micro: TrainBatch, num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, g = self.ctx, self.ctx.cfg.grpo
        s = micro.student.to(ctx.device)
        mask_BT = s.completion_mask_BT[:, 1:]
        logp_BT = target_logprobs(ctx.model, s, temperature=grpo_temperature(ctx.cfg))
        old = micro.tensors.get("old_logp_BT")  # the sampler's; else this very policy: the ratio is exactly 1
        old_BT = old.to(ctx.device)[:, 1:] if old is not None else logp_BT.detach()
        adv_B1 = micro.tensors["adv_B"].to(ctx.device)[:, None]
        ref = micro.tensors.get("ref_logp_BT")
        loss = policy_gradient_loss(logp_BT, old_BT, adv_B1, mask_BT, clip_eps=g.clip_eps,
                                    clip_eps_high=g.clip_eps_high,
                                    ref_logprobs=ref.to(ctx.device)[:, 1:] if ref is not None else None,
                                    kl_coef=g.kl_coef, num_items_in_batch=num_tokens)
        return loss, {"clip_frac": clip_fraction(logp_BT.detach(), old_BT, adv_B1, mask_BT, clip_eps=g.clip_eps,
                                                 clip_eps_high=g.clip_eps_high)}

