"""SGSD's gated, bounded token loss (arXiv 2605.28791) on sampled tokens, for a pool of teachers.

Rows are (student sample, teacher) pairs laid out as (R, T) per-token log-probs
of the student's realised tokens under the student and under that teacher::

    delta_t   = stopgrad(log p_T(y_t)) - log p_S(y_t)
    support   = mean_t clip(delta_t, -c, c)                    (c = 3)
    s_sign    = sign(support) if |support| > threshold else 0   (threshold = 0.05)
    outcome   = +1 if reward > 0 else -1
    polarity  = outcome * s_sign
    l_t       = log 2 - softplus(-delta_t^2 / (2 tau))          (tau = 1; 0 at delta = 0, -> log 2)
    row loss  = w * polarity * mean_t l_t
    total     = (sum of row losses) / number of student samples

Positive polarity pulls the student's token log-probs to the teacher's, negative
pushes them away; ``l`` is bounded, so its gradient vanishes where the two
disagree wildly. Support and polarity carry no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from selfdistill.objectives.reduce import Count, Reduction, as_mask

LOG2 = math.log(2.0)


def bounded_token_loss(delta: Tensor, tau: float = 1.0) -> Tensor:
    """l = log 2 - softplus(-delta^2 / (2 tau)), elementwise (fp32)."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    d = delta.float()
    return LOG2 - F.softplus(-(d * d) / (2.0 * tau))


@torch.no_grad()
def teacher_support(delta_RT: Tensor, mask_RT: Tensor | None = None, *, clip: float = 3.0,
                    threshold: float = 0.05) -> tuple[Tensor, Tensor]:
    """Per row: (support = masked mean of clip(delta, -clip, clip), its sign with a dead zone |s| <= threshold).

    A row without masked-in tokens has support 0 and sign 0.
    """
    m = as_mask(mask_RT, delta_RT)
    d = delta_RT.detach().float().clamp(-clip, clip)
    d = torch.where(m != 0, d * m, torch.zeros((), device=d.device))
    support = d.sum(-1) / m.sum(-1).clamp_min(1e-12)
    support = torch.where(m.sum(-1) > 0, support, torch.zeros_like(support))
    sign = torch.where(support.abs() > threshold, torch.sign(support), torch.zeros_like(support))
    return support, sign


def gated_token_loss(
    student_logprobs_RT: Tensor,
    teacher_logprobs_RT: Tensor,
    mask_RT: Tensor | None,
    rewards_R: Tensor,
    weights_R: Tensor | None = None,
    *,
    tau: float = 1.0,
    clip: float = 3.0,
    threshold: float = 0.05,
    num_items_in_batch: Count | None = None,
    groups_R: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """SGSD's objective over teacher rows; see the module doc.

    ``rewards_R``: the verifier reward of each row's student sample;
    ``weights_R``: the teacher's weight (softmax of its retrieval score; 1 if
    None); ``mask_RT``: tokens the loss is taken on (special and format tokens
    excluded by the caller). 'none' returns the per-row losses
    ``w * polarity * mean_t l_t``; 'sum' their sum; 'mean' divides that sum by
    ``num_items_in_batch`` (the global number of student samples) if given,
    else by the number of distinct ``groups_R`` (student samples) in this
    batch, else by R.
    """
    if student_logprobs_RT.shape != teacher_logprobs_RT.shape:
        raise ValueError(f"student log-probs {tuple(student_logprobs_RT.shape)} and teacher log-probs "
                         f"{tuple(teacher_logprobs_RT.shape)} differ in shape")
    if student_logprobs_RT.dim() != 2:
        raise ValueError(f"gated_token_loss takes (rows, tokens) log-probs, got shape "
                         f"{tuple(student_logprobs_RT.shape)}")
    R = student_logprobs_RT.shape[0]
    device = student_logprobs_RT.device
    if rewards_R.shape != (R,):
        raise ValueError(f"rewards must be one per row ({R},), got {tuple(rewards_R.shape)}")
    w = torch.ones(R, device=device) if weights_R is None else weights_R.float().to(device)
    m = as_mask(mask_RT, student_logprobs_RT)
    delta = teacher_logprobs_RT.detach().float() - student_logprobs_RT.float()
    _, s_sign = teacher_support(delta, m, clip=clip, threshold=threshold)
    outcome = torch.where(rewards_R.to(device) > 0, 1.0, -1.0)
    polarity = outcome * s_sign
    ell = bounded_token_loss(delta, tau)
    ell = torch.where(m != 0, ell * m, torch.zeros((), device=device))
    mean_ell = ell.sum(-1) / m.sum(-1).clamp_min(1.0)
    rows = w * polarity * mean_ell
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r} is unknown; choose 'mean', 'sum' or 'none'")
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=device)
    elif groups_R is not None:
        denom = torch.tensor(float(torch.unique(groups_R).numel()), device=device)
    else:
        denom = torch.tensor(float(R), device=device)
    return total / denom.clamp_min(1.0)
