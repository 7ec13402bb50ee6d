"""rollout.backend=vllm without vLLM: the code path with a fake engine injected.

The fake engine samples greedily with its own copy of the model, so it only
gives the trained model's answers if the weights were really synced; it
reports its own log-probs of the tokens it returns, as vLLM does.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from selfdistill import vllm_backend
from selfdistill.models import load_tokenizer
from selfdistill.rollout import SamplingConfig, generate


def engine_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """log p(completion token | prefix) under ``model`` at ``temperature`` (1 for greedy), as vLLM reports."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), -1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


class FakeEngine:
    """An :class:`~selfdistill.vllm_backend.Engine`: a private model copy, greedy, records every call."""

    def __init__(self, model) -> None:
        self.model = copy.deepcopy(model).eval()
        with torch.no_grad():  # start from different weights: only a sync makes it agree
            for p in self.model.parameters():
                p.add_(0.5)
        self.loaded: list[str] = []
        self.calls: list[tuple[list[list[int]], vllm_backend.SamplingParams]] = []

    def generate(self, prompts_token_ids, params):
        self.calls.append((prompts_token_ids, params))
        out = []
        for p in prompts_token_ids:
            ids = torch.tensor([p])
            with torch.no_grad():
                seq = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=params.max_new_tokens,
                                          eos_token_id=list(params.stop_token_ids), pad_token_id=0)
            ids = seq[0, len(p):].tolist()
            lp = engine_logprobs(self.model, p, ids, params.temperature)
            # junk after the stop token must be cut (with its log-prob)
            out.append(vllm_backend.EngineOutput(ids + [999_999], lp + [0.0]))
        return out

    def load_weights(self, named_tensors):
        state = self.model.state_dict()
        for name, t in named_tensors:
            state[name].copy_(t)
            self.loaded.append(name)

    @property
    def syncs(self) -> int:  # a sync pushes every weight once; embed_tokens comes first
        return self.loaded.count("model.embed_tokens.weight")


@pytest.fixture
def fake_engines():
    made: list[FakeEngine] = []

    def factory(model, cfg):
        made.append(FakeEngine(model))
        return made[-1]

    vllm_backend.set_engine_factory(factory)
    yield made
    vllm_backend.set_engine_factory(None)


def _prompts(tok, n=3):
    return [tok.apply_chat_template([{"role": "user", "content": f"{i}*{i}="}], tokenize=False,
                                    add_generation_prompt=True) for i in range(n)]


def test_vllm_rollouts_use_the_engine_and_sync_weights(tiny_model_dir, fake_engines):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    prompts = _prompts(tok)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0, backend="vllm")
    ro = generate(model, tok, prompts, cfg)
    want = generate(model, tok, prompts, SamplingConfig(max_new_tokens=8, temperature=0))
    engine = fake_engines[0]
    assert len(fake_engines) == 1 and len(engine.calls) == 1
    assert engine.syncs == 1  # synced on first use
    assert "lm_head.weight" not in engine.loaded  # tied to the embeddings: pushed once
    assert ro.completion_ids == want.completion_ids and ro.texts == want.texts  # synced weights, junk cut
    assert all(999_999 not in c for c in ro.completion_ids)
    params = engine.calls[0][1]
    assert params.max_new_tokens == 8 and params.temperature == 0 and tok.eos_token_id in params.stop_token_ids

    generate(model, tok, prompts, cfg)  # unchanged weights: no second sync
    assert engine.syncs == 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    generate(model, tok, prompts, cfg)  # after an optimizer step: synced again
    assert engine.syncs == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(engine.model.state_dict()[name], p.detach())


def test_vllm_falls_back_to_hf_under_an_activation_view(tiny_model_dir, fake_engines):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    h = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, o: o * 1.0)
    try:
        assert not vllm_backend.usable(model)
        generate(model, tok, _prompts(tok), SamplingConfig(max_new_tokens=4, backend="vllm"))
    finally:
        h.remove()
    assert not fake_engines  # the view's hooks cannot run inside vLLM: the hf backend sampled


def test_lora_weights_are_merged_under_checkpoint_names(tiny_model_dir):
    from selfdistill.config import LoraSettings
    from selfdistill.models import wrap_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain_names = {n for n, _ in vllm_backend.named_weights(base)}
    model = wrap_lora(copy.deepcopy(base), LoraSettings(enabled=True, r=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    named = {n: t.clone() for n, t in vllm_backend.named_weights(model)}  # copied as they come
    assert set(named) == plain_names and not any("lora" in n or "base_layer" in n for n in named)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (named[q] - base.state_dict()[q]).abs().max() > 1e-2  # the adapter is merged in
    # ... and unmerged again afterwards: the PEFT model is unchanged (up to rounding)
    torch.testing.assert_close(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight,
                               base.state_dict()[q], atol=1e-6, rtol=1e-5)


def test_training_run_with_vllm_backend(tiny_model_dir, tmp_path, fake_engines):
    from selfdistill.config import TrainConfig
    from selfdistill.config_io import from_dict
    from selfdistill.trainer import train

    cfg = from_dict(TrainConfig, {
        "method": "opsd", "output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "micro_batch_size": 2,
        "model": {"path": tiny_model_dir}, "data": {"train_size": 10, "test_size": 2},
        "rollout": {"max_new_tokens": 6, "backend": "vllm", "temperature": 1.0}, "eval_before": False,
        "eval_after": False, "optim": {"lr": 1e-3, "warmup_steps": 0}, "distill": {"is_clip": 2.0}})
    train(cfg, log=lambda s: None)
    engine = fake_engines[0]
    assert len(engine.calls) == 2 and engine.syncs == 2  # one rollout and one sync per step
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    assert all(r["is_ratio_exact"] == 0 for r in rows)  # weighed against the engine's log-probs


def test_bad_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend"):
        SamplingConfig(backend="tgi")


def test_engine_logprobs_come_with_the_rollouts(tiny_model_dir, fake_engines):
    """The engine's log-prob of every kept token reaches Rollouts.sampler_logprobs (junk cut with its token);
    in process there are none (the training model itself sampled)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    prompts = _prompts(tok)
    ro = generate(model, tok, prompts, SamplingConfig(max_new_tokens=8, temperature=0, backend="vllm"))
    assert [len(lp) for lp in ro.sampler_logprobs] == [len(c) for c in ro.completion_ids]
    for p, c, lp in zip(ro.prompt_ids, ro.completion_ids, ro.sampler_logprobs):  # synced: the model's own
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(engine_logprobs(model, p, c, 1.0)),
                                   atol=1e-5, rtol=1e-5)
    assert generate(model, tok, prompts, SamplingConfig(max_new_tokens=8, temperature=0)).sampler_logprobs is None


def test_an_engine_without_logprobs_is_refused(tiny_model_dir):
    class IdsOnly(FakeEngine):
        def generate(self, prompts_token_ids, params):
            return [o.token_ids for o in super().generate(prompts_token_ids, params)]

    vllm_backend.set_engine_factory(lambda model, cfg: IdsOnly(model))
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        tok = load_tokenizer(tiny_model_dir)
        with pytest.raises(RuntimeError, match="one log-prob per token"):
            generate(model, tok, _prompts(tok), SamplingConfig(max_new_tokens=4, temperature=0, backend="vllm"))
    finally:
        vllm_backend.set_engine_factory(None)


def _drifted_method(tiny_model_dir, tmp_path, fake_engines, method: str, **over):
    """``method`` with vLLM rollouts from an engine whose weights drifted from the trained model's after
    the first sync (its numerics are its own): the importance ratio is not 1."""
    import tinyrun

    base = {"output_dir": str(tmp_path / method), "batch_size": 2, "model": {"path": tiny_model_dir},
            "data": {"train_size": 8, "test_size": 2, "tasks": ["toy-math"]},
            "rollout": {"max_new_tokens": 6, "temperature": 0, "backend": "vllm"}}
    m = tinyrun.method(tinyrun.config(base, method=method, **over))
    tok = m.ctx.tokenizer
    generate(m.ctx.model, tok, _prompts(tok, 1), m.ctx.cfg.rollout)  # first use: the engine is synced
    with torch.no_grad():
        for p in fake_engines[0].model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _sampler_logprobs_BT(engine, batch) -> torch.Tensor:
    """What the engine says of each completion token, at its column of the student batch (0 elsewhere)."""
    s = batch.student
    out = torch.zeros(s.input_ids_BT.shape)
    for b in range(len(batch)):
        cols = s.completion_mask_BT[b].nonzero()[:, 0].tolist()
        ids = s.input_ids_BT[b].tolist()
        out[b, cols] = torch.tensor(engine_logprobs(engine.model, ids[:cols[0]], [ids[c] for c in cols], 0.0))
    return out


def _student_logits(model, seqs) -> torch.Tensor:
    return model(input_ids=seqs.input_ids_BT, attention_mask=seqs.attention_mask_BT).logits[:, :-1].float()


def test_opsd_is_clip_weighs_by_the_samplers_logprobs(tiny_model_dir, tmp_path, fake_engines):
    """distill.is_clip with vLLM rollouts: the batch carries the engine's log-probs as the rollout policy's,
    the metric says the ratio is not exact, and each token's loss is weighted by min(p_student / p_sampler,
    c), detached (pinned to a hand computation from model(...).logits)."""
    m = _drifted_method(tiny_model_dir, tmp_path, fake_engines, "opsd", **{
        "distill.kind": "reverse_kl", "distill.is_clip": 1.05})
    batch = m.make_batch(0, m.ctx.stream.for_step(0))
    assert batch.info["is_ratio_exact"] == 0.0
    old_BT = _sampler_logprobs_BT(fake_engines[0], batch)
    torch.testing.assert_close(batch.tensors["old_logp_BT"], old_BT, atol=1e-5, rtol=1e-5)
    s, t = batch.student, batch.teacher
    n = s.completion_mask_BT[:, 1:].sum()
    loss, _ = m.loss(batch, n)

    s_mask, t_mask = s.completion_mask_BT[:, 1:].bool(), t.completion_mask_BT[:, 1:].bool()
    ls = torch.log_softmax(_student_logits(m.ctx.model, s)[s_mask], -1)
    with torch.no_grad():
        lt = torch.log_softmax(_student_logits(m.teacher.copy, t)[t_mask], -1)
    kl_N = (ls.exp() * (ls - lt)).sum(-1)
    logp_y = ls.gather(-1, s.input_ids_BT[:, 1:][s_mask][:, None])[:, 0]
    w_N = torch.exp(logp_y.detach() - old_BT[:, 1:][s_mask]).clamp(max=1.05)
    assert (w_N < 1.05).any() and (w_N != 1.0).all()  # the drift shows, and not every token is clipped
    want = (w_N * kl_N).sum() / n
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    params = list(m.ctx.model.parameters())
    for a, b in zip(torch.autograd.grad(loss, params, allow_unused=True),
                    torch.autograd.grad(want, params, allow_unused=True)):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_grpo_ratio_is_against_the_samplers_logprobs(tiny_model_dir, tmp_path, fake_engines, monkeypatch):
    """GRPO with vLLM rollouts: no forward for the "old" log-probs, the engine's stand in for them, and the
    clipped-ratio loss is taken against them (pinned to policy_gradient_loss on model(...).logits)."""
    import selfdistill.methods.grpo as grpo_mod
    from selfdistill.objectives import policy_gradient_loss

    m = _drifted_method(tiny_model_dir, tmp_path, fake_engines, "grpo", **{
        "onpolicy.samples_per_prompt": 2, "grpo.clip_eps": 0.02})
    real, calls = grpo_mod.target_logprobs, []
    monkeypatch.setattr(grpo_mod, "target_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = m.make_batch(0, m.ctx.stream.for_step(0))
    assert not calls and batch.info["is_ratio_exact"] == 0.0
    old_BT = _sampler_logprobs_BT(fake_engines[0], batch)
    torch.testing.assert_close(batch.tensors["old_logp_BT"], old_BT, atol=1e-5, rtol=1e-5)
    adv_B1 = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]])
    batch.tensors["adv_B"] = adv_B1[:, 0]
    s = batch.student
    mask = s.completion_mask_BT[:, 1:]
    loss, info = m.loss(batch, mask.sum())
    logp = torch.log_softmax(_student_logits(m.ctx.model, s), -1).gather(-1, s.input_ids_BT[:, 1:, None])[..., 0]
    want = policy_gradient_loss(logp, old_BT[:, 1:], adv_B1, mask, clip_eps=0.02, num_items_in_batch=mask.sum())
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    assert 0 < info["clip_frac"] < 1  # the ratio against the drifted sampler is not 1


@pytest.mark.parametrize("method, over, ok", [
    ("opsd", {"distill.is_clip": 2.0}, False),  # distill.temperature 1, rollout.temperature 0.8
    ("opsd", {"distill.is_clip": 2.0, "rollout.temperature": 1.0}, True),
    ("opsd", {"distill.is_clip": 2.0, "rollout.temperature": 0.0}, True),  # greedy: the engine reports T = 1
    ("opsd", {}, True),  # no ratio
    ("grpo", {}, True),  # grpo.temperature unset: the sampling temperature
    ("grpo", {"grpo.temperature": 1.0}, False),
    ("grpo", {"grpo.temperature": 0.8}, True),
    ("grpo", {"grpo.temperature": 1.0, "rollout.backend": "hf"}, True),  # in process: the ratio is exact
])
def test_the_ratio_is_taken_at_the_samplers_temperature(method, over, ok):
    import tinyrun

    from selfdistill.config_io import ConfigError
    from selfdistill.methods.base import get_method
    from selfdistill.validation import check_sampler_ratio

    cfg = tinyrun.config({"output_dir": "unused", "rollout": {"backend": "vllm"},
                          "onpolicy": {"samples_per_prompt": 2}}, method=method, **over)
    if ok:
        check_sampler_ratio(cfg, get_method(method))
    else:
        with pytest.raises(ConfigError, match="importance ratio.*set them equal"):
            check_sampler_ratio(cfg, get_method(method))


def test_ccopd_turns_carry_the_samplers_logprobs(tiny_model_dir, tmp_path, fake_engines):
    """CC-OPD builds its rollouts turn by turn: every trained turn keeps the engine's log-probs of its tokens."""
    m = _drifted_method(tiny_model_dir, tmp_path, fake_engines, "ccopd", **{
        "ccopd.turns": "all", "distill.is_clip": 2.0})
    batch = m.make_batch(0, m.ctx.stream.for_step(0))
    assert len(batch) > 2 and batch.info["is_ratio_exact"] == 0.0  # several turns per conversation
    torch.testing.assert_close(batch.tensors["old_logp_BT"], _sampler_logprobs_BT(fake_engines[0], batch),
                               atol=1e-5, rtol=1e-5)
