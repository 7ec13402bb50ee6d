"""GRPO: group advantages and the clipped policy-gradient loss pinned to hand computations; 2 steps end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selfdistill.config import TrainConfig
from selfdistill.objectives import clip_fraction, group_advantages, kl_k3, policy_gradient_loss

import tinyrun  # tests/tinyrun.py


def tiny(model_dir: str, out, **over) -> TrainConfig:
    """The smallest run that exercises a method: 2 steps, 2 prompts, short completions, no evaluation."""
    base = {"output_dir": str(out), "steps": 2, "batch_size": 2, "micro_batch_size": 2, "eval_before": False,
            "eval_after": False, "model": {"path": model_dir}, "data": {"train_size": 8, "test_size": 2},
            "rollout": {"max_new_tokens": 8, "batch_size": 8}, "optim": {"lr": 1e-3, "warmup_steps": 1}}
    return tinyrun.config(base, **over)


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), eps=1e-4)
    std = math.sqrt((4 * 0.25) / 3)  # sample std of [1, 0, 0, 1]
    want = [[0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)], [0.0] * 4]
    torch.testing.assert_close(adv, torch.tensor(want))
    assert group_advantages(torch.tensor([[1.0, 0.0]]), scale=False).tolist() == [[0.5, -0.5]]
    assert group_advantages(torch.tensor([[1.0]])).tolist() == [[0.0]]


def test_policy_gradient_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -0.1, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.0, -0.5], [-0.5, -0.6, -0.5]])
    adv = torch.tensor([[1.0], [-1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # Token by token (eps = 0.2), loss_t = -min(r A, clip(r) A):
    #  (0,0) r = e^0.2 = 1.2214 > 1.2, A = +1: clipped, -1.2, no gradient
    #  (0,1) r = 1, A = +1: -1, d/dlogp = -1
    #  (0,2) masked
    #  (1,0) r = 1, A = -1: +1, d/dlogp = +1
    #  (1,1) r = e^0.5 = 1.6487, A = -1: min(-1.6487, -1.2) = -1.6487 (unclipped side): +1.6487, d = +1.6487
    #  (1,2) r = e^-0.5 = 0.6065 < 0.8, A = -1: min(-0.6065, -0.8) = -0.8 (clipped): +0.8, no gradient
    per = [-1.2, -1.0, 1.0, math.exp(0.5), 0.8]
    loss = policy_gradient_loss(logp, old, adv, mask, clip_eps=0.2, num_items_in_batch=10)
    assert loss.item() == pytest.approx(sum(per) / 10, abs=1e-6)
    loss.backward()
    want = torch.tensor([[0.0, -1.0, 0.0], [1.0, math.exp(0.5), 0.0]]) / 10
    torch.testing.assert_close(logp.grad, want)
    # Default denominator: this batch's 5 tokens; clip fraction: 1 of 5 clipped on the upper side
    # ((1,2) is clipped on the lower side: 2 of 5).
    assert policy_gradient_loss(logp, old, adv, mask).item() == pytest.approx(sum(per) / 5, abs=1e-6)
    assert clip_fraction(logp, old, adv, mask) == pytest.approx(2 / 5)
    # clip-higher: eps_high 0.3 lets (0,0) through unclipped.
    hi = policy_gradient_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.3, reduction="sum")
    assert hi.item() == pytest.approx(sum(per) - (-1.2) + (-math.exp(0.2)), abs=1e-6)


def test_kl_term_by_hand():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5]])
    d = -0.5
    assert kl_k3(logp, ref).item() == pytest.approx(math.exp(d) - d - 1, abs=1e-7)
    loss = policy_gradient_loss(logp, logp.detach(), torch.zeros(1, 1), ref_logprobs=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * (math.exp(d) - d - 1), abs=1e-7)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_gradient_loss(logp, logp.detach(), torch.zeros(1, 1), kl_coef=0.1)


def test_grpo_needs_groups(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="samples_per_prompt"):
        tiny(tiny_model_dir, tmp_path / "g", method="grpo")


def test_grpo_trains(tiny_model_dir, tmp_path):
    from selfdistill.trainer import train

    out = tmp_path / "grpo"
    cfg = tiny(tiny_model_dir, out, method="grpo", **{"onpolicy.samples_per_prompt": 2, "grpo.kl_coef": 0.05})
    assert train(cfg, log=lambda s: None).steps == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and "clip_frac" in r and "reward_mean" in r
                                  for r in rows)
    # One update per batch: the ratio is exactly 1 at the update, nothing is clipped.
    assert all(r["clip_frac"] == 0 for r in rows)
    assert all(r["is_ratio_exact"] == 1 for r in rows)  # sampled in process: the metric says so


def _surrogate_grads(model, batch, adv_B, temperature: float) -> list[torch.Tensor]:
    """Gradients of -sum(A log p) / n with log p from model(...).logits at ``temperature``: GRPO's gradient
    at ratio 1."""
    s = batch.student
    logits = model(input_ids=s.input_ids_BT, attention_mask=s.attention_mask_BT).logits[:, :-1].float()
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, s.input_ids_BT[:, 1:, None]).squeeze(-1)
    mask = s.completion_mask_BT[:, 1:].float()
    loss = -(adv_B[:, None] * logp * mask).sum() / mask.sum()
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


@pytest.mark.parametrize("grpo_temperature", [None, 1.0])
def test_grpo_in_process_spends_no_old_forward_and_scores_at_the_sampling_temperature(
        tiny_model_dir, tmp_path, monkeypatch, grpo_temperature):
    """Sampled in process and used for one update, a batch carries no "old" log-probs (no forward is spent on
    them) and says the ratio is exact; the loss's log-probs are at rollout.temperature unless
    grpo.temperature is set (its gradient equals -A grad log p from the model's logits at that temperature)."""
    import selfdistill.methods.grpo as grpo_mod

    over = {"onpolicy.samples_per_prompt": 2, "rollout.temperature": 0.7}
    if grpo_temperature is not None:
        over["grpo.temperature"] = grpo_temperature
    method = tinyrun.method(tiny(tiny_model_dir, tmp_path / "g", method="grpo", **over))
    calls = []
    real = grpo_mod.target_logprobs
    monkeypatch.setattr(grpo_mod, "target_logprobs", lambda *a, **k: calls.append(k) or real(*a, **k))
    batch = method.make_batch(0, method.ctx.stream.for_step(0))
    assert calls == [] and "old_logp_BT" not in batch.tensors and batch.info["is_ratio_exact"] == 1.0
    adv_B = torch.tensor([1.0, -1.0, 0.5, -0.5])  # whatever the toy rewards: a gradient to compare
    batch.tensors["adv_B"] = adv_B
    n = batch.student.completion_mask_BT[:, 1:].sum()
    loss, info = method.loss(batch, n)
    assert calls == [{"temperature": 0.7 if grpo_temperature is None else 1.0}] and info["clip_frac"] == 0.0
    model = method.ctx.model
    got = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for t in (0.7, 1.0):
        want = _surrogate_grads(model, batch, adv_B, t)
        close = all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(got, want) if b is not None)
        assert close == (t == (0.7 if grpo_temperature is None else 1.0)), t
