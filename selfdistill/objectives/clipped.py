"""Reverse KL on the teacher's top-k support, clamped per vocabulary element (d-OPSD's loss).

For a position with student logits ``s`` and teacher logits ``t``, let ``S`` be the teacher's ``k`` most
probable tokens, and ``q_s``, ``q_t`` both distributions renormalised over ``S``. The loss is::

    sum_{v in S} min(q_s(v) * (log q_s(v) - log q_t(v)), clip)

(``clip`` = 0: no clamp, the plain renormalised top-k reverse KL of :func:`per_row_divergence`). The clamp
stops a few positions where the student is far from the teacher from dominating the step; an element at the
clamp passes no gradient. The teacher is detached. Computed in fp32.

Why not in :func:`~selfdistill.objectives.divergence_from_hidden`: the clamp acts on each vocabulary element
before the sum, which its closed-form gradient does not have, and d-OPSD trains a few positions per state
(autograd on ``N x k`` values is cheap).
"""

from __future__ import annotations

import torch
from torch import Tensor


def teacher_topk(teacher_logits_NV: Tensor, topk: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The teacher's top-``k`` token ids (N, k) and its log-probs renormalised over them (N, k), detached."""
    t = teacher_logits_NV.detach().float() / temperature
    k = min(topk, t.shape[-1])
    vals, ids = t.topk(k, dim=-1)
    return ids, vals.log_softmax(-1)


def clipped_reverse_kl_on_support(student_logits_NV: Tensor, support_ids_NK: Tensor, teacher_logp_NK: Tensor,
                                  clip: float, temperature: float = 1.0) -> Tensor:
    """Per row (N,): the module's clamped reverse KL, for a support and teacher log-probs given (e.g. from
    :func:`teacher_topk`, computed once when the batch was made)."""
    ls = (student_logits_NV.float() / temperature).gather(-1, support_ids_NK).log_softmax(-1)
    elem = ls.exp() * (ls - teacher_logp_NK.detach().float())
    if clip > 0:
        elem = elem.clamp(max=clip)
    return elem.sum(-1)


def clipped_topk_reverse_kl(student_logits_NV: Tensor, teacher_logits_NV: Tensor, topk: int, clip: float,
                            temperature: float = 1.0) -> Tensor:
    """Per row (N,): the module's clamped reverse KL over the teacher's top-``topk`` tokens."""
    ids, lt = teacher_topk(teacher_logits_NV, topk, temperature)
    return clipped_reverse_kl_on_support(student_logits_NV, ids, lt, clip, temperature)
