"""Scoring sequences with a model: its LM head, per-token log-probs and the next-token loss.

Everything goes through the final hidden states and the objective library's
chunked LM-head path, so no batch x length x vocabulary tensor is held.
:func:`lm_head` is the one place a model's head is read: its weight, its bias
(Phi-1/2, GPT-J), its logit scale (Cohere, Granite) and its final soft-cap
(Gemma 2), so every path that turns hidden states into log-probs gives what
``model(...).logits`` gives. :func:`check_head` verifies that on a short probe
before a run starts, and refuses a model whose head does something else.
"""

from __future__ import annotations

import torch

from selfdistill.models import unwrap
from selfdistill.objectives import reduce_token_losses, token_logprobs_from_hidden
from selfdistill.objectives.hidden import LMHead
from selfdistill.sequences import SequenceBatch, forward_hidden, shift_targets


def _logit_scale(cfg) -> float:
    """The factor on the head's logits: Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``."""
    scale = getattr(cfg, "logit_scale", None)
    scale = 1.0 if scale is None else float(scale)
    divide = getattr(cfg, "logits_scaling", None)
    return scale / float(divide) if divide else scale


def lm_head(model) -> LMHead:
    """The model's output layer as the chunked paths apply it (weight, bias, logit scale, soft-cap)."""
    m = unwrap(model)
    out = m.get_output_embeddings()
    cap = getattr(m.config, "final_logit_softcapping", None)
    return LMHead(out.weight, getattr(out, "bias", None), _logit_scale(m.config), float(cap) if cap else None)


#: Largest relative gap between :func:`lm_head`'s logits and the model's own that :func:`check_head` accepts,
#: per dtype (half precision: the head's output rounding).
HEAD_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


@torch.no_grad()
def head_mismatch(model, length: int = 8) -> float:
    """max |lm_head(hidden) - model(...).logits| / max(1, max |logits|) on a fixed probe sequence (eval mode)."""
    m = unwrap(model)
    vocab = m.get_output_embeddings().weight.shape[0]
    device = next(m.parameters()).device
    ids = (torch.arange(length, device=device)[None] * 7919 + 3) % vocab
    batch = SequenceBatch(ids, torch.ones_like(ids), torch.ones_like(ids), torch.arange(length, device=device)[None])
    was = m.training
    m.eval()
    try:
        want = m(input_ids=ids, attention_mask=batch.attention_mask_BT, position_ids=batch.position_ids_BT,
                 use_cache=False).logits.float()
        got = lm_head(m).logits(forward_hidden(m, batch, share_prefixes=False))
    finally:
        m.train(was)
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


def check_head(model, setting: str = "model.path") -> None:
    """Raise ConfigError (naming ``setting``) unless :func:`lm_head` reproduces the model's logits.

    A head this module does not know (another scale, a cap under another name, a transform of the
    hidden states before the head) would otherwise give every loss wrong log-probs without a sign.
    Masked-diffusion models are scored through their own logits and are not checked.
    """
    from selfdistill.config_io import ConfigError
    from selfdistill.diffusion import is_masked_diffusion

    m = unwrap(model)
    if is_masked_diffusion(m):
        return
    dtype = m.get_output_embeddings().weight.dtype
    gap = head_mismatch(m)
    if gap > HEAD_TOLERANCE.get(dtype, 2e-2):
        raise ConfigError(
            f"{setting}: model type {getattr(m.config, 'model_type', type(m).__name__)!r} computes its logits "
            f"differently from hidden @ W.T (+ bias), scaled and soft-capped as its config says (relative gap "
            f"{gap:.2g} on a probe); selfdistill's scoring would train it on wrong log-probs")


def hidden_and_head(model, batch: SequenceBatch) -> tuple[torch.Tensor, LMHead]:
    """Hidden states of positions 0..T-2 (predicting tokens 1..T-1) and the head."""
    hidden_BTH = forward_hidden(model, batch)
    return hidden_BTH[:, :-1], lm_head(model)


def target_logprobs(model, batch: SequenceBatch, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """log p(token_{t+1} | prefix) for t = 0..T-2, shape (B, T-1), fp32."""
    targets_BT, _ = shift_targets(batch)
    hidden_BTH, head = hidden_and_head(model, batch)
    return token_logprobs_from_hidden(hidden_BTH, head, targets_BT, temperature=temperature, chunk_size=chunk_size)


def next_token_loss(model, batch: SequenceBatch, num_tokens: float | torch.Tensor) -> tuple[torch.Tensor, dict]:
    """SFT loss: summed NLL of completion tokens / ``num_tokens`` (the global count)."""
    logp_BT = target_logprobs(model, batch)
    _, mask_BT = shift_targets(batch)
    loss = reduce_token_losses(-logp_BT, mask_BT, num_items_in_batch=num_tokens)
    with torch.no_grad():
        n = mask_BT.sum().clamp(min=1)
        nll = float((-(logp_BT * mask_BT).sum() / n).item())
    return loss, {"nll": nll}
