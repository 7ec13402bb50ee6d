"""Logits-based driver: for small vocabularies, tests and reference.

The logits themselves are already (B, T, V); what this bounds is the fp32
working memory (softmaxes, mixtures, top-k), computed chunk by chunk and
recomputed in backward (activation checkpointing per chunk).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from selfdistill.objectives.config import DivergenceConfig
from selfdistill.objectives.divergence import needs_token_ids, resolve_vocab, row_outputs
from selfdistill.objectives.reduce import Count, Reduction
from selfdistill.objectives.rows import finish, select_rows


def token_divergence(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    cfg: DivergenceConfig | None = None,
    mask_BT: Tensor | None = None,
    *,
    token_ids_BT: Tensor | None = None,
    old_logprobs_BT: Tensor | None = None,
    num_items_in_batch: Count | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Per-token objective of ``cfg`` from logits, reduced over the completion mask.

    Any leading shape works ((B, T) or (N,)); the teacher is a constant.
    ``token_ids_BT`` (realised tokens) is needed for kind='sampled' and for
    importance weights, ``old_logprobs_BT`` (rollout log-probs) for ``is_clip``.
    Returns a scalar, or the per-token losses (0 where masked) for reduction='none'.
    """
    cfg = cfg if cfg is not None else DivergenceConfig()
    cfg.validate()
    lead_shape = student_logits_BTV.shape[:-1]
    if teacher_logits_BTV.shape[:-1] != lead_shape:
        raise ValueError(
            f"student logits {tuple(student_logits_BTV.shape)} and teacher logits "
            f"{tuple(teacher_logits_BTV.shape)} differ in their token positions"
        )
    vocab = resolve_vocab(student_logits_BTV.shape[-1], teacher_logits_BTV.shape[-1], cfg.truncate_vocab)
    zs_NV = student_logits_BTV.reshape(-1, student_logits_BTV.shape[-1])[:, :vocab]
    zt_NV = teacher_logits_BTV.detach().reshape(-1, teacher_logits_BTV.shape[-1])[:, :vocab]
    rows = select_rows(lead_shape, zs_NV.device, mask_BT, token_ids_BT, old_logprobs_BT, cfg, vocab)

    def chunk_outputs(zs: Tensor, rows_c: Tensor, ids_c: Tensor | None) -> Tensor:
        return row_outputs(zs[rows_c], zt_NV[rows_c], ids_c, cfg)

    outs = []
    for start in range(0, rows.rows_M.numel(), cfg.chunk_size):
        sl = slice(start, start + cfg.chunk_size)
        ids_c = rows.token_ids_M[sl] if rows.token_ids_M is not None else None
        if torch.is_grad_enabled() and zs_NV.requires_grad:
            outs.append(checkpoint(chunk_outputs, zs_NV, rows.rows_M[sl], ids_c, use_reentrant=False))
        else:
            outs.append(chunk_outputs(zs_NV, rows.rows_M[sl], ids_c))
    if outs:
        out_MK = torch.cat(outs)
    else:  # all masked: an empty result still connected to the graph, so backward gives zeros
        out_MK = zs_NV[:0].float().sum(-1, keepdim=True).expand(0, 2 if needs_token_ids(cfg) else 1)
    return finish(out_MK, rows, cfg, num_items_in_batch, reduction)
