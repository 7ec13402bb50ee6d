"""The update analysis on hand-checkable deltas, the mask files, and training restricted to a mask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from selfdistill.analysis import masks as MK
from selfdistill.analysis import metrics as M
from selfdistill.analysis.report import analyze, write
from selfdistill.analysis.weights import classify
from selfdistill.cli import main
from selfdistill.config_io import ConfigError
from selfdistill.trainer import train

import tinyrun  # tests/tinyrun.py


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def _low_rank(rows: int, cols: int, sing: list[float], seed: int = 0) -> torch.Tensor:
    u, v = _orthonormal(rows, len(sing), seed), _orthonormal(cols, len(sing), seed + 1)
    return (u * torch.tensor(sing, dtype=torch.float64)) @ v.T


def test_sparsity_of_a_known_delta():
    before = torch.ones(10, 10)  # RMS 1
    d = torch.zeros(10, 10)
    d[0, 0], d[1, 1], d[2, 2], d[3, 3] = 3.0, 1.0, 1e-3, 1e-7  # 4 nonzeros out of 100
    r = M.sparsity(d, before)
    assert r["zero_share"] == pytest.approx(0.96)
    assert r["below_1e-06"] == pytest.approx(0.97)  # 96 zeros + 1e-7
    assert r["below_0.01_rms"] == pytest.approx(0.98)  # + 1e-3
    assert r["energy"] == pytest.approx(9 + 1 + 1e-6 + 1e-14)
    assert r["energy_top_1pct"] == pytest.approx(9 / r["energy"])  # top 1 coordinate
    assert r["energy_top_5pct"] == pytest.approx(1.0)
    assert r["linf"] == pytest.approx(3.0) and r["rel_fro"] == pytest.approx(math.sqrt(r["energy"]) / 10)


def test_spectrum_of_a_known_rank():
    sing = [4.0, 2.0, 1.0]
    d = _low_rank(40, 30, sing).float()
    r = M.spectrum(d)
    e = sum(s * s for s in sing)
    assert r["svd_exact"] == 1.0 and r["sigma_1"] == pytest.approx(4.0, rel=1e-5)
    assert r["stable_rank"] == pytest.approx(e / 16, rel=1e-5)
    p = torch.tensor(sing) / sum(sing)
    assert r["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)
    assert r["rank_0.0001"] == 3.0 and r["rank_1e-06"] == 3.0
    assert r["top1_energy"] == pytest.approx(16 / e, rel=1e-5) and r["top4_energy"] == pytest.approx(1.0, rel=1e-5)
    assert r["sigma1_over_fro"] == pytest.approx(4 / math.sqrt(e), rel=1e-5)


def test_spectrum_beyond_the_exact_size_is_randomized(monkeypatch):
    monkeypatch.setattr(M, "EXACT_SVD_MAX", 10)
    monkeypatch.setattr(M, "RANDOMIZED_RANK", 8)
    r = M.spectrum(_low_rank(40, 30, [4.0, 2.0, 1.0]).float())
    assert r["svd_exact"] == 0.0 and r["sigma_1"] == pytest.approx(4.0, rel=1e-4)
    assert r["stable_rank"] == pytest.approx(21 / 16, rel=1e-4)


def test_subspace_shares_inside_and_outside_the_top_singular_vectors():
    n = 40
    u, v = _orthonormal(n, n, 3), _orthonormal(n, n, 4)
    s = torch.linspace(10, 1, n, dtype=torch.float64)
    before = (u * s) @ v.T
    k = M.subspace_ks((n, n))[1]  # 5% of 40 = 2
    inside = 0.01 * u[:, :1] @ v[:, :1].T  # along W's top singular pair
    r = M.subspace(before.float(), (before + inside).float())
    assert r["in_both_5pct"] == pytest.approx(1.0, abs=1e-4) and r["in_left_5pct"] == pytest.approx(1.0, abs=1e-4)
    assert r["angle_sin_left_5pct"] < 1e-3
    outside = 0.01 * u[:, -1:] @ v[:, -1:].T  # along W's smallest pair
    r = M.subspace(before.float(), (before + outside).float())
    assert r["in_both_5pct"] == pytest.approx(0.0, abs=1e-4) and r["in_right_20pct"] == pytest.approx(0.0, abs=1e-4)
    assert k == 2 and r["sv_drift_5pct"] < 1e-3


def test_near_zero_enrichment_when_the_update_hits_the_smallest_weights():
    g = torch.Generator().manual_seed(0)
    before = torch.randn(20, 50, generator=g)
    low = M.low_weight_set(before)
    assert int(low.sum()) == 100 and float(before.abs()[low].max()) <= float(before.abs()[~low].min())
    d = torch.where(low, torch.full_like(before, 1e-3), torch.zeros_like(before))
    r = M.near_zero(d, before)
    assert r["atol_0_density"] == pytest.approx(0.1)
    assert r["atol_0_low_overlap"] == 1.0 and r["atol_0_low_coverage"] == 1.0
    assert r["atol_0_low_enrichment"] == pytest.approx(10.0)
    assert r["atol_1e-05_density"] == pytest.approx(0.1)
    assert r["top_5pct_density"] == pytest.approx(0.05) and r["top_5pct_low_enrichment"] == pytest.approx(10.0)
    assert M.overlap(torch.ones(4, dtype=torch.bool), torch.tensor([1, 0, 0, 0]).bool())["enrichment"] == 1.0


def test_classify_names_of_several_families():
    c = classify("model.layers.3.self_attn.k_proj.weight", 2)
    assert (c.layer, c.module, c.block) == (3, "attn.k", "attention")
    c = classify("model.layers.0.mlp.down_proj.weight", 2)
    assert (c.layer, c.module, c.block) == (0, "mlp.down", "mlp")
    assert classify("model.layers.1.self_attn.q_norm.weight", 1).module == "norm"
    assert classify("model.embed_tokens.weight", 2).block == "embedding"
    assert classify("transformer.h.2.attn.c_attn.weight", 2).module == "attn.qkv"
    assert classify("transformer.h.2.mlp.c_proj.weight", 2).module == "mlp.down"
    assert classify("transformer.h.2.attn.c_proj.weight", 2).module == "attn.o"
    assert classify("transformer.h.2.ln_1.weight", 1).block == "norm"


@pytest.fixture()
def before_after(tiny_model_dir, tmp_path):
    """A tiny model and a copy whose layer-1 up_proj moved by a rank-2 delta on 3 of its rows only."""
    after = tmp_path / "after"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    w = model.model.layers[1].mlp.up_proj.weight
    delta = torch.zeros_like(w)
    delta[:3] = _low_rank(3, w.shape[1], [0.5, 0.25]).float()
    with torch.no_grad():
        w += delta
    model.save_pretrained(after)
    return tiny_model_dir, str(after), delta


def test_analyze_report_finds_the_one_changed_matrix(before_after, tmp_path):
    before, after, delta = before_after
    res = analyze(before, after, progress=False)
    rows = {r["name"]: r for r in res["params"]}
    up = rows["model.layers.1.mlp.up_proj.weight"]
    assert up["rank_1e-06"] == 2.0 and up["energy"] == pytest.approx(float(delta.pow(2).sum()), rel=1e-5)
    assert up["zero_share"] == pytest.approx(1 - 3 / delta.shape[0], abs=0.01)
    assert all(r["energy"] == 0 for n, r in rows.items() if n != up["name"])
    g = res["groups"]
    assert g["block"]["mlp"]["energy_share"] == pytest.approx(1.0) and g["layer"]["1"]["energy_share"] == 1.0
    assert g["module"]["mlp.up"]["stable_rank_e"] == pytest.approx(up["stable_rank"])
    paths = write(res, tmp_path / "rep")
    assert {p.name for p in paths} >= {"analysis.json", "report.md", "energy_by_layer.png", "spectra.png"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## By module type" in md and "mlp.up" in md and "rounding alone" in md


def test_bf16_delta_has_rounding_zeros(before_after):
    before, after, _ = before_after
    res = analyze(before, after, dtype="bf16", progress=False)
    a = res["groups"]["all"]["all"]
    assert a["zero_share_n"] >= a["zero_share_fp32_n"]


def test_masks_compare_and_files(before_after, tmp_path):
    before, after, delta = before_after
    m = MK.delta_masks(before, after)
    up = m["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(up, delta != 0) and int(sum(int(x.sum()) for x in m.values())) == int((delta != 0).sum())
    top = MK.delta_masks(before, after, top=0.5)
    assert int(top["model.layers.1.mlp.up_proj.weight"].sum()) == up.numel() // 2
    r = MK.random_like(m, seed=1)
    assert all(int(r[k].sum()) == int(m[k].sum()) for k in m)
    assert not torch.equal(r["model.layers.1.mlp.up_proj.weight"], up)
    c = MK.compare(m, m)
    assert c["all"]["jaccard"] == 1.0 and c["all"]["coverage_a_in_b"] == 1.0
    a = {"x": torch.tensor([1, 1, 0, 0]).bool()}
    b = {"x": torch.tensor([0, 1, 1, 0]).bool()}
    c = MK.compare(a, b)["all"]
    assert c["jaccard"] == pytest.approx(1 / 3) and c["coverage_a_in_b"] == 0.5
    assert c["jaccard_random"] == pytest.approx(1 / 3)  # n dA dB = 1, union 2 + 2 - 1
    MK.save(m, tmp_path / "m.safetensors", "delta", "test")
    back = MK.load(tmp_path / "m.safetensors")
    assert all(torch.equal(back[k], m[k]) for k in m)
    save_file({"x": torch.tensor([0, 2], dtype=torch.uint8)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="not a 0/1 mask"):
        MK.load(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="no such file"):
        MK.load(tmp_path / "missing.safetensors")


def test_cli_report_mask_and_compare(before_after, tmp_path, capsys):
    before, after, _ = before_after
    assert main(["analyze", before, after, "--out", str(tmp_path / "rep"), "--no_plots"]) == 0
    assert (tmp_path / "rep" / "report.md").exists()
    assert main(["analyze", "mask", before, after, "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["analyze", "mask", before, after, "--random", "0", "--out", str(tmp_path / "r.safetensors")]) == 0
    assert main(["analyze", "compare", after, str(tmp_path / "r.safetensors"), "--base", before,
                 "--out", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["all"]["density_a"] == c["all"]["density_b"]
    assert "Jaccard" in capsys.readouterr().out
    assert main(["analyze", before]) != 0  # one path: a one-line error


def _mask_cfg(model_dir: str, out: Path, mask: str, **over):
    base = {"method": "sft", "output_dir": str(out), "steps": 3, "batch_size": 4, "micro_batch_size": 2,
            "model": {"path": model_dir}, "data": {"train_size": 20, "test_size": 4},
            "eval_before": False, "eval_after": False, "optim": {"lr": 1e-2, "warmup_steps": 0, "mask": mask}}
    return tinyrun.config(base, **over)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_training_under_a_mask_changes_nothing_outside_it(tiny_model_dir, tmp_path, weight_decay, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()
             if n != "model.layers.0.mlp.up_proj.weight"}  # that one is not named: frozen
    MK.save(masks, tmp_path / "m.safetensors", "random", "test")
    seen = {}
    import selfdistill.trainer as T

    orig = T.ParamMask.after_step

    def spy(self):  # called once per optimizer step
        orig(self)
        seen["checked"] = seen.get("checked", 0) + 1

    monkeypatch.setattr(T.ParamMask, "after_step", spy)
    out = tmp_path / "run"
    train(_mask_cfg(tiny_model_dir, out, str(tmp_path / "m.safetensors"), **{"optim.weight_decay": weight_decay}),
          log=lambda s: None)
    after = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    changed_in = 0
    for n, p in model.named_parameters():
        d = after[n].detach() - p.detach()
        if n not in masks:
            assert torch.equal(d, torch.zeros_like(d)), n
            continue
        assert torch.equal(d[~masks[n]], torch.zeros_like(d[~masks[n]])), n
        changed_in += int((d[masks[n]] != 0).sum())
    assert changed_in > 0 and seen["checked"] == 3


def test_optimizer_state_outside_the_mask_stays_zero(tiny_model_dir, tmp_path):
    from selfdistill.masking import ParamMask

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()}
    MK.save(masks, tmp_path / "m.safetensors", "random", "test")
    pm = ParamMask(model, str(tmp_path / "m.safetensors"), weight_decay=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 100, (2, 8))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        pm.grads()
        opt.step()
        opt.zero_grad()
    for p, m in pm.masks:
        st = opt.state[p]
        assert torch.equal(st["exp_avg"][m == 0], torch.zeros_like(st["exp_avg"][m == 0]))
        assert torch.equal(st["exp_avg_sq"][m == 0], torch.zeros_like(st["exp_avg_sq"][m == 0]))


def test_mask_errors_are_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        train(_mask_cfg(tiny_model_dir, tmp_path / "a", str(tmp_path / "none.safetensors")), log=lambda s: None)
    MK.save({"model.layers.0.nope.weight": torch.ones(2, 2).bool()}, tmp_path / "x.safetensors", "t", "t")
    with pytest.raises(ConfigError, match="does not have"):
        train(_mask_cfg(tiny_model_dir, tmp_path / "b", str(tmp_path / "x.safetensors")), log=lambda s: None)
    MK.save({"model.embed_tokens.weight": torch.ones(2, 2).bool()}, tmp_path / "s.safetensors", "t", "t")
    with pytest.raises(ConfigError, match="shape"):
        train(_mask_cfg(tiny_model_dir, tmp_path / "c", str(tmp_path / "s.safetensors")), log=lambda s: None)
    with pytest.raises(ConfigError, match="LoRA"):
        train(_mask_cfg(tiny_model_dir, tmp_path / "d", str(tmp_path / "s.safetensors"),
                        **{"model.lora.enabled": True}), log=lambda s: None)
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_summary_tables_read_the_script_layout(before_after, tmp_path):
    from selfdistill.analysis.summary import analysis_table, overlap_table

    before, after, _ = before_after
    for s in (0, 1):
        write(analyze(before, after, progress=False), tmp_path / "analysis" / f"opsd-s{s}", plots=False)
        write(analyze(before, after, "bf16", progress=False), tmp_path / "analysis" / f"opsd-s{s}-bf16", plots=False)
    assert main(["analyze", "compare", after, after, "--base", before,
                 "--out", str(tmp_path / "analysis" / "compare-opsd-grpo-s0.json")]) == 0
    md = analysis_table(tmp_path, ["opsd", "grpo"], [0, 1])
    lines = md.splitlines()
    assert lines[2].startswith("| opsd | 2 | ") and "100.0% ± 0.0" in lines[2]  # energy: MLP
    assert lines[3].startswith("| grpo | 0 | -")
    assert "| opsd vs grpo | 1 | " in overlap_table(tmp_path, [("opsd", "grpo")], [0, 1])
