"""rollout.backend=vllm without vLLM: the code path with a fake engine injected.

The fake engine samples greedily with its own copy of the model, so it only
gives the trained model's answers if the weights were really synced.
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
            out.append(seq[0, len(p):].tolist() + [999_999])  # junk after the stop token must be cut
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
        "rollout": {"max_new_tokens": 6, "backend": "vllm"}, "eval_before": False, "eval_after": False,
        "optim": {"lr": 1e-3, "warmup_steps": 0}})
    train(cfg, log=lambda s: None)
    engine = fake_engines[0]
    assert len(engine.calls) == 2 and engine.syncs == 2  # one rollout and one sync per step
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)


def test_bad_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend"):
        SamplingConfig(backend="tgi")
