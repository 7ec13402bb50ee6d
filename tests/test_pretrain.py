"""`selfdistill toy pretrain` is deterministic for a seed, stops early when told, and resumes exactly."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from selfdistill.toy.pretrain import PretrainConfig, pretrain

TINY = dict(steps=6, tokens_per_step=1024, hidden_size=32, heads=2, kv_heads=1, layers=1, intermediate=32,
            warmup=2, max_length=256, threads=1, save_every=0, checkpoint_every=2)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_pretrain_is_deterministic_and_stops_early(tmp_path):
    cfg = PretrainConfig(stop_step=3, **TINY)
    a = _weights(pretrain(tmp_path / "a", cfg, log=lambda s: None))
    b = _weights(pretrain(tmp_path / "b", cfg, log=lambda s: None))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines: list[str] = []
    pretrain(tmp_path / "c", cfg, log=lines.append)
    assert lines[-1].startswith("step     3")  # stopped after 3 of the 6 scheduled steps


def test_pretrain_resumes_exactly(tmp_path):
    full = _weights(pretrain(tmp_path / "full", PretrainConfig(**TINY), log=lambda s: None))
    # a run stopped at step 4 leaves a checkpoint only if it is mid-schedule: simulate a crash after step 4
    cfg = PretrainConfig(**TINY)
    import selfdistill.toy.pretrain as P

    calls = {"n": 0}
    real = P._checkpoint

    def crash_after_second(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    P._checkpoint = crash_after_second
    try:
        try:
            pretrain(tmp_path / "r", cfg, log=lambda s: None)
        except KeyboardInterrupt:
            pass
    finally:
        P._checkpoint = real
    assert (tmp_path / "r" / "checkpoint" / "state.pt").exists()
    lines: list[str] = []
    resumed = _weights(pretrain(tmp_path / "r", cfg, log=lines.append))
    assert any("resumed" in s and "step 4" in s for s in lines)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert not (tmp_path / "r" / "checkpoint").exists()
