"""SPD diagnostics: energy shares, principal angles, style tokens, and the projected policy's shift."""

from __future__ import annotations

import math

import pytest
import torch

from selfdistill.methods.spd.diagnostics import (energy_shares, principal_angles_deg, projection_shift,
                                         select_style_tokens, style_char_spans)
from selfdistill.methods.spd.subspace import KVGrads, SubspaceAccumulator


def test_energy_shares_of_a_known_spectrum():
    g = torch.Generator().manual_seed(0)
    d, N = 8, 400
    e0 = torch.zeros(d)
    e0[0] = 1.0
    grads = torch.randn(N, 1, generator=g) * e0 + 1e-3 * torch.randn(N, d, generator=g)  # all along e0
    acts = torch.randn(N, d, generator=g)  # isotropic
    acc = SubspaceAccumulator()
    acc.add(KVGrads({(0, "k"): grads}, {(0, "k"): acts}, {(0, "k"): 1}, 0.0, 1))
    sset = acc.fit(rank=1)
    (row,) = energy_shares(acc, sset)
    assert row.grad_share > 0.99 and row.random_share == 1 / 8
    assert abs(row.act_share - 1 / 8) < 0.06  # isotropic activations: no more than a random direction


def test_principal_angles():
    I = torch.eye(4)
    assert principal_angles_deg(I[:, :2], I[:, :2]) == pytest.approx([0.0, 0.0], abs=1e-6)
    assert principal_angles_deg(I[:, :2], I[:, 2:]) == pytest.approx([90.0, 90.0])
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert principal_angles_deg(I[:, :1], (c * I[:, 0] + s * I[:, 1])[:, None]) == pytest.approx([30.0])


def test_style_tokens_are_the_preamble_and_closing_lines():
    from selfdistill.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    text = "Step by step:\n47+8=55\nSo the result is 55.\n#### 55"
    assert [text[a:b] for a, b in style_char_spans(text)] == ["Step by step:", "So the result is 55."]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    sel = select_style_tokens(tok, ids, text)
    marked = tok.decode([i for i, m in zip(ids, sel) if m])
    assert marked == "Step by step:So the result is 55."
    plain = tok("47+8=55\n#### 55", add_special_tokens=False)["input_ids"]
    assert select_style_tokens(tok, plain, "47+8=55\n#### 55") == [0] * len(plain)


def test_projection_shift_is_zero_without_projection(tiny_model_dir):
    from selfdistill.arch import kv_sites
    from selfdistill.config import ModelConfig
    from selfdistill.models import load_model
    from selfdistill.methods.spd.subspace import Subspace, SubspaceSet
    from selfdistill.toy.tasks import make_item

    model, tok = load_model(ModelConfig(path=tiny_model_dir))
    subs = {s.key: Subspace(torch.eye(s.width)[:, :2], None, torch.ones(1, s.width), (2,)) for s in kv_sites(model)}
    items = [make_item("math", "valid", i) for i in range(4)]
    rows = projection_shift(model.eval(), tok, items, SubspaceSet(subs, rank=2), [1.0, 0.0], max_new_tokens=6)
    assert rows[0]["beta"] == 1.0 and abs(rows[0]["kl_proj_plain"]) < 1e-6
    assert rows[1]["kl_proj_plain"] > 0  # a hard projection moves the policy
    assert set(rows[0]) >= {"accuracy", "spaced", "preamble", "closing", "mean_len"}
