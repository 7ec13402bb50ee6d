"""Row-level math: one divergence per row of logits, in fp32.

These functions see a (N, V) slice of logits at a time; the chunked drivers in
``logits.py`` and ``hidden.py`` call them so that N stays small.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfdistill.objectives.config import DivergenceConfig


def generalized_jsd(student_logp_NK: Tensor, teacher_logp_NK: Tensor, beta: float) -> Tensor:
    """Generalized JSD per row from log-probabilities over the same K categories.

    ``M = beta*p_T + (1-beta)*p_S``; ``JSD = beta*KL(p_T||M) + (1-beta)*KL(p_S||M)``.
    beta = 0 returns KL(p_T||p_S) and beta = 1 returns KL(p_S||p_T), computed
    directly (the mixture form tends to 0 at both ends).
    """
    ls, lt = student_logp_NK, teacher_logp_NK
    if beta == 0.0:
        return (lt.exp() * (lt - ls)).sum(-1)
    if beta == 1.0:
        return (ls.exp() * (ls - lt)).sum(-1)
    logm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    kl_teacher = (lt.exp() * (lt - logm)).sum(-1)
    kl_student = (ls.exp() * (ls - logm)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def _tail_logmass(logp_NV: Tensor, idx_NK: Tensor) -> Tensor:
    """log of the mass outside the selected ids, (N, 1); exact (no 1 - sum)."""
    return logp_NV.scatter(-1, idx_NK, float("-inf")).logsumexp(-1, keepdim=True)


def per_row_divergence(student_logits_NV: Tensor, teacher_logits_NV: Tensor, cfg: DivergenceConfig) -> Tensor:
    """Divergence of ``cfg`` (jsd / forward_kl / reverse_kl) per row, shape (N,).

    Computes in fp32 whatever the input dtype; the teacher is a constant
    (detached); top-k ids come from the detached support distribution.
    """
    if cfg.kind == "sampled":
        raise ValueError("per_row_divergence needs a full-distribution kind; kind='sampled' uses sampled_token_loss")
    inv_t = 1.0 / cfg.temperature
    ls = torch.log_softmax(student_logits_NV.float() * inv_t, dim=-1)
    lt = torch.log_softmax(teacher_logits_NV.detach().float() * inv_t, dim=-1)
    vocab = ls.shape[-1]
    if cfg.topk is not None and cfg.topk < vocab:
        support = ls if cfg.topk_support == "student" else lt
        idx_NK = support.detach().topk(cfg.topk, dim=-1).indices
        ls_k, lt_k = ls.gather(-1, idx_NK), lt.gather(-1, idx_NK)
        if cfg.tail == "renorm":
            ls_k = ls_k - ls_k.logsumexp(-1, keepdim=True)
            lt_k = lt_k - lt_k.logsumexp(-1, keepdim=True)
        else:
            ls_k = torch.cat([ls_k, _tail_logmass(ls, idx_NK)], dim=-1)
            lt_k = torch.cat([lt_k, _tail_logmass(lt, idx_NK)], dim=-1)
        ls, lt = ls_k, lt_k
    return generalized_jsd(ls, lt, cfg.effective_beta)


def token_logprob_rows(logits_NV: Tensor, token_ids_N: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[token] per row, fp32, shape (N,)."""
    z = logits_NV.float() * (1.0 / temperature)
    return z.gather(-1, token_ids_N.long().unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)


def resolve_vocab(v_student: int, v_teacher: int, truncate: bool) -> int:
    """The vocabulary size both sides are cut to; ValueError on a mismatch unless ``truncate``."""
    if v_student == v_teacher:
        return v_student
    if not truncate:
        raise ValueError(
            f"student vocab size {v_student} != teacher vocab size {v_teacher}; if the extra ids are "
            f"padding, set truncate_vocab=True to slice both to {min(v_student, v_teacher)}"
        )
    return min(v_student, v_teacher)


def check_token_ids(token_ids: Tensor, vocab: int) -> None:
    """ValueError if any id is outside [0, vocab)."""
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        raise ValueError(
            f"token ids must lie in [0, {vocab}); got min {int(token_ids.min())}, max {int(token_ids.max())}"
        )


def row_outputs(
    student_logits_NV: Tensor, teacher_logits_NV: Tensor, token_ids_N: Tensor | None, cfg: DivergenceConfig
) -> Tensor:
    """What the chunked drivers compute per row, shape (N, K).

    sampled: [log p_S(y), log p_T(y)]; divergence kinds: [divergence] or, when
    importance weights are needed, [divergence, log p_S(y)].
    """
    t = cfg.temperature
    if cfg.kind == "sampled":
        assert token_ids_N is not None
        return torch.stack(
            [
                token_logprob_rows(student_logits_NV, token_ids_N, t),
                token_logprob_rows(teacher_logits_NV.detach(), token_ids_N, t),
            ],
            dim=-1,
        )
    div_N = per_row_divergence(student_logits_NV, teacher_logits_NV, cfg)
    if cfg.is_clip is None:
        return div_N.unsqueeze(-1)
    assert token_ids_N is not None
    return torch.stack([div_N, token_logprob_rows(student_logits_NV, token_ids_N, t)], dim=-1)


def needs_token_ids(cfg: DivergenceConfig) -> bool:
    """True when the realised tokens are needed (sampled kind or IS weights)."""
    return cfg.kind == "sampled" or cfg.is_clip is not None


# ---------------------------------------------------------------------------
# Analytic value-and-gradient form, used by the hidden-state driver.
#
# The same math as per_row_divergence/token_logprob_rows, but from log-probs
# the caller owns (they are overwritten), returning the gradient with respect
# to the student logits directly instead of building an autograd graph: about
# 6 chunk x V fp32 tensors alive at the peak instead of about 13. The logits
# driver uses the autograd form; the tests check both against an independent
# reference.
# ---------------------------------------------------------------------------


def log_softmax_(logits_NV: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / temperature) in fp32, in place when the logits are already fp32."""
    z = logits_NV.float()
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z.sub_(z.logsumexp(-1, keepdim=True))


def _jsd_value_and_dlogp(ls: Tensor, lt: Tensor, beta: float, want: bool) -> tuple[Tensor, Tensor | None]:
    """Generalized JSD per row and its derivative with respect to each student log-prob.

    d/d ls_i: beta=0: -p_T,i; beta=1: p_S,i (ls_i - lt_i + 1); otherwise
    (1 - beta) p_S,i (ls_i - log M_i). Inputs are left unchanged.
    """
    if beta == 0.0:
        pt = lt.exp()
        div = (lt - ls).mul_(pt).sum(-1)
        return div, (pt.neg_() if want else None)
    if beta == 1.0:
        ps, d = ls.exp(), ls - lt
        div = (ps * d).sum(-1)
        return div, (d.add_(1.0).mul_(ps) if want else None)
    logm = ls + math.log1p(-beta)
    tmp = lt + math.log(beta)
    torch.logaddexp(logm, tmp, out=logm)
    kl_teacher = torch.sub(lt, logm, out=tmp).mul_(lt.exp()).sum(-1)
    d_s = torch.sub(ls, logm, out=tmp)
    del logm
    ps = ls.exp()
    kl_student = (ps * d_s).sum(-1)
    div = beta * kl_teacher + (1.0 - beta) * kl_student
    return div, (d_s.mul_(ps).mul_(1.0 - beta) if want else None)


def _jsd_dlogp(ls: Tensor, lt: Tensor, beta: float) -> Tensor:
    """Only the derivative of :func:`_jsd_value_and_dlogp` (the backward pass needs no value)."""
    if beta == 0.0:
        return lt.exp().neg_()
    if beta == 1.0:
        return (ls - lt).add_(1.0).mul_(ls.exp())
    logm = ls + math.log1p(-beta)
    torch.logaddexp(logm, lt + math.log(beta), out=logm)
    d_s = torch.sub(ls, logm, out=logm)
    return d_s.mul_(ls.exp()).mul_(1.0 - beta)


@torch.no_grad()
def divergence_value_and_grad(
    student_logp_NV: Tensor,
    teacher_logp_NV: Tensor,
    cfg: DivergenceConfig,
    token_ids_N: Tensor | None = None,
    grad_out_NK: Tensor | None = None,
    need_value: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Outputs of :func:`row_outputs` for a divergence kind, and d(sum(out * grad_out))/d student logits.

    Takes fp32 log-probs at ``cfg.temperature`` (see :func:`log_softmax_`) and
    may overwrite ``student_logp_NV``. Returns ``(out_NK, grad_NV)``;
    ``grad_NV`` is None when ``grad_out_NK`` is None. With ``need_value=False``
    (a backward pass) ``out_NK`` may be None and the full-vocabulary path skips
    computing it.
    """
    if cfg.kind == "sampled":
        raise ValueError("divergence_value_and_grad needs a full-distribution kind, not 'sampled'")
    want = grad_out_NK is not None
    ls, lt = student_logp_NV, teacher_logp_NV
    beta, vocab = cfg.effective_beta, ls.shape[-1]
    k = cfg.topk if cfg.topk is not None and cfg.topk < vocab else None
    g_ls: Tensor | None = None  # d loss / d student log-probs over the full vocabulary
    div: Tensor | None = None
    if k is None and want and not need_value:
        g_ls = _jsd_dlogp(ls, lt, beta)
    elif k is None:
        div, g_ls = _jsd_value_and_dlogp(ls, lt, beta, want)
    else:
        idx = (ls if cfg.topk_support == "student" else lt).topk(k, dim=-1).indices
        ls_k, lt_k = ls.gather(-1, idx), lt.gather(-1, idx)
        if cfg.tail == "renorm":
            ls_k = ls_k - ls_k.logsumexp(-1, keepdim=True)
            lt_k = lt_k - lt_k.logsumexp(-1, keepdim=True)
            div, g_k = _jsd_value_and_dlogp(ls_k, lt_k, beta, want)
            if want:
                assert g_k is not None
                g_k = g_k - ls_k.exp() * g_k.sum(-1, keepdim=True)  # through the renormalisation
                g_ls = torch.zeros_like(ls).scatter_(-1, idx, g_k)
        else:
            tail_s, tail_t = _tail_logmass(ls, idx), _tail_logmass(lt, idx)
            div, g_c = _jsd_value_and_dlogp(torch.cat([ls_k, tail_s], -1), torch.cat([lt_k, tail_t], -1), beta, want)
            if want:
                assert g_c is not None
                # d tail / d ls_j = p_j / P_tail for j outside the top-k, 0 inside
                g_ls = (ls - tail_s).exp_().mul_(g_c[:, k:])
                g_ls.scatter_(-1, idx, g_c[:, :k])
    out_NK = div.unsqueeze(-1) if div is not None else None
    if needs_token_ids(cfg):
        assert token_ids_N is not None
        ids_N1 = token_ids_N.long().unsqueeze(-1)
        if out_NK is not None:
            out_NK = torch.cat([out_NK, ls.gather(-1, ids_N1)], dim=-1)
    if not want:
        return out_NK, None
    assert g_ls is not None and grad_out_NK is not None
    g_ls.mul_(grad_out_NK[:, :1].float())
    if needs_token_ids(cfg):
        g_ls.scatter_add_(-1, ids_N1, grad_out_NK[:, 1:2].float())
    return out_NK, _through_log_softmax_(g_ls, ls, cfg.temperature)


def _through_log_softmax_(g_ls: Tensor, ls: Tensor, temperature: float) -> Tensor:
    """Chain rule through ls = log_softmax(z / t): (g - p * sum(g)) / t. Overwrites both inputs."""
    total_N1 = g_ls.sum(-1, keepdim=True)
    g_ls.sub_(ls.exp_().mul_(total_N1))
    return g_ls if temperature == 1.0 else g_ls.mul_(1.0 / temperature)


@torch.no_grad()
def token_logprob_value_and_grad(
    logp_NV: Tensor, token_ids_N: Tensor, temperature: float, grad_out_N1: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """log p(token) per row as (N, 1) from fp32 log-probs (overwritten), and d(sum(out * grad_out))/d logits."""
    ids_N1 = token_ids_N.long().unsqueeze(-1)
    out_N1 = logp_NV.gather(-1, ids_N1)
    if grad_out_N1 is None:
        return out_N1, None
    g = torch.zeros_like(logp_NV).scatter_(-1, ids_N1, grad_out_N1.float())
    return out_N1, _through_log_softmax_(g, logp_NV, temperature)
