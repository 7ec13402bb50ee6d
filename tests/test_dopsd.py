"""d-OPSD and its diffusion baselines: the clamped top-k reverse KL by hand, the self-future view, and
end-to-end runs on a tiny random masked-diffusion model (loss on the chosen positions, exact resume with a
rollout reused over steps, correctness gating, the baselines' losses, one-line refusals)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.cli import main
from selfdistill.objectives import clipped_reverse_kl_on_support, clipped_topk_reverse_kl, teacher_topk
from selfdistill.methods.dopsd import DOPSD, reveal_future
from selfdistill.trainer import train

import tinyrun  # tests/tinyrun.py

QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module")
def diffusion_dir(tmp_path_factory) -> str:
    """A tiny random ModernBERT masked LM with the toy tokenizer + a mask token."""
    from transformers import ModernBertForMaskedLM

    from selfdistill.toy.diffusion_model import DiffusionPretrainConfig, diffusion_tokenizer, model_config

    torch.manual_seed(0)
    tok = diffusion_tokenizer()
    cfg = model_config(tok, DiffusionPretrainConfig(hidden_size=32, layers=1, heads=2, intermediate=64,
                                                    max_prompt=256, gen_length=32))
    path = tmp_path_factory.mktemp("tiny_diffusion")
    ModernBertForMaskedLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


BASE = {
    "method": "d-opsd", "steps": 4, "batch_size": 2, "micro_batch_size": 16,
    "data": {"tasks": ["toy-math"], "train_size": 8, "test_size": 2},
    "rollout": {"max_new_tokens": 16, "diffusion_block_length": 4, "temperature": 0.9, "batch_size": 8},
    "dopsd": {"resamples": 2, "reuse": 2},
    "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
    "eval_before": False, "eval_after": False,
}


def cfg_of(model: str, out, **over):
    return tinyrun.config({**BASE, "output_dir": str(out), "model": {"path": model}}, **over)


def test_clipped_reverse_kl_by_hand():
    s = torch.tensor([[2.0, 1.0, 0.0, -1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.5, 1.0, -3.0]])
    # teacher top-2: ids 1, 2; both renormalised over them
    qs = torch.softmax(torch.tensor([1.0, 0.0]), -1)
    qt = torch.softmax(torch.tensor([1.5, 1.0]), -1)
    elems = qs * (qs.log() - qt.log())
    assert torch.allclose(clipped_topk_reverse_kl(s, t, topk=2, clip=0.0), elems.sum()[None], atol=1e-6)
    clipped = elems.clamp(max=0.01).sum()
    out = clipped_topk_reverse_kl(s, t, topk=2, clip=0.01)
    assert torch.allclose(out, clipped[None], atol=1e-6) and elems.max() > 0.01  # the clamp acted
    ids, lt = teacher_topk(t, 2)
    assert ids.tolist() == [[1, 2]] and torch.allclose(lt.exp().sum(-1), torch.ones(1))
    # An element at the clamp passes no gradient: here element 0 (4.6 nats) is clamped, element 1 is not, so
    # the gradient is element 1's alone.
    s2 = torch.tensor([[3.0, -3.0]], requires_grad=True)
    lt2 = torch.log(torch.tensor([[0.01, 0.99]]))
    clipped_reverse_kl_on_support(s2, torch.tensor([[0, 1]]), lt2, 0.05).sum().backward()
    s3 = torch.tensor([[3.0, -3.0]], requires_grad=True)
    ls3 = s3.log_softmax(-1)
    (ls3.exp() * (ls3 - lt2))[0, 1].backward()
    assert torch.allclose(s2.grad, s3.grad, atol=1e-7) and s2.grad.abs().sum() > 0
    # Zero when the student equals the teacher on the support; the student's tokens outside it do not count.
    same = clipped_topk_reverse_kl(torch.tensor([[0.0, 1.5, 1.0, 9.0]]), t, topk=3, clip=0.05)
    assert same.abs().item() < 1e-6


def test_reveal_future_fills_a_share_of_later_masks_only():
    M = 99
    state = torch.tensor([5, 6, M, M, M, M, M, M, M, M, M, M])
    final = torch.arange(100, 112)
    view = reveal_future(state, final, start=4, ratio=0.25, mask_id=M, seed=3)
    changed = (view != state).nonzero().squeeze(-1).tolist()
    assert len(changed) == 2 and all(c >= 4 for c in changed)  # 25% of the 8 masks after the block
    assert all(view[c] == final[c] for c in changed) and torch.equal(view[:4], state[:4])
    assert torch.equal(reveal_future(state, final, 4, 0.25, M, seed=3), view)  # a function of the seed
    assert torch.equal(reveal_future(state, final, 4, 0.0, M, seed=3), state)
    assert (reveal_future(state, final, 4, 1.0, M, seed=3)[4:] == final[4:]).all()


def test_dopsd_trains_the_chosen_positions_and_resumes_exactly(diffusion_dir, tmp_path, monkeypatch):
    """Every sample verified correct (patched): 4 steps, one rollout per 2 steps, 2 positions per state; a
    crash in step 4 (the second chunk of the second rollout: the resumed run must train the chunk its
    checkpoint holds, not sample anew) and a resume give the uninterrupted weights."""
    import selfdistill.tasks.verify as verify

    monkeypatch.setattr(verify, "verify_item", lambda item, text: True)
    ref = tmp_path / "ref"
    train(cfg_of(diffusion_dir, ref, save_every=1), **QUIET)
    rows = [__import__("json").loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
    # 16 tokens, 2 per step = 8 states per answer, minus the last block's 2 = 6; 2 prompts = 12 states, 6 per
    # chunk, 2 positions each.
    assert [r["tokens"] for r in rows] == [12.0] * 4
    assert [r["chunk"] for r in rows] == [0.0, 1.0, 0.0, 1.0]
    assert all(r["loss"] > 0 and math.isfinite(r["grad_norm"]) for r in rows)
    w0 = load_file(f"{diffusion_dir}/model.safetensors")
    w1 = load_file(str(ref / "model" / "model.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)

    out = tmp_path / "run"
    orig = DOPSD.make_batch

    def crash(self, step, items):
        if step == 3:
            raise RuntimeError("simulated crash")
        return orig(self, step, items)

    monkeypatch.setattr(DOPSD, "make_batch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg_of(diffusion_dir, out, save_every=1), **QUIET)
    monkeypatch.setattr(DOPSD, "make_batch", orig)
    train(cfg_of(diffusion_dir, out, save_every=1, resume=True), **QUIET)
    w2 = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_dopsd_without_a_correct_sample_trains_nothing(diffusion_dir, tmp_path, monkeypatch):
    import selfdistill.tasks.verify as verify

    calls = []
    monkeypatch.setattr(verify, "verify_item", lambda item, text: calls.append(text) and False)
    train(cfg_of(diffusion_dir, tmp_path / "r", steps=2), **QUIET)
    rows = [__import__("json").loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [0.0, 0.0] and rows[0]["solved_frac"] == 0.0
    assert len(calls) == 2 * 2 and rows[0]["tries_per_prompt"] == 2.0  # both tries, both prompts, one rollout


@pytest.mark.parametrize("method", ["diffusion-sft", "diffu-grpo"])
def test_diffusion_baselines_train(diffusion_dir, tmp_path, method):
    over = {"method": method, "steps": 2, "onpolicy.samples_per_prompt": 2}
    train(cfg_of(diffusion_dir, tmp_path / "r", **over), **QUIET)
    rows = [__import__("json").loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if method == "diffusion-sft":  # one token per row; LLaDA's loss is positive
        assert [r["tokens"] for r in rows] == [2.0, 2.0] and all(r["loss"] > 0 for r in rows)
    else:
        assert all(r["tokens"] >= 2 for r in rows) and "reward_mean" in rows[0]


def test_refusals_in_one_line(diffusion_dir, tiny_model_dir, tmp_path, capsys):
    common = ["--model.path", diffusion_dir, "--data.tasks", "toy-math", "--eval_before", "false",
              "--eval_after", "false", "--steps", "1"]
    cases = [
        (["--method", "d-opsd", "--rollout.temperature", "0", *common], "dopsd.resamples 8 with rollout.temperature 0"),
        (["--method", "diffu-grpo", *common], "diffu-grpo compares samples within a group"),
        (["--method", "d-opsd", "--model.path", tiny_model_dir, "--data.tasks", "toy-math", "--steps", "1"],
         "is an autoregressive (causal) LM; method d-opsd trains masked models"),
    ]
    for i, (args, msg) in enumerate(cases):
        capsys.readouterr()
        rc = main(["train", *args, "--output_dir", str(tmp_path / f"r{i}")])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, err
        assert not (tmp_path / f"r{i}").exists()


def test_the_table_preset_runs_and_gives_curves(diffusion_dir, tmp_path, monkeypatch, capsys):
    """`selfdistill table --preset d-opsd` at tiny settings: every row's settings are valid, the toy check
    (causal LMs only) is skipped for a diffusion model, runs evaluate every eval.every steps, and
    scripts/dopsd_curves.py reads accuracy against steps (step 0 = the base row)."""
    import importlib.util
    from pathlib import Path

    from selfdistill.config import TrainConfig
    from selfdistill.config_io import from_dict
    from selfdistill.experiments import get_preset, run_preset

    preset = get_preset("d-opsd")
    for row, runs in preset.rows.items():
        for run in runs:
            from_dict(TrainConfig, tinyrun.settings({}, **{**preset.common, **run.overrides}))
    common = {"model.path": diffusion_dir, "steps": 2, "eval.every": 1, "eval.max_items": 2,
              "eval.max_new_tokens": 16, "rollout.max_new_tokens": 16, "rollout.diffusion_block_length": 4,
              "dopsd.resamples": 1, "dopsd.reuse": 1, "data.train_size": 8, "data.test_size": 2}
    out = tmp_path / "t"
    run_preset(preset, ["base", "d-opsd"], [0], out, common, log=lambda s: None, check=True)
    assert not (out / "check.md").exists() and (out / "results.md").exists()
    steps = [__import__("json").loads(l)["step"] for l in (out / "runs" / "d-opsd-s0" / "evals.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # periodic at 1, after at 2; no before-training evaluation (the base row is step 0)
    spec = importlib.util.spec_from_file_location("curves", Path(__file__).parents[1] / "scripts" / "dopsd_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = mod.curves(out)
    assert sorted(data["d-opsd"]["toy-math test_id"]) == [0, 1, 2]


def test_the_shipped_toy_diffusion_model_is_a_masked_lm_with_a_mask_token():
    from transformers import AutoTokenizer

    from selfdistill.models import check_model_config, model_kind, resolve_model_path
    from selfdistill.toy.diffusion_model import DEFAULT_DIFFUSION_DIR

    path = resolve_model_path("toy-diffusion")
    assert path == str(DEFAULT_DIFFUSION_DIR) and model_kind(check_model_config(path)) == "masked"
    assert AutoTokenizer.from_pretrained(path).mask_token == "<|mask|>"
