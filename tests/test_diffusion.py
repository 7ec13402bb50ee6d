"""The masked-diffusion sampler against a slow reference, and LLaDA's loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from selfdistill.diffusion import (DiffusionSampling, _uniforms, logits_at, masked_diffusion_loss, response_batch,
                                   sample)

MASK, EOS, PAD, V = 5, 2, 0, 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=128, global_attn_every_n_layers=1,
                           pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1, cls_token_id=1, sep_token_id=EOS)
    return ModernBertForMaskedLM(cfg).double().eval()


@torch.no_grad()
def reference(model, prompt: list[int], cfg: DiffusionSampling, seed: int | None) -> tuple[list[int], list[list[int]]]:
    """One prompt, no padding, plain loops: LLaDA's sampler written out position by position."""
    P, L = len(prompt), cfg.gen_length
    x = prompt + [MASK] * L
    states, step = [], 0
    for blk in range(cfg.blocks):
        lo, hi = blk * cfg.block_length, (blk + 1) * cfg.block_length
        for k in cfg.transfers():
            states.append(list(x))
            logits = model(input_ids=torch.tensor([x])).logits[0, P:].double()
            probs = logits.softmax(-1)
            if cfg.temperature > 0:
                u = _uniforms([seed], 1, (L, V), 2 * step)[0].double()
                noisy = logits / cfg.temperature - torch.log(-torch.log(u))
                pred = [int(noisy[i].argmax()) for i in range(L)]
            else:
                pred = [int(logits[i].argmax()) for i in range(L)]
            if cfg.remasking == "low_confidence":
                conf = [float(probs[i, pred[i]]) for i in range(L)]
            else:
                conf = _uniforms([seed], 1, (L,), 2 * step + 1)[0].double().tolist()
            cands = [i for i in range(lo, hi) if x[P + i] == MASK]
            for i in sorted(cands, key=lambda i: -conf[i])[:k]:
                x[P + i] = pred[i]
            step += 1
    return x[P:], states


@pytest.mark.parametrize("temperature,remasking", [(0.0, "low_confidence"), (0.9, "low_confidence"),
                                                   (0.0, "random")])
def test_batched_sampler_equals_the_slow_reference(model, temperature, remasking):
    cfg = DiffusionSampling(gen_length=8, block_length=4, steps=6, temperature=temperature, remasking=remasking)
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14], [15]]
    seeds = [11, 22, 33]
    got = sample(model, prompts, cfg, MASK, [EOS], PAD, record=True, row_seeds=seeds)
    assert len(got.states) == cfg.steps and got.step_block == [0, 0, 0, 1, 1, 1]
    for b, (p, s) in enumerate(zip(prompts, seeds)):
        want, states = reference(model, p, cfg, s)
        assert got.final_BT[b, got.prompt_width:].tolist() == want
        cut = next((i for i, t in enumerate(want) if t == EOS), None)
        assert got.completion_ids[b] == (want[:cut + 1] if cut is not None else want)
        for st, ref in zip(got.states, states):  # the recorded states, without the prompt padding
            assert st[b, got.prompt_width - len(p):].tolist() == ref
    # nothing left masked; every step committed its share
    assert not (got.final_BT[:, got.prompt_width:] == MASK).any()
    masks_left = [int((st[:, got.prompt_width:] == MASK).sum(-1)[0]) for st in got.states]
    assert masks_left == [8, 6, 5, 4, 2, 1]  # transfers per block of 4 in 3 steps: 2, 1, 1


def test_a_response_does_not_depend_on_the_batch(model):
    cfg = DiffusionSampling(gen_length=8, block_length=8, steps=4, temperature=1.0)
    prompts = [[7, 8, 9], [10, 11, 12, 13, 14]]
    both = sample(model, prompts, cfg, MASK, [EOS], PAD, row_seeds=[1, 2]).completion_ids
    alone = sample(model, prompts[1:], cfg, MASK, [EOS], PAD, row_seeds=[2]).completion_ids
    assert both[1] == alone[0]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="multiple of block_length"):
        DiffusionSampling(gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="multiple of the 2 blocks"):
        DiffusionSampling(gen_length=8, block_length=4, steps=3)
    assert DiffusionSampling(gen_length=8, block_length=8, steps=3).transfers() == [3, 3, 2]


def test_logits_at_runs_the_head_on_the_chosen_positions_only(model):
    """The same logits as the whole model's at those positions; the output layer sees (B, P, H), not (B, T, H);
    a model whose head is not called on the hidden states is run whole and gathered."""
    torch.manual_seed(1)
    ids = torch.randint(6, V, (3, 9))
    attn = torch.ones_like(ids)
    attn[1, :2] = 0
    pos = torch.tensor([[4, 5], [8, 2], [0, 0]])
    seen = []
    h = model.get_output_embeddings().register_forward_hook(lambda _m, a, out: seen.append(tuple(a[0].shape)))
    try:
        got = logits_at(model, ids, attn, pos)
    finally:
        h.remove()
    full = model(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(got, full[torch.arange(3)[:, None], pos], rtol=1e-10, atol=1e-10)
    assert seen == [(3, 2, 32)]

    class Headless(torch.nn.Module):  # no output embeddings: the full logits, gathered
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": model(input_ids=input_ids, attention_mask=attention_mask).logits})()

    torch.testing.assert_close(logits_at(Headless(), ids, attn, pos), got, rtol=1e-10, atol=1e-10)


def test_masked_diffusion_loss_by_hand():
    """Two rows; row 0 masks its two response tokens at t=1 (p = 1), row 1 masks one of two at t=0.5."""

    class Fixed(torch.nn.Module):  # logits that do not depend on the input: the loss is hand-computable
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.logits.expand(input_ids.shape[0], -1, -1)})()

    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]] * 4]))
    ids, attn, resp = response_batch([[0, 1], [1, 1]], [[1, 2], [2]], gen_length=2, eos_id=2, pad_id=0)
    assert ids.tolist() == [[0, 1, 1, 2], [1, 1, 2, 2]] and resp[:, 2:].all() and not resp[:, :2].any()
    t = torch.tensor([1.0, 0.5])
    noise = torch.tensor([[0.9, 0.9, 0.1, 0.2], [0.9, 0.9, 0.1, 0.9]])
    loss = masked_diffusion_loss(Fixed(logits), ids, attn, resp, mask_id=3, t_B=t, noise_BT=noise, eps=0.0)
    row0 = (-math.log(0.25) - math.log(0.25)) / 1.0 / 2  # tokens 1 and 2, p = 1, length 2
    row1 = -math.log(0.25) / 0.5 / 2  # token 2 (the EOS padding counts), p = 0.5, length 2
    assert float(loss) == pytest.approx((row0 + row1) / 2)


def test_toy_diffusion_pretraining_resumes_and_the_model_evaluates(tmp_path, capsys):
    """`selfdistill toy pretrain-diffusion` (tiny settings): stopped at step 2 and continued = run to 4 at once;
    the saved folder loads as a masked-diffusion LM, `selfdistill eval` samples it with the diffusion sampler,
    and a method for causal LMs refuses it in one line."""
    from safetensors.torch import load_file

    from selfdistill.cli import main

    tiny = ["--steps", "4", "--tokens_per_step", "2048", "--gen_length", "32", "--max_prompt", "96",
            "--hidden_size", "32", "--layers", "1", "--heads", "2", "--intermediate", "64", "--threads", "1",
            "--checkpoint_every", "2"]
    assert main(["toy", "pretrain-diffusion", "--out", str(tmp_path / "a"), *tiny, "--stop_step", "2"]) == 0
    assert main(["toy", "pretrain-diffusion", "--out", str(tmp_path / "a"), *tiny]) == 0
    assert main(["toy", "pretrain-diffusion", "--out", str(tmp_path / "b"), *tiny]) == 0
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    capsys.readouterr()
    rc = main(["eval", "--model.path", str(tmp_path / "a"), "--data.tasks", "toy-math", "--data.test_size", "2",
               "--eval.max_items", "2", "--eval.samples", "1", "--eval.max_new_tokens", "32",
               "--eval.splits", "test_id"])
    assert rc == 0 and "toy-math" in capsys.readouterr().out
    rc = main(["train", "--method", "sft", "--model.path", str(tmp_path / "a"), "--output_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a masked-diffusion LM; method sft trains causal models" in err
    assert not (tmp_path / "r").exists()
