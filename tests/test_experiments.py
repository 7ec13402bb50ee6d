"""The results-table runner: rows x seeds -> mean +- std table, reusing finished runs."""

from __future__ import annotations

import json

import pytest

from selfdistill.experiments import TableConfig, run_table


def test_table_runs_rows_and_seeds_and_reuses_them(tiny_model_dir, tmp_path):
    common = [f"model.path={tiny_model_dir}", "steps=1", "batch_size=2", "micro_batch_size=2",
              "data.train_size=8", "data.test_size=2", "rollout.max_new_tokens=6", "eval.max_items=2",
              "eval.max_new_tokens=6", "eval.samples=1", "spd.probe_size=2", "spd.probe_samples=1",
              "spd.selector=all"]
    tc = TableConfig(preset="spd", rows=["base", "ssd", "spd-random"], seeds=[0, 1], out=str(tmp_path), common=common,
                     check=False)
    md = run_table(tc, log=lambda s: None)
    text = md.read_text()
    assert "| base |" in text and "| ssd |" in text and "| spd-random |" in text
    assert "sample std, ddof=1" in text and "paired difference with the baseline" in text
    assert "| ssd | base |" in text  # ssd is compared with base on the same items, per seed
    data = json.loads((tmp_path / "results.json").read_text())
    cell = data["table"]["ssd"]["cells"]["toy-math/test_id"]["greedy"]
    assert cell["n"] == 2 and 0 <= cell["mean"] <= 100
    paired = data["table"]["ssd"]["paired"]["all/test_id"]["greedy"]
    assert paired["seeds"] == 2 and paired["items"] == 6 and paired["lo"] <= paired["diff"] <= paired["hi"]
    stamp = (tmp_path / "runs" / "ssd-s0" / "results.json").stat().st_mtime
    run_table(tc, log=lambda s: None)  # finished runs are reused, not rerun
    assert (tmp_path / "runs" / "ssd-s0" / "results.json").stat().st_mtime == stamp


def test_reused_run_notes_changed_and_newer_settings(tmp_path):
    """A reused run whose saved settings differ says which keys; keys it predates are named apart."""
    import yaml

    from selfdistill.config import TrainConfig
    from selfdistill.config_io import to_dict
    from selfdistill.experiments import note_if_changed

    saved = to_dict(TrainConfig())
    saved["optim"]["lr"] = 1.0
    del saved["spd"]["fold"]
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump(saved))
    lines: list[str] = []
    note_if_changed("row", 0, tmp_path, TrainConfig(output_dir="elsewhere"), lines.append)
    assert lines == ["note: reusing row seed 0; its saved settings differ in optim.lr",
                     "note: reusing row seed 0; it predates the settings spd.fold (defaults assumed)"]


def test_preconditions_run_once_per_folder_and_lead_the_table(tmp_path, monkeypatch):
    import selfdistill.toy.check as chk
    from selfdistill.experiments import preconditions

    calls = []

    def fake(cfg, log=print):
        calls.append(cfg.model)
        (tmp_path / "check.md").write_text("| precondition | value |\n|---|---|\n| x | 1 |\n")
        (tmp_path / "check_model.json").write_text(json.dumps(chk.world_stamp(cfg.model), indent=2))
        return [chk.Row("x", 1.0, ">= 0", True)]

    monkeypatch.setattr(chk, "check", fake)
    a = preconditions("toy", tmp_path, lambda s: None)
    b = preconditions("toy", tmp_path, lambda s: None)
    assert a == b and a.startswith("**Preconditions** (`selfdistill toy check --model toy`)") and calls == ["toy"]
    preconditions("other", tmp_path, lambda s: None)
    assert calls == ["toy", "other"]


def test_a_table_folder_made_on_another_model_is_refused(tiny_model_dir, tmp_path):
    """Finished rows are reused by folder name: a retrained model (same path, new weights) must not inherit them."""
    import shutil

    from selfdistill.config_io import ConfigError
    from selfdistill.experiments import check_world

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    check_world(tmp_path / "t", str(model))
    check_world(tmp_path / "t", str(model))  # same weights: fine
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="another world or model"):
        check_world(tmp_path / "t", str(model))


def test_paired_bootstrap_by_hand():
    from selfdistill.stats import paired_bootstrap, sample_std

    assert sample_std([1.0, 3.0]) == 2 ** 0.5 and sample_std([5.0]) == 0.0
    same = paired_bootstrap([[1, 0, 1, 0]], [[1, 0, 1, 0]])
    assert (same.diff, same.lo, same.hi) == (0.0, 0.0, 0.0) and not same.resolved
    up = paired_bootstrap([[1, 1, 1, 1], [1, 1, 1, 1]], [[0, 0, 0, 0], [0, 0, 0, 0]])
    assert (up.diff, up.lo, up.hi) == (100.0, 100.0, 100.0) and up.resolved
    mixed = paired_bootstrap([[1, 1, 0, 0] * 50], [[1, 0, 0, 0] * 50])
    assert mixed.diff == 25.0 and 15 < mixed.lo < 25 < mixed.hi < 35


def test_an_unfinished_table_run_is_replaced_not_refused(tiny_model_dir, tmp_path):
    """A run folder left without results.json (a killed table) is rerun in place by the next table."""
    common = [f"model.path={tiny_model_dir}", "steps=1", "batch_size=2", "micro_batch_size=2",
              "data.train_size=8", "data.test_size=2", "rollout.max_new_tokens=4", "eval.max_items=2",
              "eval.max_new_tokens=4", "eval.samples=0"]
    tc = TableConfig(preset="privileged", rows=["sft"], seeds=[0], out=str(tmp_path), common=common, check=False)
    run = tmp_path / "runs" / "sft-s0"
    run.mkdir(parents=True)
    (run / "run_config.yaml").write_text("method: sft\n")
    (run / "metrics.jsonl").write_text("")
    run_table(tc, log=lambda s: None)
    assert (run / "results.json").exists()
