"""SPD's method layer: correctness-token selection, random-subspace ablation, CLI subspace."""

from __future__ import annotations

import pytest
import torch

from selfdistill.cli import main
from selfdistill.methods.spd import randomize
from selfdistill.methods.spd.selectors import correctness_span, select_tokens, token_char_ends
from selfdistill.methods.spd.subspace import SubspaceAccumulator, load_subspaces
from selfdistill.tasks.base import Item
from selfdistill.toy.tokenizer import build_toy_tokenizer

TOK = build_toy_tokenizer()
ITEM = Item("i", "Compute 1+2", "1+2=3\n#### 3", "3", "math", {"kind": "math"})


def test_answer_selector_marks_exactly_the_answer_tokens():
    text = "1+2=4\n#### 42"
    ids = TOK(text, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    sel = select_tokens(TOK, ITEM, ids, text, "answer")
    picked = "".join(TOK.decode([i]) for i, s in zip(ids, sel) if s)
    assert picked == "42"
    assert sum(select_tokens(TOK, ITEM, ids, text, "all")) == len(ids)
    # No answer in any form the verifier reads: nothing is correctness-defining (never checked).
    none = TOK("I do not know", add_special_tokens=False)["input_ids"]
    assert sum(select_tokens(TOK, ITEM, none, "I do not know", "answer")) == 0
    # Without the marker, the verifier's fallback (the last number) is what SPD selects, too.
    short = TOK("1+2=4", add_special_tokens=False)["input_ids"]
    assert TOK.decode([i for i, s in zip(short, select_tokens(TOK, ITEM, short, "1+2=4", "answer")) if s]) == "4"


def test_token_char_ends_match_decoding():
    text = "x = 3\n#### -7"
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    assert token_char_ends(TOK, ids)[-1] == len(text)


def test_code_generation_span_is_the_code_body():
    item = Item("c", "write f", "", "", "code", {"kind": "tests"})
    text = "Here:\n```python\ndef f():\n    return 1\n```\n"
    s, e = correctness_span(item, text)
    assert text[s:e] == "def f():\n    return 1\n"


def test_random_ablation_keeps_rank_and_orthonormality():
    acc = SubspaceAccumulator()
    from selfdistill.methods.spd.subspace import KVGrads

    g = torch.randn(50, 16)
    acc.add(KVGrads({(0, "k"): g}, {(0, "k"): torch.randn(50, 16)}, {(0, "k"): 2}, 0.0, 50))
    sset = acc.fit(rank=3, center=True)
    r = randomize(sset, seed=0)
    U = r.subspaces[(0, "k")].U_dr
    assert U.shape == (16, 3)
    torch.testing.assert_close(U.T @ U, torch.eye(3), atol=1e-5, rtol=0)
    assert not torch.allclose(U, sset.subspaces[(0, "k")].U_dr)
    assert torch.equal(randomize(sset, seed=0).subspaces[(0, "k")].U_dr, U)


def test_cli_subspace_extracts_saves_and_plots(tiny_model_dir, tmp_path):
    out = tmp_path / "sub"
    rc = main(["spd", "subspace", "--model.path", tiny_model_dir, "--out", str(out), "--spd.probe_size", "4",
               "--spd.probe_samples", "1", "--spd.selector", "all", "--spd.rank", "3",
               "--rollout.max_new_tokens", "8", "--data.train_size", "10"])
    assert rc == 0
    sset = load_subspaces(out / "subspace.safetensors")
    assert len(sset.subspaces) == 4 and all(s.rank == 3 for s in sset.subspaces.values())
    assert (out / "spectra.png").stat().st_size > 1000


def test_cli_subspace_diagnostics(tiny_model_dir, tmp_path, capsys):
    import json

    out = tmp_path / "diag"
    rc = main(["spd", "subspace", "--model.path", tiny_model_dir, "--out", str(out), "--spd.probe_size", "4",
               "--spd.probe_samples", "1", "--spd.selector", "all", "--spd.rank", "3", "--diagnostics",
               "--eval_betas", "0,1", "--rollout.max_new_tokens", "8", "--data.train_size", "10",
               "--data.test_size", "3", "--eval.max_items", "3", "--eval.max_new_tokens", "6"])
    assert rc == 0
    d = json.loads((out / "diagnostics.json").read_text())
    assert len(d["sites"]) == 4 and all(0 <= s["grad_share"] <= 1 and s["random_share"] == 3 / s["dim"]
                                        for s in d["sites"])
    assert [r["beta"] for r in d["betas"]] == [0.0, 1.0] and abs(d["betas"][1]["kl_proj_plain"]) < 1e-6
    assert (out / "diagnostics.png").stat().st_size > 1000 and "gradient energy inside" in capsys.readouterr().out


def _opd_args(model_dir: str, out, *extra: str) -> list[str]:
    return ["train", "--method", "spd-opd", "--model.path", model_dir, "--output_dir", str(out), "--steps", "2",
            "--batch_size", "2", "--micro_batch_size", "2", "--spd.probe_size", "4", "--spd.probe_samples", "1",
            "--spd.selector", "all", "--spd.rank", "2", "--rollout.max_new_tokens", "6", "--data.train_size", "8",
            "--data.test_size", "2", "--eval.max_items", "2", "--eval.max_new_tokens", "4", "--eval_before", "false",
            "--distill.kind", "reverse_kl", *extra]


def test_spd_opd_trains_end_to_end_and_saves_its_subspace(tiny_model_dir, tmp_path):
    out = tmp_path / "opd"
    assert main(_opd_args(tiny_model_dir, out, "--spd.beta", "0.0")) == 0
    assert (out / "subspace-round0.safetensors").exists() and (out / "model" / "config.json").exists()
    import json

    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses and losses[0] > 0  # the projected teacher differs from the plain student


def test_spd_opd_teacher_is_the_student_when_nothing_is_projected(tiny_model_dir, tmp_path):
    """beta = 1 keeps every direction: the initial-weights teacher equals the student at step 1 (loss 0);
    beta = 0 (hard projection) makes it differ."""
    import json

    def first_loss(beta: str, name: str) -> float:
        out = tmp_path / name
        assert main(_opd_args(tiny_model_dir, out, "--spd.beta", beta, "--steps", "1", "--eval_after", "false")) == 0
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    assert abs(first_loss("1.0", "b1")) < 1e-6
    assert first_loss("0.0", "b0") > 1e-5


def _neox_model_dir(path) -> str:
    """A tiny random GPT-NeoX (K/V interleaved per head in one ``query_key_value``) + the toy tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, pad_token_id=TOK.pad_token_id,
                        eos_token_id=TOK.eos_token_id, bos_token_id=None)
    model = GPTNeoXForCausalLM(cfg)
    model.generation_config.eos_token_id = TOK.eos_token_id
    model.generation_config.pad_token_id = TOK.pad_token_id
    model.save_pretrained(path)
    TOK.save_pretrained(path)
    return str(path)


def test_spd_trains_end_to_end_on_gpt_neox(tmp_path, monkeypatch):
    """SPD on a model whose K/V sites are interleaved columns of query_key_value: the subspace is fit on
    them, sampling folds the projection into those weight rows, two SFT steps train."""
    import json

    from selfdistill.methods.spd import projection

    folded: list[list] = []
    fold_kv = projection.fold_kv

    def spy(model, subspaces, *args, **kwargs):
        folded.append(sorted(subspaces))
        return fold_kv(model, subspaces, *args, **kwargs)

    monkeypatch.setattr(projection, "fold_kv", spy)
    out = tmp_path / "run"
    args = ["train", "--method", "spd", "--model.path", _neox_model_dir(tmp_path / "neox"), "--output_dir", str(out),
            "--steps", "2", "--batch_size", "2", "--micro_batch_size", "2", "--spd.probe_size", "4",
            "--spd.probe_samples", "1", "--spd.selector", "all", "--spd.rank", "2", "--spd.beta", "0.5",
            "--rollout.max_new_tokens", "6", "--data.train_size", "8", "--data.test_size", "2",
            "--eval.max_items", "2", "--eval.max_new_tokens", "4", "--eval_before", "false"]
    assert main(args) == 0
    sset = load_subspaces(out / "subspace-round0.safetensors")
    assert sorted(sset.subspaces) == [(l, k) for l in (0, 1) for k in ("k", "v")]
    assert all(s.dim == 32 and s.rank == 2 for s in sset.subspaces.values())  # 4 heads x 8, all KV heads
    assert [(0, "k"), (0, "v"), (1, "k"), (1, "v")] in folded  # sampling folded every site, hooked none
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 2 and all(l > 0 for l in losses)


def test_vote_selector_keeps_majority_answers_only():
    """spd.selector vote (#16 item 3): the answer span only of completions whose answer at least two of their
    prompt's samples agree on; no label is read (the item's answer here is wrong on purpose)."""
    from selfdistill.method_configs import SPDConfig
    from selfdistill.methods.spd.selectors import majority_agrees

    it = Item("m", "What is 6*7?", "", "999", "math")
    texts = ["6*7=42\n#### 42", "#### 41", "so \\boxed{42}",      # prompt 1: 42 twice, 41 once
             "#### 5", "#### 6", "no answer here"]                 # prompt 2: no two agree
    assert majority_agrees([it] * 6, texts, 3) == [True, False, True, False, False, False]
    assert majority_agrees([it] * 2, ["#### 7", "####  7 "], 2) == [True, True]  # whitespace ignored
    with pytest.raises(ValueError, match="spd.selector vote needs spd.probe_samples >= 2"):
        SPDConfig(selector="vote", probe_samples=1)
