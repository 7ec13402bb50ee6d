"""Masks, global token normalisation, importance weights, the sampled-token loss.

Gradient accumulation and multi-process training give the right gradient only
if every micro-batch divides by the same number: the completion tokens of the
whole global batch. The caller computes it once with :func:`global_token_count`
and passes it as ``num_items_in_batch``; then the micro-batch losses add up to
the full-batch loss exactly.

Note for DDP: DDP *averages* gradients over processes, so with a global
denominator multiply the loss by the world size (as transformers' Trainer
does) to get the gradient of the global-batch mean.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
Count = int | float | Tensor


def as_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    """A float mask shaped like ``like`` (all ones if None); bool, int and float masks accepted."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.float32, device=like.device)
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match per-token shape {tuple(like.shape)}")
    return mask.to(device=like.device, dtype=torch.float32)


def reduce_token_losses(
    per_token: Tensor,
    mask: Tensor | None = None,
    *,
    num_items_in_batch: Count | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Reduce per-token losses over the completion mask.

    'none': per-token losses with masked positions set to exactly 0 (also if
    they held NaN/inf). 'sum': masked sum. 'mean': masked sum divided by
    ``num_items_in_batch`` (the global token count) if given, else by this
    batch's token count. Non-zero mask entries are tokens and also weights.
    An all-masked batch gives 0, not NaN.
    """
    m = as_mask(mask, per_token)
    weighted = torch.where(m != 0, per_token.float() * m, torch.zeros((), device=per_token.device))
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r} is unknown; choose 'mean', 'sum' or 'none'")
    if num_items_in_batch is None:
        denom = (m != 0).sum().float()
    else:
        denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=total.device)
    return total / denom.clamp_min(1.0)


def global_token_count(mask: Tensor | Sequence[Tensor], accelerator: Any = None) -> Tensor:
    """Completion tokens (non-zero mask entries) over micro-batches and processes.

    Pass one mask or the list of all micro-batch masks of an optimizer step.
    Summed across processes through ``accelerator.reduce`` if given, else
    through torch.distributed when it is initialised. Returns a float scalar.
    """
    masks = [mask] if isinstance(mask, Tensor) else list(mask)
    if not masks:
        raise ValueError("global_token_count needs at least one mask")
    device = masks[0].device
    count = sum(((m != 0).sum().to(device) for m in masks), torch.zeros((), dtype=torch.long, device=device))
    count = count.float()
    if accelerator is not None:
        count = accelerator.reduce(count, reduction="sum")
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM)
    return count


def importance_weights(student_logprobs: Tensor, old_logprobs: Tensor, clip: float) -> Tensor:
    """min(exp(logp_now - logp_rollout), clip), detached: the truncated IS weight."""
    if student_logprobs.shape != old_logprobs.shape:
        raise ValueError(
            f"old_logprobs shape {tuple(old_logprobs.shape)} does not match "
            f"student log-probs shape {tuple(student_logprobs.shape)}"
        )
    log_ratio = student_logprobs.detach().float() - old_logprobs.detach().float().to(student_logprobs.device)
    return log_ratio.exp().clamp_max(clip)


def sampled_token_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    old_logprobs: Tensor | None = None,
    is_clip: float | None = None,
    num_items_in_batch: Count | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Sampled-token estimator on the realised tokens (any shape, e.g. (B, T)).

    ``A_t = stopgrad(log p_T(y_t) - log p_S(y_t))`` and ``loss_t = -A_t * log p_S(y_t)``:
    its gradient is the single-sample estimate of the reverse-KL gradient.
    With ``is_clip``, each token is weighted by :func:`importance_weights`.
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f"student log-probs {tuple(student_logprobs.shape)} and teacher log-probs "
            f"{tuple(teacher_logprobs.shape)} differ in shape"
        )
    logp_s = student_logprobs.float()
    advantage = (teacher_logprobs.detach().float() - logp_s.detach())
    per_token = -advantage * logp_s
    if is_clip is not None:
        if old_logprobs is None:
            raise ValueError("is_clip is set but old_logprobs (the rollout policy's log-probs) were not given")
        per_token = per_token * importance_weights(logp_s, old_logprobs, is_clip)
    return reduce_token_losses(per_token, mask, num_items_in_batch=num_items_in_batch, reduction=reduction)
