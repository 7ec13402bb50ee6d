"""Issue 15, item 1: the default output folder is never a trap; ``--overwrite`` replaces a named run.

Each run is a tiny SFT run (1 step, no evaluation) from a temporary working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfdistill.cli import main
from selfdistill.methods.sft import SFT


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _argv(model_dir: str, *extra: str) -> list[str]:
    return ["train", "--model.path", model_dir, "--method", "sft", "--steps", "1", "--batch_size", "2",
            "--data.train_size", "6", "--data.test_size", "2", "--eval_before", "false", "--eval_after", "false",
            *extra]


def _runs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "runs").iterdir() if p.name != "latest")


def test_two_default_runs_in_a_row_both_succeed(tiny_model_dir, in_tmp, monkeypatch, capsys):
    import selfdistill.rundir as rundir

    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-120000")  # both start in one second
    assert main(_argv(tiny_model_dir)) == 0
    assert main(_argv(tiny_model_dir)) == 0  # the first run's files are no trap
    first, second = _runs(in_tmp)
    assert (first, second) == ("sft-20260101-120000", "sft-20260101-120000-2")
    latest = in_tmp / "runs" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == second  # relative, at the newest run
    assert (latest / "model" / "model.safetensors").exists() and (latest / "run_config.yaml").exists()
    assert f"output_dir: runs/{second}" in (latest / "run_config.yaml").read_text()  # the real folder is recorded


def test_a_failed_default_run_does_not_block_the_next(tiny_model_dir, in_tmp, monkeypatch, capsys):
    orig = SFT.make_batch

    def crash(self, step, items):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(SFT, "make_batch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_argv(tiny_model_dir))
    monkeypatch.setattr(SFT, "make_batch", orig)
    assert main(_argv(tiny_model_dir)) == 0
    failed, done = _runs(in_tmp)
    assert not (in_tmp / "runs" / failed / "model").exists()
    assert os.readlink(in_tmp / "runs" / "latest") == done


def test_resume_without_output_dir_continues_latest(tiny_model_dir, in_tmp, capsys):
    assert main(_argv(tiny_model_dir, "--save_every", "1")) == 0
    assert main(_argv(tiny_model_dir, "--steps", "2", "--resume", "true")) == 0
    (only,) = _runs(in_tmp)  # no new folder
    assert "resumed from" in (in_tmp / "runs" / only / "run.log").read_text()


def test_overwrite_replaces_a_named_run(tiny_model_dir, in_tmp, capsys):
    assert main(_argv(tiny_model_dir, "--output_dir", "mine")) == 0
    (in_tmp / "mine" / "old-marker").write_text("from the first run")
    capsys.readouterr()
    assert main(_argv(tiny_model_dir, "--output_dir", "mine")) == 2
    assert "already holds a run; pass --resume true to continue it, --overwrite true to replace it" in (
        capsys.readouterr().err)
    assert main(_argv(tiny_model_dir, "--output_dir", "mine", "--overwrite", "true")) == 0
    assert not (in_tmp / "mine" / "old-marker").exists()
    assert (in_tmp / "mine" / "model" / "model.safetensors").exists()
    assert [p.name for p in in_tmp.iterdir() if p.name.startswith(".")] == []  # the set-aside copy is gone
    assert not (in_tmp / "runs").exists()  # a named run leaves runs/latest alone


def test_overwrite_and_resume_together_are_refused(tiny_model_dir, in_tmp, capsys):
    assert main(_argv(tiny_model_dir, "--output_dir", "mine", "--overwrite", "true", "--resume", "true")) == 2
    assert "overwrite and resume are both true" in capsys.readouterr().err
    assert not (in_tmp / "mine").exists()


def test_an_old_latest_folder_is_left_alone_with_a_note(tiny_model_dir, in_tmp, capsys):
    old = in_tmp / "runs" / "latest"
    old.mkdir(parents=True)
    (old / "run_config.yaml").write_text("method: spd\n")
    assert main(_argv(tiny_model_dir)) == 0
    assert sorted(p.name for p in old.iterdir()) == ["run_config.yaml"]
    (new,) = _runs(in_tmp)
    assert f"note: runs/latest is a folder (from an older version), left as it is; this run is in runs/{new}" in (
        capsys.readouterr().out)
