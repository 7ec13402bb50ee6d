"""Tests of selfdistill.objectives.

Values are pinned to an independent reference written here in probability
space (float64 softmax, explicit KL sums, top-k by argsort, tail mass as
1 - sum), sharing no code with the library; gradients are pinned to autograd
through that reference.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from selfdistill.objectives import (
    DivergenceConfig,
    divergence_from_hidden,
    global_token_count,
    reduce_token_losses,
    sampled_token_loss,
    token_divergence,
    token_logprobs_from_hidden,
)

# ---------------------------------------------------------------------------
# Independent reference (probability space, float64)
# ---------------------------------------------------------------------------


def ref_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p log(p / q) over the last axis."""
    return (p * torch.log(p / q)).sum(-1)


def ref_gjsd(p_s: torch.Tensor, p_t: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0:
        return ref_kl(p_t, p_s)
    if beta == 1:
        return ref_kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * ref_kl(p_t, m) + (1 - beta) * ref_kl(p_s, m)


def ref_restrict(p_s, p_t, k, support, tail):
    """Top-k of the support distribution: renormalised, or plus a tail bucket 1 - sum."""
    sup = p_s if support == "student" else p_t
    idx = torch.argsort(sup.detach(), dim=-1, descending=True)[..., :k]
    ps_k, pt_k = p_s.gather(-1, idx), p_t.gather(-1, idx)
    if tail == "renorm":
        return ps_k / ps_k.sum(-1, keepdim=True), pt_k / pt_k.sum(-1, keepdim=True)
    return (
        torch.cat([ps_k, 1 - ps_k.sum(-1, keepdim=True)], -1),
        torch.cat([pt_k, 1 - pt_k.sum(-1, keepdim=True)], -1),
    )


def ref_per_token(zs, zt, cfg: DivergenceConfig, ids=None, old=None) -> torch.Tensor:
    """Per-token loss of cfg, float64, differentiable in zs."""
    p_s, p_t = ref_probs(zs, cfg.temperature), ref_probs(zt.detach(), cfg.temperature)
    if cfg.kind == "sampled":
        logp_s = torch.log(p_s.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
        logp_t = torch.log(p_t.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
        loss = -(logp_t - logp_s).detach() * logp_s
    else:
        beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(cfg.kind, cfg.beta)
        if cfg.topk is not None and cfg.topk < zs.shape[-1]:
            p_s, p_t = ref_restrict(p_s, p_t, cfg.topk, cfg.topk_support, cfg.tail)
        loss = ref_gjsd(p_s, p_t, beta)
    if cfg.is_clip is not None:
        logp_now = torch.log(ref_probs(zs, cfg.temperature).gather(-1, ids.unsqueeze(-1)).squeeze(-1))
        loss = loss * torch.clamp(torch.exp(logp_now - old.double()), max=cfg.is_clip).detach()
    return loss


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

B, T, V, H = 2, 5, 23, 6
BETAS = [0.0, 0.25, 0.5, 1.0]
MODES = [
    dict(topk=None),
    dict(topk=4, topk_support="student", tail="renorm"),
    dict(topk=4, topk_support="student", tail="bucket"),
    dict(topk=4, topk_support="teacher", tail="renorm"),
    dict(topk=4, topk_support="teacher", tail="bucket"),
]


def make_inputs(seed: int = 0, b: int = B, t: int = T, v: int = V, h: int = H):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, t, h, generator=g)
    ht = torch.randn(b, t, h, generator=g)
    ws = torch.randn(v, h, generator=g)
    wt = torch.randn(v, h, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    old = torch.log(torch.rand(b, t, generator=g)) * 0.5 - 1.0
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -2:] = False
    return hs, ht, ws, wt, ids, old, mask


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype))


# ---------------------------------------------------------------------------
# Pinned to the reference: every mode, every beta, both drivers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m.get('topk')}-{m.get('topk_support')}-{m.get('tail')}")
@pytest.mark.parametrize("beta", BETAS)
def test_matches_reference_every_mode(mode, beta):
    hs, ht, ws, wt, ids, old, mask = make_inputs()
    cfg = DivergenceConfig(kind="jsd", beta=beta, temperature=0.9, **mode)
    zs, zt = hs @ ws.T, ht @ wt.T
    expected = masked(ref_per_token(zs, zt, cfg), mask)
    got_logits = token_divergence(zs, zt, cfg, mask, reduction="none")
    got_hidden = divergence_from_hidden(hs, ws, ht, wt, mask, cfg, chunk_size=3, reduction="none")
    torch.testing.assert_close(got_logits.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_hidden.double(), expected, rtol=1e-5, atol=1e-6)
    mean = token_divergence(zs, zt, cfg, mask)
    torch.testing.assert_close(mean.double(), expected.sum() / mask.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES[:3], ids=["full", "topk-renorm", "topk-bucket"])
def test_kl_kinds_are_the_beta_endpoints(mode):
    hs, ht, ws, wt, *_ = make_inputs(1)
    zs, zt = hs @ ws.T, ht @ wt.T
    for kind, beta in [("forward_kl", 0.0), ("reverse_kl", 1.0)]:
        expected = ref_per_token(zs, zt, DivergenceConfig(kind="jsd", beta=beta, **mode))
        got = token_divergence(zs, zt, DivergenceConfig(kind=kind, beta=0.5, **mode), reduction="none")
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_sampled_matches_reference_value_and_gradient():
    hs, ht, ws, wt, ids, old, mask = make_inputs(2)
    cfg = DivergenceConfig(kind="sampled", temperature=1.2)
    zs = (hs @ ws.T).requires_grad_()
    zt = ht @ wt.T
    expected = masked(ref_per_token(zs, zt, cfg, ids), mask)
    got = token_divergence(zs, zt, cfg, mask, token_ids_BT=ids, reduction="none")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    (g_ref,) = torch.autograd.grad(expected.sum(), zs)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)
    # the estimator's gradient is -A * d log p_S(y): never a gradient through A
    p = torch.softmax(zs.detach().double() / 1.2, -1)
    adv = torch.log(ref_probs(zt, 1.2).gather(-1, ids[..., None]) / p.gather(-1, ids[..., None]))
    hand = -adv * (torch.nn.functional.one_hot(ids, V).double() - p) / 1.2
    torch.testing.assert_close(g_got.double(), hand * mask[..., None], rtol=1e-5, atol=1e-6)


def test_sampled_token_loss_from_logprobs():
    logp_s = torch.log(torch.tensor([[0.5, 0.2, 0.9]])).requires_grad_()
    logp_t = torch.log(torch.tensor([[0.25, 0.4, 0.9]]))
    mask = torch.tensor([[1, 1, 0]])
    loss = sampled_token_loss(logp_s, logp_t, mask)
    adv = [math.log(0.5), math.log(2.0)]
    expected = (-adv[0] * math.log(0.5) - adv[1] * math.log(0.2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp_s.grad, torch.tensor([[-adv[0] / 2, -adv[1] / 2, 0.0]]))


# ---------------------------------------------------------------------------
# Hand-computed cases: the KL values and the JSD mixture direction
# ---------------------------------------------------------------------------


def test_hand_case_forward_and_reverse_kl():
    zs = torch.log(torch.tensor([[0.1, 0.9]]))
    zt = torch.log(torch.tensor([[0.9, 0.1]]))
    want = 0.8 * math.log(9)
    for kind in ("forward_kl", "reverse_kl"):
        got = token_divergence(zs, zt, DivergenceConfig(kind=kind))
        assert got.item() == pytest.approx(want, rel=1e-6)
    for beta in (0.0, 1.0):
        got = token_divergence(zs, zt, DivergenceConfig(kind="jsd", beta=beta))
        assert got.item() == pytest.approx(want, rel=1e-6)


def test_jsd_mixture_direction_pinned_by_hand():
    """beta=0.25, p_S=[0.1,0.9], p_T=[0.9,0.1]: M = 0.25 p_T + 0.75 p_S = [0.3, 0.7]."""
    zs = torch.log(torch.tensor([[0.1, 0.9]]))
    zt = torch.log(torch.tensor([[0.9, 0.1]]))
    kl_t_m = 0.9 * math.log(0.9 / 0.3) + 0.1 * math.log(0.1 / 0.7)
    kl_s_m = 0.1 * math.log(0.1 / 0.3) + 0.9 * math.log(0.9 / 0.7)
    want = 0.25 * kl_t_m + 0.75 * kl_s_m
    got = token_divergence(zs, zt, DivergenceConfig(kind="jsd", beta=0.25)).item()
    assert got == pytest.approx(want, rel=1e-6)
    # the reversed mixture M = 0.25 p_S + 0.75 p_T = [0.7, 0.3] gives another number
    wrong = 0.25 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)) + 0.75 * (
        0.1 * math.log(0.1 / 0.7) + 0.9 * math.log(0.9 / 0.3)
    )
    assert abs(got - wrong) > 1e-2
    # direction-wise: JSD/beta -> KL(T||S) as beta -> 0 and JSD/(1-beta) -> KL(S||T) as beta -> 1
    p_s, p_t = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.6, 0.3, 0.1])
    zs3, zt3 = torch.log(p_s)[None], torch.log(p_t)[None]
    small = token_divergence(zs3, zt3, DivergenceConfig(beta=1e-4)).item() / 1e-4
    large = token_divergence(zs3, zt3, DivergenceConfig(beta=1 - 1e-4)).item() / 1e-4
    assert small == pytest.approx(ref_kl(p_t.double(), p_s.double()).item(), rel=1e-2)
    assert large == pytest.approx(ref_kl(p_s.double(), p_t.double()).item(), rel=1e-2)


# ---------------------------------------------------------------------------
# Chunked == unchunked == reference, values and gradients (hidden driver)
# ---------------------------------------------------------------------------

GRAD_CFGS = [
    DivergenceConfig(kind="jsd", beta=0.5),
    DivergenceConfig(kind="forward_kl", temperature=0.7),
    DivergenceConfig(kind="reverse_kl"),
    DivergenceConfig(kind="jsd", beta=0.25, topk=5, topk_support="student", tail="bucket", is_clip=1.5),
    DivergenceConfig(kind="reverse_kl", topk=5, topk_support="teacher", tail="renorm"),
    DivergenceConfig(kind="jsd", beta=0.75, topk=5, topk_support="teacher", tail="bucket", temperature=1.3),
    DivergenceConfig(kind="sampled", is_clip=2.0),
]


@pytest.mark.parametrize("cfg", GRAD_CFGS, ids=lambda c: f"{c.kind}-{c.beta}-{c.topk}-{c.topk_support}-{c.tail}")
def test_hidden_chunked_equals_unchunked_and_reference(cfg):
    hs, ht, ws, wt, ids, old, mask = make_inputs(3, b=3, t=7)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(9))
    mask = mask.float() * torch.tensor([1.0, 0.5, 2.0])[:, None]  # float weights too
    num = global_token_count(mask)

    def run(chunk):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bias)]
        loss = divergence_from_hidden(
            leaves[0], leaves[1], ht, wt, mask, cfg, chunk,
            token_ids_N=ids, old_logprobs_N=old, num_items_in_batch=num, student_lm_head_bias_V=leaves[2],
        )
        return (loss, *torch.autograd.grad(loss, leaves))

    leaves = [x.double().clone().requires_grad_() for x in (hs, ws, bias)]
    per = ref_per_token(leaves[0] @ leaves[1].T + leaves[2], ht.double() @ wt.double().T, cfg, ids, old)
    ref_loss = (per * mask.double()).sum() / num.double()
    ref = (ref_loss, *torch.autograd.grad(ref_loss, leaves))
    full = run(10_000)  # one chunk
    for chunk in (1, 4, 20):
        got = run(chunk)
        for a, b, r in zip(got, full, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cfg", GRAD_CFGS, ids=lambda c: f"{c.kind}-{c.beta}-{c.topk}-{c.topk_support}-{c.tail}")
def test_hidden_path_applies_head_bias_scale_and_softcap(cfg):
    """LMHead heads (bias, logit scale, final soft-cap; Phi / Cohere / Gemma 2): the chunked values and
    gradients (hidden, weight, bias) equal the float64 reference on the transformed logits."""
    from selfdistill.objectives import LMHead

    hs, ht, ws, wt, ids, old, mask = make_inputs(6, b=3, t=7)
    g = torch.Generator().manual_seed(11)
    bs, bt = torch.randn(V, generator=g), torch.randn(V, generator=g)
    hs, ht = hs * 4, ht * 4  # logits of a few units, so that a cap of 1.5 binds
    num = global_token_count(mask)

    def transform(z, scale, cap):
        return cap * torch.tanh(scale * z / cap)

    def run(chunk):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        loss = divergence_from_hidden(leaves[0], LMHead(leaves[1], leaves[2], 0.6, 1.5), ht,
                                      LMHead(wt, bt, 1.3, 2.0), mask, cfg, chunk, token_ids_N=ids,
                                      old_logprobs_N=old, num_items_in_batch=num)
        return (loss, *torch.autograd.grad(loss, leaves))

    leaves = [x.double().clone().requires_grad_() for x in (hs, ws, bs)]
    zs = transform(leaves[0] @ leaves[1].T + leaves[2], 0.6, 1.5)
    zt = transform(ht.double() @ wt.double().T + bt.double(), 1.3, 2.0)
    per = ref_per_token(zs, zt, cfg, ids, old)
    ref_loss = (per * mask.double()).sum() / num.double()
    ref = (ref_loss, *torch.autograd.grad(ref_loss, leaves))
    for chunk in (1, 4, 10_000):
        for a, r in zip(run(chunk), ref):
            torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6)


def test_logits_driver_gradient_matches_reference():
    hs, ht, ws, wt, ids, old, mask = make_inputs(4)
    cfg = DivergenceConfig(kind="jsd", beta=0.25, topk=6, tail="bucket", chunk_size=3)
    zs = (hs @ ws.T).requires_grad_()
    zt = ht @ wt.T
    loss = token_divergence(zs, zt, cfg, mask)
    zs64 = zs.detach().double().requires_grad_()
    ref = (masked(ref_per_token(zs64, zt, cfg), mask)).sum() / mask.sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, zs)[0].double(), torch.autograd.grad(ref, zs64)[0])


def test_token_logprobs_from_hidden():
    hs, _, ws, _, ids, *_ = make_inputs(5)
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    got = token_logprobs_from_hidden(h, w, ids, temperature=0.8, chunk_size=3)
    h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    ref = torch.log(ref_probs(h64 @ w64.T, 0.8).gather(-1, ids[..., None]).squeeze(-1))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    weights = torch.arange(ids.numel(), dtype=torch.float32).reshape(ids.shape)
    g_got = torch.autograd.grad((got * weights).sum(), [h, w])
    g_ref = torch.autograd.grad((ref * weights.double()).sum(), [h64, w64])
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

PROPERTY_CFGS = st.builds(
    DivergenceConfig,
    kind=st.sampled_from(["jsd", "forward_kl", "reverse_kl"]),
    beta=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    topk=st.sampled_from([None, 1, 3, 8]),
    topk_support=st.sampled_from(["student", "teacher"]),
    tail=st.sampled_from(["renorm", "bucket"]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
)


def _logits(seed: int, scale: float, n: int = 6, v: int = 11) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=60, deadline=None)
@given(cfg=PROPERTY_CFGS, seed=st.integers(0, 10_000), scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_nonnegative_and_zero_when_equal(cfg, seed, scale):
    zs, zt = _logits(seed, scale), _logits(seed + 1, scale)
    per = token_divergence(zs, zt, cfg, reduction="none")
    assert torch.isfinite(per).all() and (per >= -1e-6).all()
    same = token_divergence(zs, zs.clone(), cfg, reduction="none")
    assert same.abs().max() < 1e-5
    ws = torch.randn(11, 4, generator=torch.Generator().manual_seed(seed))
    hs = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed + 2)) * scale
    per_h = divergence_from_hidden(hs, ws, hs.clone(), ws.clone(), None, cfg, 4, reduction="none")
    assert per_h.abs().max() < 1e-5


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), topk=st.sampled_from([None, 2, 5]), tail=st.sampled_from(["renorm", "bucket"]))
def test_jsd_half_is_symmetric(seed, topk, tail):
    zs, zt = _logits(seed, 2.0), _logits(seed + 1, 2.0)
    on_student = DivergenceConfig(beta=0.5, topk=topk, tail=tail, topk_support="student")
    on_teacher = DivergenceConfig(beta=0.5, topk=topk, tail=tail, topk_support="teacher")
    a = token_divergence(zs, zt, on_student, reduction="none")
    b = token_divergence(zt, zs, on_teacher, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_are_computed_in_fp32():
    hs, ht, ws, wt, ids, old, mask = make_inputs(6, b=4, t=16, v=64, h=16)
    zs, zt = (hs @ ws.T).bfloat16(), (hs @ ws.T + 1e-2 * (ht @ wt.T)).bfloat16()  # nearly equal
    for cfg in (DivergenceConfig(beta=0.5), DivergenceConfig(kind="reverse_kl", topk=8)):
        per = token_divergence(zs, zt, cfg, reduction="none")
        assert per.dtype == torch.float32 and (per >= -1e-7).all()
        ref = ref_per_token(zs.float(), zt.float(), cfg)
        torch.testing.assert_close(per.double(), ref, rtol=1e-3, atol=2e-6)
        per_h = divergence_from_hidden(
            hs.bfloat16(), ws.bfloat16(), hs.bfloat16(), ws.bfloat16(), None, cfg, 8, reduction="none"
        )
        assert per_h.dtype == torch.float32 and per_h.abs().max() < 1e-6


# ---------------------------------------------------------------------------
# Masks, global normalisation, gradient accumulation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["logits", "hidden", "sampled"])
def test_gradient_accumulation_equals_full_batch(path):
    hs, ht, ws, wt, ids, old, _ = make_inputs(7, b=4, t=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]).bool()
    cfg = DivergenceConfig(beta=0.5, topk=5, chunk_size=4)

    def loss_fn(h, w, sl, num):
        if path == "logits":
            return token_divergence(h[sl] @ w.T, ht[sl] @ wt.T, cfg, mask[sl], num_items_in_batch=num)
        if path == "hidden":
            return divergence_from_hidden(h[sl], w, ht[sl], wt, mask[sl], cfg, num_items_in_batch=num)
        logp_s = token_logprobs_from_hidden(h[sl], w, ids[sl])
        logp_t = token_logprobs_from_hidden(ht[sl], wt, ids[sl])
        return sampled_token_loss(logp_s, logp_t, mask[sl], num_items_in_batch=num)

    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    full = loss_fn(h, w, slice(0, 4), None)
    full.backward()
    g_full = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    micro = [slice(0, 1), slice(1, 3), slice(3, 4)]
    num = global_token_count([mask[sl] for sl in micro])
    assert num.item() == mask.sum().item()
    total = 0.0
    for sl in micro:
        part = loss_fn(h, w, sl, num)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h.grad, g_full[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, g_full[1], rtol=1e-5, atol=1e-7)


def test_all_masked_gives_zero_and_finite_gradients():
    hs, ht, ws, wt, ids, old, _ = make_inputs(8)
    none = torch.zeros(B, T, dtype=torch.bool)
    cfgs = (DivergenceConfig(), DivergenceConfig(kind="sampled", is_clip=2.0), DivergenceConfig(topk=3, is_clip=2.0))
    for cfg in cfgs:
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        for num in (None, 0, global_token_count(none)):
            extra = dict(token_ids_N=ids, old_logprobs_N=old, num_items_in_batch=num)
            loss = divergence_from_hidden(h, w, ht, wt, none, cfg, 4, **extra)
            assert loss.item() == 0.0
            loss.backward()
            assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and h.grad.abs().max() == 0
            zs = (hs @ ws.T).requires_grad_()
            extra = dict(token_ids_BT=ids, old_logprobs_BT=old, num_items_in_batch=num)
            loss = token_divergence(zs, ht @ wt.T, cfg, none, **extra)
            assert loss.item() == 0.0
            loss.backward()
            assert torch.isfinite(zs.grad).all()
    assert reduce_token_losses(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_masked_positions_never_leak_nan():
    hs, ht, ws, wt, ids, old, mask = make_inputs(9)
    zs = (hs @ ws.T).requires_grad_()
    zt = (ht @ wt.T).clone()
    zt[~mask] = float("nan")
    loss = token_divergence(zs, zt, DivergenceConfig(), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    hidden_t = ht.clone()
    hidden_t[~mask] = float("nan")
    h = hs.clone().requires_grad_()
    loss = divergence_from_hidden(h, ws, hidden_t, wt, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()


def test_mask_dtypes_agree():
    hs, ht, ws, wt, ids, old, mask = make_inputs(10)
    zs, zt = hs @ ws.T, ht @ wt.T
    ref = token_divergence(zs, zt, DivergenceConfig(), mask)
    for m in (mask.int(), mask.float(), mask.long(), mask.to(torch.bfloat16)):
        assert token_divergence(zs, zt, DivergenceConfig(), m).item() == pytest.approx(ref.item(), rel=1e-6)


def test_global_token_count_uses_accelerator():
    class FakeAccelerator:
        def reduce(self, tensor, reduction="sum"):
            assert reduction == "sum"
            return tensor * 3  # three processes with the same count

    masks = [torch.tensor([[1, 0, 1]]), torch.tensor([[True, True, False]])]
    assert global_token_count(masks).item() == 4
    assert global_token_count(masks, FakeAccelerator()).item() == 12


# ---------------------------------------------------------------------------
# Importance-ratio clipping
# ---------------------------------------------------------------------------


def test_is_clip_weights_are_min_ratio_clip_and_detached():
    hs, ht, ws, wt, ids, _, mask = make_inputs(11)
    zs, zt = hs @ ws.T, ht @ wt.T
    logp_now = torch.log_softmax(zs, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp_now.clone()
    old[0, 0] -= 2.0  # ratio e^2 > 2: clipped to 2
    old[1, 1] += 1.0  # ratio e^-1 < 2: kept
    base = DivergenceConfig(beta=0.5)
    clipped = DivergenceConfig(beta=0.5, is_clip=2.0)
    z = zs.clone().requires_grad_()
    plain = token_divergence(z, zt, base, reduction="none")
    weighted = token_divergence(z, zt, clipped, token_ids_BT=ids, old_logprobs_BT=old, reduction="none")
    weight = torch.ones(B, T)
    weight[0, 0], weight[1, 1] = 2.0, math.exp(-1.0)
    torch.testing.assert_close(weighted, plain * weight, rtol=1e-5, atol=1e-6)
    (g_w,) = torch.autograd.grad(weighted.sum(), z)
    (g_p,) = torch.autograd.grad((plain * weight).sum(), z)
    torch.testing.assert_close(g_w, g_p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="old_logprobs"):
        token_divergence(zs, zt, clipped, token_ids_BT=ids)
    with pytest.raises(ValueError, match="token_ids"):
        divergence_from_hidden(hs, ws, ht, wt, None, clipped, old_logprobs_N=old)


# ---------------------------------------------------------------------------
# Configuration and input errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kind="kl"), "kind"),
        (dict(beta=1.5), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(topk=0), "topk"),
        (dict(kind="sampled", topk=5), "topk"),
        (dict(topk_support="both"), "topk_support"),
        (dict(tail="drop"), "tail"),
        (dict(temperature=0.0), "temperature"),
        (dict(is_clip=-1.0), "is_clip"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DivergenceConfig(**kwargs)


def test_config_fields_are_documented():
    helps = DivergenceConfig.help()
    assert set(helps) >= {"kind", "beta", "topk", "topk_support", "tail", "temperature", "is_clip", "chunk_size"}
    assert all(len(text) > 20 for text in helps.values())


def test_vocab_mismatch_raises_or_truncates():
    hs, ht, ws, wt, ids, old, mask = make_inputs(12)
    wt_pad = torch.cat([wt, torch.randn(5, H)])  # teacher has 5 padding ids
    with pytest.raises(ValueError, match=r"23.*28"):
        divergence_from_hidden(hs, ws, ht, wt_pad, mask)
    with pytest.raises(ValueError, match=r"23.*28"):
        token_divergence(hs @ ws.T, ht @ wt_pad.T, DivergenceConfig(), mask)
    cfg = DivergenceConfig(truncate_vocab=True)
    want = divergence_from_hidden(hs, ws, ht, wt, mask, cfg)
    assert divergence_from_hidden(hs, ws, ht, wt_pad, mask, cfg).item() == pytest.approx(want.item(), rel=1e-6)
    assert token_divergence(hs @ ws.T, ht @ wt_pad.T, cfg, mask).item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="token ids"):
        bad = ids.clone()
        bad[0, 0] = V + 1
        divergence_from_hidden(hs, ws, ht, wt, mask, DivergenceConfig(kind="sampled"), token_ids_N=bad)
    with pytest.raises(ValueError, match="hidden"):
        divergence_from_hidden(hs, ws[:, :4], ht, wt, mask)


# ---------------------------------------------------------------------------
# Memory: peak does not grow with the number of tokens (vocabulary 151,936)
# ---------------------------------------------------------------------------


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated by ops run inside the mode (views and inputs excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def test_memory_is_bounded_by_chunk_not_tokens():
    vocab, hidden, chunk = 151_936, 16, 4
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.2).requires_grad_()
    row_bytes = vocab * 4  # one fp32 row of logits
    cfg = DivergenceConfig(kind="jsd", beta=0.5)

    def peak(n: int, fn) -> int:
        hs = torch.randn(n, hidden, generator=gen).requires_grad_()
        ht = torch.randn(n, hidden, generator=gen)
        with PeakLiveBytes() as mode:
            fn(hs, ht).backward()
        w.grad = None
        return mode.peak

    def hidden_path(hs, ht):
        return divergence_from_hidden(hs, w, ht, w, None, cfg, chunk_size=chunk)

    small, large = peak(16, hidden_path), peak(256, hidden_path)
    assert large - small < chunk * row_bytes  # 240 more tokens cost less than one chunk of logits
    # about 5 chunks of fp32 logits plus the fp32 V x H weight gradient: far below one 256 x V tensor
    assert large < 5 * chunk * row_bytes + hidden * row_bytes + row_bytes
    assert large < 256 * row_bytes / 4
    # positive control: the unchunked logits path grows by at least the extra logits
    def logits_path(hs, ht):
        return token_divergence(hs @ w.T, ht @ w.T, cfg)

    assert peak(16, logits_path) - peak(4, logits_path) > 12 * row_bytes
