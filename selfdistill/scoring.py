"""Scoring sequences with a model: per-token log-probs and the next-token loss.

Everything goes through the final hidden states and the objective library's
chunked LM-head path, so no batch x length x vocabulary tensor is held.
Models whose logits are not ``hidden @ W.T`` (final logit soft-capping, as in
Gemma 2) take the plain logits path instead.
"""

from __future__ import annotations

import torch

from selfdistill.models import unwrap
from selfdistill.objectives import reduce_token_losses, token_logprobs_from_hidden
from selfdistill.sequences import SequenceBatch, forward_hidden, shift_targets


def _plain_head(model) -> bool:
    cfg = unwrap(model).config
    return not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) is None


def lm_head_weight(model) -> torch.Tensor:
    """The output embedding matrix (V, H)."""
    return unwrap(model).get_output_embeddings().weight


def hidden_and_head(model, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of positions 0..T-2 (predicting tokens 1..T-1) and the head weight."""
    hidden_BTH = forward_hidden(model, batch)
    return hidden_BTH[:, :-1], lm_head_weight(model)


def target_logprobs(model, batch: SequenceBatch, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """log p(token_{t+1} | prefix) for t = 0..T-2, shape (B, T-1), fp32."""
    targets_BT, _ = shift_targets(batch)
    if not _plain_head(model):
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                       position_ids=batch.position_ids_BT).logits[:, :-1].float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
    hidden_BTH, weight_VH = hidden_and_head(model, batch)
    return token_logprobs_from_hidden(hidden_BTH, weight_VH, targets_BT, temperature=temperature,
                                      chunk_size=chunk_size)


def next_token_loss(model, batch: SequenceBatch, num_tokens: float | torch.Tensor) -> tuple[torch.Tensor, dict]:
    """SFT loss: summed NLL of completion tokens / ``num_tokens`` (the global count)."""
    logp_BT = target_logprobs(model, batch)
    _, mask_BT = shift_targets(batch)
    loss = reduce_token_losses(-logp_BT, mask_BT, num_items_in_batch=num_tokens)
    with torch.no_grad():
        n = mask_BT.sum().clamp(min=1)
        nll = float((-(logp_BT * mask_BT).sum() / n).item())
    return loss, {"nll": nll}
