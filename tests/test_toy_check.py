"""`selfdistill toy check`: every precondition row is measured and a failing model exits non-zero."""

from __future__ import annotations

from selfdistill.cli import main
from selfdistill.toy.check import CheckConfig, check, failed


def test_check_measures_every_precondition_on_a_tiny_model(tiny_model_dir, tmp_path):
    rows = check(CheckConfig(model=tiny_model_dir, n=3, samples=1, max_new_tokens=6, batch_size=16,
                             out=str(tmp_path)), log=lambda s: None)
    names = " | ".join(r.name for r in rows)
    for want in ("student view, math, in domain", "student view, mcqa, out of domain", "OPSD teacher view",
                 "SDFT reference log-prob", "CCOPD FULL - SHARDED", "SGSD matching skill hint",
                 "OPCoD peers", "refusal on forbidden requests", "over-refusal on harmless"):
        assert want in names, want
    assert failed(rows)  # a random model meets none of them
    assert (tmp_path / "check.md").read_text().startswith("| precondition |")
    opcod = next(r for r in rows if r.name.startswith("OPCoD"))
    assert opcod.ok is None and "skipped" in opcod.detail


def test_check_cli_exits_non_zero_when_a_precondition_fails(tiny_model_dir, capsys):
    rc = main(["toy", "check", "--model", tiny_model_dir, "--n", "2", "--samples", "1", "--max_new_tokens", "4"])
    assert rc == 1
    assert "preconditions fail" in capsys.readouterr().out
