"""Reverse KL over a fixed subset of the vocabulary (SafeSteer's localized loss).

Per position, with ``S`` the chosen token ids (the same at every position)::

    L = sum_{v in S} p_S(v) * (log p_S(v) - log p_T(v))

``p`` are the full-vocabulary softmax probabilities (no renormalisation: the
paper's loss and its code's effective behaviour). ``renormalise=True`` first
renormalises both distributions over ``S`` (a proper KL between the two
restricted distributions; the official code means to offer it, but its flag is
never read). The unrenormalised sum is not a divergence: it can be negative
when the student puts less mass on ``S`` than the teacher, and it pulls the
student towards the teacher only on those tokens. Computed in fp32, chunk by
chunk; each chunk's logits are recomputed in backward (activation
checkpointing), so memory is a few ``chunk x vocab`` tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from selfdistill.objectives.hidden import LMHead, as_head
from selfdistill.objectives.reduce import Count, reduce_token_losses


def subset_reverse_kl_rows(student_logits_NV: Tensor, teacher_logits_NV: Tensor, ids_K: Tensor,
                           renormalise: bool = False, temperature: float = 1.0, detach_ratio: bool = False) -> Tensor:
    """Per row (N,): sum over ``ids_K`` of p_S (log p_S - log p_T); the teacher is detached.

    ``detach_ratio``: the same value, with the log-ratio detached, so the gradient is
    ``(log p_S - log p_T) grad p_S`` and vanishes at p_S = p_T. The exact gradient adds ``grad p_S`` per
    token (the "+1" of d(p log p)); over the whole vocabulary those sum to zero, over a subset they do not,
    and they move each p_S(v) to p_T(v) / e instead of p_T(v) (scripts/safesteer_fixed_point.py).
    """
    ls = torch.log_softmax(student_logits_NV.float() / temperature, dim=-1).index_select(-1, ids_K)
    lt = torch.log_softmax(teacher_logits_NV.detach().float() / temperature, dim=-1).index_select(-1, ids_K)
    if renormalise:
        ls = ls - ls.logsumexp(-1, keepdim=True)
        lt = lt - lt.logsumexp(-1, keepdim=True)
    ratio = ls - lt
    return (ls.exp() * (ratio.detach() if detach_ratio else ratio)).sum(-1)


def subset_reverse_kl_from_hidden(
    student_hidden_NH: Tensor, student_head_VH: "Tensor | LMHead", teacher_hidden_NH: Tensor,
    teacher_head_VH: "Tensor | LMHead", ids_K: Tensor, mask_N: Tensor | None = None, *, renormalise: bool = False,
    temperature: float = 1.0, chunk_size: int = 1024, num_items_in_batch: Count | None = None,
    detach_ratio: bool = False,
) -> Tensor:
    """The subset reverse KL from last hidden states (N, H) and LM heads (weights or :class:`LMHead`),
    reduced over ``mask_N`` (weights; divided by ``num_items_in_batch`` when given, else by the mask's
    token count)."""
    if student_hidden_NH.shape[0] != teacher_hidden_NH.shape[0]:
        raise ValueError(f"student rows {student_hidden_NH.shape[0]} != teacher rows {teacher_hidden_NH.shape[0]}")
    s_head, t_head = as_head(student_head_VH), as_head(teacher_head_VH).detach()
    vocab = min(s_head.weight_VH.shape[0], t_head.weight_VH.shape[0])
    ids = ids_K.to(student_hidden_NH.device).long()
    if ids.numel() == 0 or int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"subset ids must be a non-empty set of ids in [0, {vocab})")

    def rows(hs: Tensor, ht: Tensor) -> Tensor:  # logits past the shared vocabulary are padding ids: cut
        return subset_reverse_kl_rows(s_head.logits(hs)[:, :vocab], t_head.logits(ht)[:, :vocab], ids, renormalise,
                                      temperature, detach_ratio)

    parts = []
    for s in range(0, student_hidden_NH.shape[0], chunk_size):
        hs, ht = student_hidden_NH[s:s + chunk_size], teacher_hidden_NH[s:s + chunk_size].detach()
        parts.append(checkpoint(rows, hs, ht, use_reentrant=False) if hs.requires_grad else rows(hs, ht))
    per_N = torch.cat(parts) if parts else student_hidden_NH.new_zeros(0, dtype=torch.float32)
    return reduce_token_losses(per_N, mask_N, num_items_in_batch=num_items_in_batch)
