"""The results-table runner: rows x seeds -> mean +- std table, reusing finished runs."""

from __future__ import annotations

import json

from selfdistill.experiments import TableConfig, run_table


def test_table_runs_rows_and_seeds_and_reuses_them(tiny_model_dir, tmp_path):
    common = [f"model.path={tiny_model_dir}", "steps=1", "batch_size=2", "micro_batch_size=2",
              "data.train_size=8", "data.test_size=2", "rollout.max_new_tokens=6", "eval.max_items=2",
              "eval.max_new_tokens=6", "eval.samples=1", "spd.probe_size=2", "spd.probe_samples=1",
              "spd.selector=all"]
    tc = TableConfig(preset="spd", rows=["base", "ssd", "spd-random"], seeds=[0, 1], out=str(tmp_path), common=common)
    md = run_table(tc, log=lambda s: None)
    text = md.read_text()
    assert "| base |" in text and "| ssd |" in text and "| spd-random |" in text
    data = json.loads((tmp_path / "results.json").read_text())
    cell = data["table"]["ssd"]["cells"]["toy-math/test_id"]["greedy"]
    assert cell["n"] == 2 and 0 <= cell["mean"] <= 100
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
