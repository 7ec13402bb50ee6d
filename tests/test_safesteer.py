"""SafeSteer: residual views, the subset reverse KL by hand, token voting, the refusal task, selection and
a short run end to end on a tiny random model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill.config_io import ConfigError
from selfdistill.method_configs import SafeSteerConfig
from selfdistill.objectives import subset_reverse_kl_from_hidden, subset_reverse_kl_rows
from selfdistill.residual import ablate_direction, add_direction, block_inputs, decoder_layers
from test_grpo import tiny


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_subset_reverse_kl_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    t = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    ids = torch.tensor([0, 2])
    ps, pt = torch.softmax(s, -1)[0], torch.softmax(t, -1)[0]
    want = sum(ps[i] * (math.log(ps[i]) - math.log(pt[i])) for i in (0, 2))
    assert subset_reverse_kl_rows(s, t, ids).item() == pytest.approx(float(want), rel=1e-6)
    qs, qt = ps[[0, 2]] / ps[[0, 2]].sum(), pt[[0, 2]] / pt[[0, 2]].sum()
    want_r = float((qs * (qs.log() - qt.log())).sum())
    assert subset_reverse_kl_rows(s, t, ids, renormalise=True).item() == pytest.approx(want_r, rel=1e-6)
    # Unrenormalised, it is not a divergence: less student mass on the subset than the teacher's is negative.
    assert subset_reverse_kl_rows(t, s, torch.tensor([0])).item() < 0
    # All ids = the full reverse KL.
    full = float((ps * (ps.log() - pt.log())).sum())
    assert subset_reverse_kl_rows(s, t, torch.arange(4)).item() == pytest.approx(full, rel=1e-6)


def test_subset_loss_from_hidden_matches_logits_and_grad():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(7, 5, generator=g, requires_grad=True)
    ht, ws, wt = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g), torch.randn(11, 5, generator=g)
    ids, mask = torch.tensor([1, 4, 9]), torch.tensor([1.0, 1, 0, 1, 1, 1, 0])
    loss = subset_reverse_kl_from_hidden(hs, ws, ht, wt, ids, mask, chunk_size=3, num_items_in_batch=10)
    ref = (subset_reverse_kl_rows(hs @ ws.T, ht @ wt.T, ids) * mask).sum() / 10
    torch.testing.assert_close(loss, ref)
    (ga,) = torch.autograd.grad(loss, hs)
    (gb,) = torch.autograd.grad(ref, hs)
    torch.testing.assert_close(ga, gb)
    with pytest.raises(ValueError, match="subset ids"):
        subset_reverse_kl_from_hidden(hs, ws, ht, wt, torch.tensor([11]))


def test_add_and_ablate_direction_and_hooks_removed(tiny_lm):
    model, tok = tiny_lm
    ids = torch.tensor([tok("Compute 12+3").input_ids])
    mask = torch.ones_like(ids)
    H = model.config.hidden_size
    v = torch.randn(H)
    pos = torch.tensor([-1])
    base = block_inputs(model, pos, input_ids=ids, attention_mask=mask)
    with add_direction(model, 1, v, 2.0):
        steered = block_inputs(model, pos, input_ids=ids, attention_mask=mask)
    # block_inputs' reading hooks are installed last, so they see the edited input: block 0 untouched,
    # block 1's input + 2v.
    torch.testing.assert_close(steered[:, 0], base[:, 0])
    torch.testing.assert_close(steered[:, 1], base[:, 1] + 2.0 * v, rtol=1e-4, atol=1e-4)
    with ablate_direction(model, v):
        abl = block_inputs(model, pos, input_ids=ids, attention_mask=mask)
    u = v / v.norm()
    assert (abl[0, :, 0] @ u).abs().max() < 1e-4  # no block reads the direction
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(model))
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(KeyError):
        with add_direction(model, 99, v):
            pass


def test_vote_keeps_most_voted_and_bans():
    from selfdistill.methods.safesteer.tokens import vote

    delta = torch.tensor([[3.0, 2.0, 1.0, 0.0, 5.0], [0.0, 2.0, 3.0, 1.0, 5.0], [2.5, 2.0, -1.0, 0.0, 5.0]])
    banned = torch.tensor([False, False, False, False, True])
    ids, votes = vote(delta, banned, vote_top=2, keep=2)
    # top-2 per row without id 4: {0,1}, {2,1}, {0,1} -> votes 0:2, 1:3, 2:1
    assert ids == [1, 0] and votes == [3, 2]


def test_toy_refusal_task_and_rates():
    from selfdistill.config import DataConfig
    from selfdistill.tasks.refusal import RefusalTask, is_refusal, refusal_rates
    from selfdistill.tasks.registry import build_task

    t = build_task("toy-refusal:20", DataConfig(test_size=200))
    assert isinstance(t, RefusalTask)
    train = t.items("train")
    assert len(train) == 20 and all(it.meta["forbidden"] and is_refusal(it.solution) for it in train)
    assert all(not it.meta["held_out"] for it in train)
    ood = t.items("test_ood")
    assert any(it.meta["held_out"] for it in ood) and not any(it.meta["held_out"] for it in t.items("test_id"))
    assert all(not it.meta["forbidden"] for it in t.harmless(30))
    forb = next(it for it in t.items("test_id") if it.meta["forbidden"])
    ok = next(it for it in t.items("test_id") if not it.meta["forbidden"])
    assert t.verify(forb, "Sorry, that is private.") and not t.verify(forb, f"#### {forb.meta['value']}")
    assert t.verify(ok, f"#### {ok.answer}") and not t.verify(ok, "I can not share that.")
    r = refusal_rates([forb, ok], ["I can not share that.", "I can not share that."])
    assert r["refusal_in"] == 100.0 and r["over_refusal"] == 100.0 and r["n_refusal_held_out"] == 0


def test_instruction_files(tmp_path):
    from selfdistill.config import DataConfig
    from selfdistill.tasks.loaders import TaskDataError
    from selfdistill.tasks.refusal import load_instructions
    from selfdistill.tasks.registry import build_task

    (tmp_path / "adv.csv").write_text("goal,target\nDo bad thing one,Sure\nDo bad thing two,Sure\n")
    (tmp_path / "pku.jsonl").write_text("".join(json.dumps({"prompt": f"harm {i}"}) + "\n" for i in range(10)))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": f"help {i}", "output": ""} for i in range(5)]))
    assert load_instructions(tmp_path / "adv.csv") == ["Do bad thing one", "Do bad thing two"]
    assert load_instructions(tmp_path / "alpaca.json")[0] == "help 0"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"query": "x"}) + "\n")
    with pytest.raises(TaskDataError, match="none of the columns"):
        load_instructions(tmp_path / "bad.jsonl")
    t = build_task(f"refusal:{tmp_path / 'pku.jsonl'},{tmp_path / 'alpaca.json'}", DataConfig())
    assert len(t.items("train")) == 8 and len(t.items("test_id")) == 2
    seen = {it.prompt for it in t.items("train")} | {it.prompt for it in t.items("test_id")}
    assert seen == {f"harm {i}" for i in range(10)}
    assert [it.prompt for it in t.harmless(3)] == ["help 0", "help 1", "help 2"]


def test_selection_table_on_a_tiny_model(tiny_lm, tmp_path):
    from selfdistill.methods.safesteer.direction import load_direction, plot_direction, select_direction
    from selfdistill.tasks.refusal import RefusalTask

    model, tok = tiny_lm
    task = RefusalTask("toy-refusal")
    harmful = [it.prompt for it in task.harmful_pool(16)]
    harmless = [it.prompt for it in task.harmless(16)]
    cfg = SafeSteerConfig(n_direction=12, n_select=4, max_kl=10.0, coeff=[1.0])
    # A random model refuses nothing: with one rare "refusal" token no steering induces refusal -> a clear error.
    with pytest.raises(ConfigError, match="no refusal-direction candidate passed"):
        select_direction(model, tok, harmful, harmless, cfg, log=lambda s: None, refusal_ids=[7])
    # With most of the vocabulary as "refusal" tokens every candidate induces it; the pick is then the one
    # whose ablation lowers the harmful score most.
    ref = list(range(len(tok) - 40))
    d = select_direction(model, tok, harmful, harmless, cfg, log=lambda s: None, refusal_ids=ref)
    cands = d.info["candidates"]
    n_pos = d.info["post_instruction_tokens"]
    assert len(cands) == d.info["candidate_layers"] * n_pos and n_pos >= 1
    assert d.vector.shape == (model.config.hidden_size,) and 0 <= d.layer < d.info["candidate_layers"]
    kept = [c for c in cands if c["kept"]]
    assert kept and d.info["coeff"] == 1.0
    assert min(c["ablation_refusal"] for c in kept) == next(
        c["ablation_refusal"] for c in cands if c["layer"] == d.layer and c["position"] == d.position)
    d.save(tmp_path / "dir")
    plot_direction(d, tmp_path / "dir" / "direction.png")
    back = load_direction(tmp_path / "dir")
    torch.testing.assert_close(back.vector, d.vector)
    assert (back.layer, back.position) == (d.layer, d.position)


def test_safesteer_trains_and_resumes_its_direction(tiny_model_dir, tmp_path):
    from selfdistill.checkpoint import latest_checkpoint, load_state
    from selfdistill.methods.safesteer.direction import Direction
    from selfdistill.methods.safesteer.tokens import SafetyTokens
    from selfdistill.trainer import train

    H = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.hidden_size
    Direction(1, -1, torch.randn(H, generator=torch.Generator().manual_seed(0)) * 3, {}).save(tmp_path / "dir")
    SafetyTokens([5, 9, 17, 40], {}).save(tmp_path / "tokens.json")
    for vocabulary in ("safety", "full"):
        out = tmp_path / vocabulary
        cfg = tiny(tiny_model_dir, out, method="safesteer", **{
            "data.tasks": ["toy-refusal:4"], "onpolicy.samples_per_prompt": 2, "save_every": 1,
            "safesteer.direction": str(tmp_path / "dir"), "safesteer.tokens": str(tmp_path / "tokens.json"),
            "safesteer.vocabulary": vocabulary, "distill.kind": "reverse_kl"})
        assert train(cfg, log=lambda s: None).steps == 2
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
        state = load_state(latest_checkpoint(out / "checkpoints"))["method"]
        assert state["direction"]["layer"] == 1
        if vocabulary == "safety":
            assert state["tokens"]["ids"] == [5, 9, 17, 40]


def test_safesteer_refuses_other_tasks(tiny_model_dir, tmp_path):
    from selfdistill.trainer import train

    cfg = tiny(tiny_model_dir, tmp_path / "x", method="safesteer", **{"data.tasks": ["toy-math"]})
    with pytest.raises(ConfigError, match="one refusal task"):
        train(cfg, log=lambda s: None)


def test_subset_loss_fixed_points_exact_vs_ratio_detached():
    """The exact gradient of sum_S p (log p - log q) is (log p - log q + 1) grad p: on one token of the
    subset its zero is at p = q / e; with the log-ratio detached it is (log p - log q) grad p, zero at p = q."""
    q = torch.tensor([[2.0, 0.0, 0.0, 0.0]])  # teacher logits
    ids = torch.tensor([0])
    pt = torch.softmax(q, -1)[0, 0]
    for detach, target in ((False, pt / math.e), (True, pt)):
        z = torch.zeros(1, 4, requires_grad=True)  # student logits
        opt = torch.optim.SGD([z], lr=2.0)
        for _ in range(3000):
            opt.zero_grad()
            subset_reverse_kl_rows(z, q, ids, detach_ratio=detach).sum().backward()
            opt.step()
        assert torch.softmax(z, -1)[0, 0].item() == pytest.approx(float(target), abs=2e-3)
    s, t = torch.randn(3, 6), torch.randn(3, 6)
    assert torch.equal(subset_reverse_kl_rows(s, t, ids, detach_ratio=True), subset_reverse_kl_rows(s, t, ids))


def test_a_direction_for_another_model_stops_before_any_file(tiny_model_dir, tmp_path):
    from selfdistill.methods.safesteer.direction import Direction
    from selfdistill.trainer import train

    Direction(1, -1, torch.randn(7), {}).save(tmp_path / "dir")
    out = tmp_path / "run"
    cfg = tiny(tiny_model_dir, out, method="safesteer", **{
        "data.tasks": ["toy-refusal:4"], "safesteer.direction": str(tmp_path / "dir"),
        "safesteer.vocabulary": "full"})
    with pytest.raises(ConfigError, match="does not match the model's hidden size"):
        train(cfg, log=lambda s: None)
    assert not out.exists()


def test_safesteer_finds_and_saves_its_direction_and_tokens(tiny_model_dir, tmp_path, monkeypatch):
    """Without files the run finds both on the initial model and saves them in its folder (a random model
    refuses nothing, so the refusal tokens are given as most of the vocabulary)."""
    from selfdistill.methods.safesteer import direction as D
    from selfdistill.trainer import train

    real = D.select_direction
    monkeypatch.setattr(D, "select_direction", lambda *a, **k: real(*a, **k, refusal_ids=list(range(400))))
    out = tmp_path / "run"
    cfg = tiny(tiny_model_dir, out, method="safesteer", **{
        "data.tasks": ["toy-refusal:4"], "onpolicy.samples_per_prompt": 2, "steps": 1,
        "safesteer.n_direction": 12, "safesteer.n_select": 4, "safesteer.max_kl": 10.0,
        "safesteer.token_prompts": 4, "safesteer.token_samples": 2, "safesteer.num_tokens": 5,
        "safesteer.vote_top": 10, "safesteer.min_prob": 0.0})
    assert train(cfg, log=lambda s: None).steps == 1
    assert (out / "safesteer" / "direction.safetensors").is_file() and (out / "safesteer" / "direction.png").is_file()
    assert len(json.loads((out / "safesteer" / "tokens.json").read_text())["ids"]) == 5
