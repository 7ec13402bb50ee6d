"""`selfdistill toy pretrain` is deterministic for a seed, and stops early when told."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from selfdistill.toy.pretrain import PretrainConfig, pretrain


def test_pretrain_is_deterministic_and_stops_early(tmp_path):
    cfg = PretrainConfig(steps=6, stop_step=3, batch_size=4, hidden_size=24, heads=2, kv_heads=1, layers=1,
                         train_size=20, warmup=2)
    a = load_file(str(pretrain(tmp_path / "a", cfg, log=lambda s: None) / "model.safetensors"))
    b = load_file(str(pretrain(tmp_path / "b", cfg, log=lambda s: None) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = []
    pretrain(tmp_path / "c", cfg, log=lines.append)
    assert lines[-1].startswith("step     2")  # stopped after 3 of the 6 scheduled steps
