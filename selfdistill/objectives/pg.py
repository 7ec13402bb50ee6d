"""Policy-gradient objectives: group-normalised advantages and the clipped surrogate.

GRPO (DeepSeekMath, arXiv 2402.03300) and PPO share one per-token loss::

    ratio_t = exp(log p(y_t) - log p_old(y_t))          p_old: the rollout policy (no grad)
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps_high) * A)
              + kl_coef * (exp(r_t) - r_t - 1),   r_t = log p_ref(y_t) - log p(y_t)

The KL term is the "k3" estimator of KL(p || p_ref) that GRPO adds per token.
Advantages broadcast against the tokens ((B, 1) for one advantage per
sequence, (B, T) per token). The reduction is the library's
:func:`~selfdistill.objectives.reduce.reduce_token_losses`: with
``num_items_in_batch`` the global token count, micro-batches add up exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.objectives.reduce import Count, Reduction, reduce_token_losses


def group_advantages(rewards_GK: Tensor, *, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """(r - mean) / (std + eps) within each group (last axis = the samples of one prompt).

    ``std`` is the sample standard deviation (unbiased, as torch / TRL compute
    it); a group of one sample, or whose rewards are all equal, gets advantage
    0. ``scale=False`` keeps only the centring (Dr. GRPO, arXiv 2503.20783).
    """
    r = rewards_GK.double()
    centred = r - r.mean(-1, keepdim=True)
    if not scale:
        return centred.float()
    if r.shape[-1] < 2:
        return torch.zeros_like(r, dtype=torch.float32)
    return (centred / (r.std(-1, keepdim=True, unbiased=True) + eps)).float()


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token unbiased, non-negative estimate of KL(p || p_ref): exp(d) - d - 1, d = log p_ref - log p."""
    d = ref_logprobs.detach().float().to(logprobs.device) - logprobs.float()
    return torch.expm1(d) - d


def policy_gradient_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    num_items_in_batch: Count | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """The clipped-ratio policy-gradient loss on realised tokens (PPO / GRPO), see the module doc.

    ``logprobs``: log p(y_t) under the current weights (differentiable), any
    shape (e.g. (B, T)); ``old_logprobs``: the same tokens under the rollout
    policy (detached here); ``advantages``: broadcastable to ``logprobs``;
    ``clip_eps_high`` defaults to ``clip_eps`` (set it higher for DAPO's
    clip-higher). ``kl_coef`` > 0 needs ``ref_logprobs``.
    """
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs shape {tuple(old_logprobs.shape)} does not match log-probs shape "
                         f"{tuple(logprobs.shape)}")
    if not clip_eps >= 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    logp = logprobs.float()
    adv = torch.broadcast_to(advantages.detach().float().to(logp.device), logp.shape)
    ratio = torch.exp(logp - old_logprobs.detach().float().to(logp.device))
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv)
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef is set but ref_logprobs (the reference model's log-probs) were not given")
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} does not match log-probs shape "
                             f"{tuple(logprobs.shape)}")
        per_token = per_token + kl_coef * kl_k3(logp, ref_logprobs)
    return reduce_token_losses(per_token, mask, num_items_in_batch=num_items_in_batch, reduction=reduction)


@torch.no_grad()
def clip_fraction(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None, *,
                  clip_eps: float = 0.2, clip_eps_high: float | None = None) -> float:
    """Share of masked tokens whose ratio is clipped (the min took the clipped branch strictly)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs.float() - old_logprobs.float().to(logprobs.device))
    adv = torch.broadcast_to(advantages.float().to(ratio.device), ratio.shape)
    clipped = ((ratio > 1 + high) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    m = torch.ones_like(ratio) if mask is None else mask.float().to(ratio.device)
    return float((clipped.float() * m).sum() / m.sum().clamp_min(1.0))
