"""Hidden-state driver: the memory-bounded path for real vocabularies.

Starting from the last hidden states and the lm_head weight, logits exist only
one chunk of tokens at a time: ``chunk x V``. The forward pass keeps nothing
but the per-token outputs; backward recomputes each chunk's logits, computes
the gradient with respect to them in closed form (``divergence_value_and_grad``)
and folds it straight into the gradients of the hidden states and the lm_head
weight (and bias). Peak extra memory is about 5 ``chunk x V`` fp32 tensors
plus one fp32 ``V x H`` weight-gradient buffer (only if the head is
trainable), never ``N x V``.

Cost: the student and teacher head matmuls run twice (forward and backward),
as with activation checkpointing. The head matmul runs in the weight's dtype
with autocast off (forward and recompute must agree), the rest in fp32. A head
is a weight matrix or an :class:`LMHead`: ``hidden @ W.T``, plus a bias (Phi,
GPT-J), times a logit scale (Cohere, Granite), soft-capped (Gemma 2); the
chain rule through the scale and the cap is applied chunk by chunk, so such
heads cost one more ``chunk x V`` tensor in backward, never ``N x V``. Under
FSDP / ZeRO-3 the weight passed in must be the full (gathered) weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from selfdistill.objectives.config import DivergenceConfig
from selfdistill.objectives.divergence import (
    check_token_ids,
    divergence_value_and_grad,
    log_softmax_,
    needs_token_ids,
    resolve_vocab,
    token_logprob_value_and_grad,
)
from selfdistill.objectives.reduce import Count, Reduction
from selfdistill.objectives.rows import finish, select_rows

#: (student log-probs of one chunk (fp32, at the temperature, the op may overwrite them),
#:  chunk start, chunk end, grad of the outputs or None)
#: -> (outputs (chunk, K), gradient with respect to the chunk logits or None)
RowOp = Callable[[Tensor, int, int, "Tensor | None"], "tuple[Tensor, Tensor | None]"]


@dataclass(frozen=True)
class LMHead:
    """A causal LM's output layer: ``logits = softcap * tanh(scale * (h @ W.T + b) / softcap)``.

    Without ``softcap`` the logits are ``scale * (h @ W.T + b)``. This covers
    plain heads (Llama, Qwen), a head bias (Phi-1/2, GPT-J), a logit scale
    (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``) and final
    soft-capping (Gemma 2). :func:`selfdistill.scoring.lm_head` reads one off
    a model.
    """

    weight_VH: Tensor
    bias_V: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def detach(self) -> "LMHead":
        return replace(self, weight_VH=self.weight_VH.detach(),
                       bias_V=None if self.bias_V is None else self.bias_V.detach())

    def to(self, dtype: torch.dtype) -> "LMHead":
        return replace(self, weight_VH=self.weight_VH.to(dtype),
                       bias_V=None if self.bias_V is None else self.bias_V.to(dtype))

    def logits(self, hidden_NH: Tensor) -> Tensor:
        """fp32 logits of every row at once (for callers that hold a few rows; the chunked paths do not)."""
        return _head_logits(hidden_NH.to(self.weight_VH.dtype), self.weight_VH, self.bias_V, self.scale,
                            self.softcap)


def as_head(head: "Tensor | LMHead", bias_V: Tensor | None = None) -> LMHead:
    """An :class:`LMHead` from a weight matrix (and an optional bias) or an LMHead (then no separate bias)."""
    if isinstance(head, LMHead):
        if bias_V is not None:
            raise ValueError("pass the bias inside the LMHead, not beside it")
        return head
    return LMHead(head, bias_V)


def _head_logits(hidden_cH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, scale: float = 1.0,
                 softcap: float | None = None) -> Tensor:
    """Chunk logits: the matmul in the inputs' dtype, everything after (scale, cap) in fp32.

    In place over the fresh logits, except where autograd records the ops (the cap's tanh must keep its
    output for backward).
    """
    logits_cV = hidden_cH @ weight_VH.T
    if bias_V is not None:
        logits_cV += bias_V.to(logits_cV.dtype)
    z = logits_cV.float()
    if scale != 1.0:
        z.mul_(scale)
    if softcap:
        z = torch.tanh(z / softcap) * softcap if z.requires_grad else z.div_(softcap).tanh_().mul_(softcap)
    return z


def _head_jacobian(logits_cV: Tensor, scale: float, softcap: float | None) -> Tensor | float:
    """d logits / d (h @ W.T + b), elementwise, from the final logits: ``scale * (1 - (z / cap)^2)``."""
    if not softcap:
        return scale
    return (logits_cV / softcap).square_().neg_().add_(1.0).mul_(scale)


def _logp_lse_(z_cV: Tensor, temperature: float, lse_c1: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Log-probs at ``temperature`` (in place over the fp32 logits) and their per-row log-normaliser;
    a normaliser from an earlier pass is reused."""
    if temperature != 1.0:
        z_cV.mul_(1.0 / temperature)
    if lse_c1 is None:
        lse_c1 = z_cV.logsumexp(-1, keepdim=True)
    return z_cV.sub_(lse_c1), lse_c1


def _head_logp_lse(hidden_cH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, temperature: float,
                   lse_c1: Tensor | None = None, scale: float = 1.0,
                   softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Chunk log-probs and their per-row log-normaliser; a normaliser from an earlier pass is reused.

    The backward pass recomputes the logits of each chunk; passing the forward's
    normaliser saves the logsumexp (several passes over chunk x V).
    """
    return _logp_lse_(_head_logits(hidden_cH, weight_VH, bias_V, scale, softcap), temperature, lse_c1)


class _ChunkedHead(torch.autograd.Function):
    """out_NK = cat over chunks of op(head(hidden[c])); backward recomputes chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden_NH, weight_VH, bias_V, op: RowOp, chunk_size: int, width: int, temperature: float,
        scale: float = 1.0, softcap: float | None = None,
    ):
        n = hidden_NH.shape[0]
        outs, lses = [], []
        with torch.autocast(hidden_NH.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                logp_cV, lse_c1 = _head_logp_lse(hidden_NH[s:e], weight_VH, bias_V, temperature, None, scale,
                                                 softcap)
                lses.append(lse_c1)
                outs.append(op(logp_cV, s, e, None)[0])
                del logp_cV
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V)
        ctx.lse_N1 = torch.cat(lses) if lses else None
        ctx.op, ctx.chunk_size, ctx.temperature, ctx.scale, ctx.softcap = op, chunk_size, temperature, scale, softcap
        return torch.cat(outs) if outs else hidden_NH.new_zeros((0, width), dtype=torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out_NK):  # type: ignore[override]
        hidden_NH, weight_VH, bias_V = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden_NH) if need_h else None
        grad_w = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_w else None
        grad_b = torch.zeros(weight_VH.shape[0], dtype=torch.float32, device=weight_VH.device) if need_b else None
        n, c = hidden_NH.shape[0], ctx.chunk_size
        with torch.autocast(hidden_NH.device.type, enabled=False):
            for s in range(0, n, c):
                e = min(s + c, n)
                h_cH = hidden_NH[s:e]
                z_cV = _head_logits(h_cH, weight_VH, bias_V, ctx.scale, ctx.softcap)
                jac = _head_jacobian(z_cV, ctx.scale, ctx.softcap)  # before z is overwritten
                logp_cV, _ = _logp_lse_(z_cV, ctx.temperature, ctx.lse_N1[s:e])
                _, g_cV = ctx.op(logp_cV, s, e, grad_out_NK[s:e])
                del logp_cV, z_cV
                if isinstance(jac, Tensor) or jac != 1.0:
                    g_cV.mul_(jac)  # from the final logits back to h @ W.T + b
                del jac
                if grad_h is not None:
                    grad_h[s:e] = g_cV.to(weight_VH.dtype) @ weight_VH
                if grad_w is not None:
                    grad_w.addmm_(g_cV.T, h_cH.float())
                if grad_b is not None:
                    grad_b += g_cV.sum(0)
                del g_cV  # free this chunk's gradient before the next chunk allocates its own
        grad_w = grad_w.to(weight_VH.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias_V.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _flatten(hidden: Tensor, name: str) -> Tensor:
    if hidden.dim() < 1:
        raise ValueError(f"{name} must have a trailing hidden dimension, got shape {tuple(hidden.shape)}")
    return hidden.reshape(-1, hidden.shape[-1])


def _check_head(hidden_NH: Tensor, head: LMHead, who: str) -> None:
    weight_VH, bias_V = head.weight_VH, head.bias_V
    if head.softcap is not None and not head.softcap > 0:
        raise ValueError(f"{who} lm_head softcap must be None or > 0, got {head.softcap}")
    if weight_VH.dim() != 2 or weight_VH.shape[1] != hidden_NH.shape[1]:
        raise ValueError(
            f"{who} lm_head weight must be (vocab, hidden={hidden_NH.shape[1]}), got {tuple(weight_VH.shape)}"
        )
    if bias_V is not None and bias_V.shape != weight_VH.shape[:1]:
        raise ValueError(f"{who} lm_head bias must be ({weight_VH.shape[0]},), got {tuple(bias_V.shape)}")


def token_logprobs_from_hidden(
    hidden_NH: Tensor,
    lm_head_weight_VH: "Tensor | LMHead",
    token_ids_N: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    lm_head_bias_V: Tensor | None = None,
) -> Tensor:
    """log softmax(head(hidden) / temperature)[token], fp32, without materialising N x V.

    ``lm_head_weight_VH``: the head's weight (a plain head, with ``lm_head_bias_V``) or an
    :class:`LMHead`. Any leading shape ((B, T, H) with ids (B, T) works); differentiable with
    respect to the hidden states and the head.
    """
    lead_shape = hidden_NH.shape[:-1]
    if token_ids_N.shape != lead_shape:
        raise ValueError(
            f"token_ids shape {tuple(token_ids_N.shape)} does not match hidden positions {tuple(lead_shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    head = as_head(lm_head_weight_VH, lm_head_bias_V)
    h_NH = _flatten(hidden_NH, "hidden").to(head.weight_VH.dtype)
    _check_head(h_NH, head, "")
    ids_N = token_ids_N.to(h_NH.device).reshape(-1).long()
    check_token_ids(ids_N, head.weight_VH.shape[0])

    def op(logp_cV: Tensor, s: int, e: int, grad_cK: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return token_logprob_value_and_grad(logp_cV, ids_N[s:e], temperature, grad_cK)

    out_N1 = _ChunkedHead.apply(h_NH, head.weight_VH, head.bias_V, op, chunk_size, 1, temperature, head.scale,
                                head.softcap)
    return out_N1.squeeze(-1).reshape(lead_shape)


def divergence_from_hidden(
    student_hidden_NH: Tensor,
    student_lm_head_weight_VH: "Tensor | LMHead",
    teacher_hidden_NH: Tensor,
    teacher_lm_head_weight_VH: "Tensor | LMHead",
    mask_N: Tensor | None = None,
    cfg: DivergenceConfig | None = None,
    chunk_size: int | None = None,
    *,
    token_ids_N: Tensor | None = None,
    old_logprobs_N: Tensor | None = None,
    num_items_in_batch: Count | None = None,
    reduction: Reduction = "mean",
    student_lm_head_bias_V: Tensor | None = None,
    teacher_lm_head_bias_V: Tensor | None = None,
) -> Tensor:
    """Per-token objective of ``cfg`` from last hidden states, chunk by chunk.

    Hidden states may be (N, H) or (B, T, H) (mask, ids and old log-probs then
    (B, T)); each head is a weight (plain, with its ``*_bias_V``) or an
    :class:`LMHead`; student and teacher hidden sizes may differ, their vocabularies
    only with ``cfg.truncate_vocab``. The teacher runs under no_grad. Only
    masked-in tokens are computed. ``chunk_size`` overrides ``cfg.chunk_size``.
    Returns a scalar, or per-token losses (0 where masked) for reduction='none'.
    """
    cfg = cfg if cfg is not None else DivergenceConfig()
    cfg.validate()
    chunk = chunk_size if chunk_size is not None else cfg.chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk!r}")
    lead_shape = student_hidden_NH.shape[:-1]
    if teacher_hidden_NH.shape[:-1] != lead_shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden_NH.shape)} and teacher hidden "
            f"{tuple(teacher_hidden_NH.shape)} differ in their token positions"
        )
    hs_NH, ht_NH = _flatten(student_hidden_NH, "student hidden"), _flatten(teacher_hidden_NH.detach(), "teacher hidden")
    s_head = as_head(student_lm_head_weight_VH, student_lm_head_bias_V)
    t_head = as_head(teacher_lm_head_weight_VH, teacher_lm_head_bias_V).detach()
    _check_head(hs_NH, s_head, "student")
    _check_head(ht_NH, t_head, "teacher")
    vocab = resolve_vocab(s_head.weight_VH.shape[0], t_head.weight_VH.shape[0], cfg.truncate_vocab)
    ws_VH, bs_V = _slice(s_head.weight_VH, vocab), _slice(s_head.bias_V, vocab)
    wt_VH, bt_V = _slice(t_head.weight_VH, vocab), _slice(t_head.bias_V, vocab)
    s_rest, t_rest = (s_head.scale, s_head.softcap), (t_head.scale, t_head.softcap)

    rows = select_rows(lead_shape, hs_NH.device, mask_N, token_ids_N, old_logprobs_N, cfg, vocab)
    hs_MH = hs_NH[rows.rows_M].to(ws_VH.dtype)
    ht_MH = ht_NH[rows.rows_M].to(wt_VH.dtype)
    ids_M = rows.token_ids_M

    teacher_lse: dict[int, Tensor] = {}  # per chunk start: the forward's normaliser, reused in backward

    def teacher_logp(s: int, e: int) -> Tensor:
        with torch.no_grad():
            logp, teacher_lse[s] = _head_logp_lse(ht_MH[s:e], wt_VH, bt_V, cfg.temperature, teacher_lse.get(s),
                                                  *t_rest)
            return logp

    if cfg.kind == "sampled":
        assert ids_M is not None

        def student_logp(logp_cV: Tensor, s: int, e: int, grad_cK: Tensor | None) -> tuple[Tensor, Tensor | None]:
            return token_logprob_value_and_grad(logp_cV, ids_M[s:e], cfg.temperature, grad_cK)

        logp_s_M1 = _ChunkedHead.apply(hs_MH, ws_VH, bs_V, student_logp, chunk, 1, cfg.temperature, *s_rest)
        logp_t_M1 = torch.cat(
            [teacher_logp(s, s + chunk).gather(-1, ids_M[s : s + chunk, None]) for s in range(0, len(ids_M), chunk)]
            or [logp_s_M1.new_zeros((0, 1))]
        )
        out_MK = torch.cat([logp_s_M1, logp_t_M1], dim=-1)
    else:

        def divergence(logp_cV: Tensor, s: int, e: int, grad_cK: Tensor | None) -> tuple[Tensor, Tensor | None]:
            ids_c = ids_M[s:e] if ids_M is not None else None
            return divergence_value_and_grad(logp_cV, teacher_logp(s, e), cfg, ids_c, grad_cK,
                                             need_value=grad_cK is None)

        width = 2 if needs_token_ids(cfg) else 1
        out_MK = _ChunkedHead.apply(hs_MH, ws_VH, bs_V, divergence, chunk, width, cfg.temperature, *s_rest)
    return finish(out_MK, rows, cfg, num_items_in_batch, reduction)


def _slice(t_V: Tensor | None, vocab: int) -> Tensor | None:
    """First ``vocab`` rows (no-op, and no extra gradient buffer, when already that size)."""
    if t_V is None:
        return None
    return t_V if t_V.shape[0] == vocab else t_V[:vocab]
