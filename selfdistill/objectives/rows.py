"""Shared plumbing of the two chunked drivers: pick the masked-in rows, finish the loss.

Only completion tokens (non-zero mask) are ever computed, so padding costs
nothing and cannot leak NaN into the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfdistill.objectives.config import DivergenceConfig
from selfdistill.objectives.divergence import check_token_ids, needs_token_ids
from selfdistill.objectives.reduce import (
    Count,
    Reduction,
    as_mask,
    importance_weights,
    reduce_token_losses,
    sampled_token_loss,
)


@dataclass
class Rows:
    """The M masked-in rows of N flattened positions."""

    lead_shape: torch.Size  # leading shape of the inputs, e.g. (B, T)
    mask_N: Tensor  # float mask over all N positions
    rows_M: Tensor  # indices of the non-zero mask entries
    token_ids_M: Tensor | None
    old_logprobs_M: Tensor | None


def select_rows(
    lead_shape: torch.Size,
    device: torch.device,
    mask: Tensor | None,
    token_ids: Tensor | None,
    old_logprobs: Tensor | None,
    cfg: DivergenceConfig,
    vocab: int,
) -> Rows:
    """Flatten the mask, find the rows to compute, and check what ``cfg`` needs."""
    shape_probe = torch.empty(lead_shape, device=device, dtype=torch.float32)
    if mask is not None and mask.shape != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match token positions {tuple(lead_shape)}")
    mask_N = as_mask(mask, shape_probe).reshape(-1)
    rows_M = (mask_N != 0).nonzero().squeeze(-1)
    ids_M = old_M = None
    if needs_token_ids(cfg):
        why = "kind='sampled'" if cfg.kind == "sampled" else f"is_clip={cfg.is_clip}"
        if token_ids is None:
            raise ValueError(f"{why} needs token_ids (the realised tokens)")
        if token_ids.shape != lead_shape:
            raise ValueError(
                f"token_ids shape {tuple(token_ids.shape)} does not match token positions {tuple(lead_shape)}"
            )
        ids_M = token_ids.to(device).reshape(-1)[rows_M].long()
        check_token_ids(ids_M, vocab)
    if cfg.is_clip is not None:
        if old_logprobs is None:
            raise ValueError(f"is_clip={cfg.is_clip} needs old_logprobs (the rollout policy's log-probs of the tokens)")
        if old_logprobs.shape != lead_shape:
            raise ValueError(
                f"old_logprobs shape {tuple(old_logprobs.shape)} does not match token positions {tuple(lead_shape)}"
            )
        old_M = old_logprobs.to(device).reshape(-1)[rows_M].float()
    return Rows(lead_shape, mask_N, rows_M, ids_M, old_M)


def finish(
    out_MK: Tensor,
    rows: Rows,
    cfg: DivergenceConfig,
    num_items_in_batch: Count | None,
    reduction: Reduction,
) -> Tensor:
    """Per-row outputs -> per-token loss (IS-weighted) -> reduced over the mask."""
    if cfg.kind == "sampled":
        per_M = sampled_token_loss(
            out_MK[:, 0], out_MK[:, 1], old_logprobs=rows.old_logprobs_M, is_clip=cfg.is_clip, reduction="none"
        )
    else:
        per_M = out_MK[:, 0]
        if cfg.is_clip is not None:
            assert rows.old_logprobs_M is not None
            per_M = per_M * importance_weights(out_MK[:, 1], rows.old_logprobs_M, cfg.is_clip)
    per_N = per_M.new_zeros(rows.mask_N.shape).index_copy(0, rows.rows_M, per_M)
    out = reduce_token_losses(per_N, rows.mask_N, num_items_in_batch=num_items_in_batch, reduction=reduction)
    return out.reshape(rows.lead_shape) if reduction == "none" else out
