"""Issue 14, items 1-3: a run folder that is never lost, never shared, never silently wrong.

1. The end of a run is crash-safe: a real SIGKILL (or SIGTERM) at named phases of a `selfdistill train`
   process leaves a resumable or finished folder, and `--resume true` completes it to the uninterrupted result.
2. One folder, one run: a lock on OUTPUT/.lock; a folder with files but no run record is refused.
3. `--resume true` with other settings is refused, naming them, unless `--resume_force true`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfdistill.atomic import SCRATCH, atomic_file, publish_dir, write_atomic
from selfdistill.cli import main
from selfdistill.rundir import LOCK_FILE, FolderLock, live_holder
from selfdistill.trainer import train

from test_reliability import QUIET, assert_same_weights, cfg_of, flags_of, metric_rows, wait_for

REPO = Path(__file__).resolve().parents[1]
RUN = {"steps": 3, "eval_before": True, "eval_after": True}  # SSD, with both evaluations

# A `selfdistill train` process that pauses (prints PAUSED, sleeps) before or after the Nth call of one
# function named MODULE:ATTR[.ATTR] (PAUSE_AT, PAUSE_WHEN, PAUSE_CALL), and/or sleeps SLOW_STEP_S per step.
WRAPPER = r'''
import importlib, os, sys, time
target = os.environ.get("PAUSE_AT")
if target:
    when, nth = os.environ.get("PAUSE_WHEN", "before"), int(os.environ.get("PAUSE_CALL", "1"))
    module, attrs = target.split(":")
    *path, name = attrs.split(".")
    owner = importlib.import_module(module)
    for part in path:
        owner = getattr(owner, part)
    orig, calls = getattr(owner, name), [0]
    def paused(*a, **kw):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            print("PAUSED", flush=True); time.sleep(300)
        out = orig(*a, **kw)
        if calls[0] == nth and when == "after":
            print("PAUSED", flush=True); time.sleep(300)
        return out
    setattr(owner, name, paused)
slow = float(os.environ.get("SLOW_STEP_S", "0"))
if slow:
    from selfdistill.methods.selfgen import SelfGenMethod
    def make_batch(self, step, items, _orig=SelfGenMethod.make_batch):
        time.sleep(slow)
        return _orig(self, step, items)
    SelfGenMethod.make_batch = make_batch
from selfdistill.cli import main
sys.exit(main(sys.argv[1:]))
'''


def start(tmp_path: Path, args: list[str], **env) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "cli_paused.py"
    script.write_text(WRAPPER)
    log = tmp_path / f"cli-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **{k: str(v) for k, v in env.items()}}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(script), "train", *args], cwd=REPO, env=full_env,
                                stdout=fh, stderr=subprocess.STDOUT)
    return proc, log


def error_lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith("selfdistill")]


@pytest.fixture(scope="module")
def ref(tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(cfg_of(tiny_model_dir, out, **RUN), **QUIET)
    return out


# ---------------------------------------------------------------- 1. crash-safe end of a run

#: (pause point, when, call, what the folder must hold when the process dies there)
PHASES = {
    "first-evaluation": ("selfdistill.trainer:evaluate", "before", 1, "no checkpoint"),
    "method-setup": ("selfdistill.methods.base:Method.setup", "before", 1, "no checkpoint"),
    "before-final-checkpoint": ("selfdistill.trainer:save_checkpoint", "before", 1, "no checkpoint"),
    "model-written-not-published": ("selfdistill.trainer:_write_model", "after", 1, "checkpoint, no model"),
    "last-evaluation": ("selfdistill.trainer:evaluate", "before", 2, "checkpoint and model"),
}
CASES = [(p, signal.SIGKILL) for p in PHASES] + [("first-evaluation", signal.SIGTERM),
                                                 ("model-written-not-published", signal.SIGTERM)]


@pytest.mark.parametrize("phase,sig", CASES, ids=[f"{p}-{signal.Signals(s).name}" for p, s in CASES])
def test_signal_at_any_phase_leaves_a_resumable_folder(tiny_model_dir, tmp_path, ref, phase, sig):
    """Killed at each phase outside the step loop: never a `model/` without weights, never a half file, never
    a folder that can be neither resumed nor rerun; `--resume true` ends with the uninterrupted weights,
    metrics and results. SIGTERM stops cleanly there: exit 143, the run's lock and temporary files gone."""
    at, when, nth, expect = PHASES[phase]
    out = tmp_path / "run"
    proc, log = start(tmp_path, flags_of(tiny_model_dir, out, **RUN), PAUSE_AT=at, PAUSE_WHEN=when, PAUSE_CALL=nth)
    try:
        wait_for(lambda: "PAUSED" in log.read_text(), proc, log)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), log.read_text()[-3000:]

    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    model = out / "model"
    assert (out / "run_config.yaml").exists()
    assert not model.exists() or (model / "model.safetensors").exists()  # absent or complete
    assert {"no checkpoint": (ckpts, model.exists()) == ([], False),
            "checkpoint, no model": (ckpts, model.exists()) == (["step-000003"], False),
            "checkpoint and model": (ckpts, model.exists()) == (["step-000003"], True)}[expect], (ckpts, expect)
    assert not (out / "results.json").exists()
    assert live_holder(out) is None  # the kernel dropped the lock with the process
    if sig == signal.SIGTERM:
        assert f"stopped by signal {int(sig)} during the " in (out / "run.log").read_text()
        assert [p.name for p in out.iterdir() if SCRATCH.match(p.name) or p.name == LOCK_FILE] == []

    lines: list[str] = []
    res = train(cfg_of(tiny_model_dir, out, resume=True, **RUN), log=lines.append)
    assert res.stopped_by_signal is None
    assert_same_weights(ref / "model", out / "model")
    assert metric_rows(ref) == metric_rows(out)
    ja, jb = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert ja["before"] == jb["before"] and ja["after"] == jb["after"]
    assert [p.name for p in out.iterdir() if SCRATCH.match(p.name) or p.name == LOCK_FILE] == []
    if sig == signal.SIGKILL:  # its lock file stayed behind: taken over, with a note
        assert any(f"left by pid {proc.pid}, which is no longer running" in l for l in lines), lines
    if expect == "no checkpoint":
        assert any("yet: starting the run again from step 0" in l for l in lines), lines


def test_sigterm_while_loading_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Before the run's folder exists a signal stops the run at once: one line, exit 143, no folder."""
    import selfdistill.trainer as trainer

    orig = trainer.load_model

    def load_then_signal(*a, **kw):
        loaded = orig(*a, **kw)
        os.kill(os.getpid(), signal.SIGTERM)
        return loaded

    monkeypatch.setattr(trainer, "load_model", load_then_signal)
    out = tmp_path / "run"
    assert main(["train", *flags_of(tiny_model_dir, out, **RUN)]) == 128 + signal.SIGTERM
    assert error_lines(capsys.readouterr().err) == [
        "selfdistill: stopped by signal 15 during loading; nothing was written"]
    assert not out.exists()


def test_published_files_replace_whole_or_not_at_all(tmp_path):
    """A writer that fails half-way leaves the previous file or folder as it was, and no temporary sibling."""
    f = tmp_path / "results.json"
    write_atomic(f, "old\n")
    with pytest.raises(OSError):
        with atomic_file(f) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert f.read_text() == "old\n"

    folder = tmp_path / "model"
    publish_dir(folder, lambda d: (d / "weights").write_text("v1"))

    def half(d: Path) -> None:
        (d / "weights").write_text("v2, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_dir(folder, half)
    assert (folder / "weights").read_text() == "v1"
    publish_dir(folder, lambda d: (d / "weights").write_text("v2"))
    assert (folder / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "results.json"]


# ---------------------------------------------------------------- 2. one folder, one run


def test_two_runs_in_one_folder_cannot_both_proceed(tiny_model_dir, tmp_path, ref, capsys):
    """Two runs started together in one --output_dir: one runs, the other stops with one line naming the
    folder and the live run's pid (exit 2). A `--resume true` beside the live run is refused the same way,
    and the live run ends undisturbed, equal to the reference."""
    out = tmp_path / "run"
    args = flags_of(tiny_model_dir, out, **RUN)
    procs = [start(tmp_path, args, SLOW_STEP_S=0.7) for _ in range(2)]
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 180
        while not (metrics.exists() and metrics.read_text().strip()):  # the winner is in its step loop
            assert time.monotonic() < deadline and any(p.poll() is None for p, _ in procs), procs[0][1].read_text()
            time.sleep(0.05)
        holder = live_holder(out)
        assert holder in {str(p.pid) for p, _ in procs}
        capsys.readouterr()
        assert main(["train", *args, "--resume", "true"]) == 2
        assert error_lines(capsys.readouterr().err) == [
            f"selfdistill: error: output_dir {out} is in use by a live run (pid {holder}); wait for it to end, "
            "or choose another --output_dir"]
        rcs = {p.pid: p.wait(timeout=180) for p, _ in procs}
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(rcs.values()) == [0, 2] and rcs[int(holder)] == 0
    loser_log = next(l for p, l in procs if p.pid != int(holder)).read_text()
    assert error_lines(loser_log) == [
        f"selfdistill: error: output_dir {out} is in use by a live run (pid {holder}); wait for it to end, "
        "or choose another --output_dir"], loser_log[-2000:]
    assert_same_weights(ref / "model", out / "model")
    assert metric_rows(ref) == metric_rows(out)  # no interleaved rows
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_a_held_lock_refuses_new_and_resumed_runs(tiny_model_dir, tmp_path, capsys):
    """While another process holds OUTPUT/.lock, neither a new run nor a resume starts; released, both may."""
    out = tmp_path / "run"
    assert main(["train", *flags_of(tiny_model_dir, out, method="sft", steps=1)]) == 0
    lock = FolderLock.acquire(out)
    try:
        capsys.readouterr()
        for extra in (["--resume", "true"], ["--overwrite", "true"]):
            assert main(["train", *flags_of(tiny_model_dir, out, method="sft", steps=1), *extra]) == 2
            assert error_lines(capsys.readouterr().err) == [
                f"selfdistill: error: output_dir {out} is in use by a live run (pid {os.getpid()}); wait for it to "
                "end, or choose another --output_dir"]
    finally:
        lock.release()
    assert main(["train", *flags_of(tiny_model_dir, out, method="sft", steps=1), "--resume", "true"]) == 0


def test_a_folder_with_files_but_no_run_record_is_refused_untouched(tiny_model_dir, tmp_path, capsys):
    """An old run's leftovers without run_config.yaml are never pruned, replaced or resumed."""
    out = tmp_path / "old"
    (out / "checkpoints" / "step-000010").mkdir(parents=True)
    (out / "checkpoints" / "step-000010" / "trainer_state.pt").write_bytes(b"old")
    (out / "metrics.jsonl").write_text('{"step": 10}\n')
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for extra in ([], ["--resume", "true"], ["--overwrite", "true"]):
        capsys.readouterr()
        assert main(["train", *flags_of(tiny_model_dir, out, method="sft", steps=1), *extra]) == 2
        assert error_lines(capsys.readouterr().err) == [
            f"selfdistill: error: output_dir {out} holds files (checkpoints, metrics.jsonl) but no run_config.yaml: "
            "not a run this tool can resume or replace; choose another --output_dir, or empty it yourself"]
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


# ---------------------------------------------------------------- 3. resume checks what it resumes


def test_resume_with_other_settings_is_refused_unless_forced(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = lambda **over: flags_of(tiny_model_dir, out, **{"method": "sft", "save_every": 1, **over})  # noqa: E731
    assert main(["train", *flags(steps=2)]) == 0
    log_before = (out / "run.log").read_text()
    capsys.readouterr()
    assert main(["train", *flags(steps=3, **{"optim.lr": 0.002, "seed": 1}), "--resume", "true"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (f"selfdistill: error: --resume: the settings differ from the saved run's ({out}/run_config.yaml) "
                    "in --seed (saved 0, now 1), --optim.lr (saved 0.001, now 0.002); resume with the saved "
                    "settings, or pass --resume_force true to continue with these")
    assert (out / "run.log").read_text() == log_before  # refused before anything was written

    # Length, saving, evaluation cadence and logging may change.
    assert main(["train", *flags(steps=3, save_every=2, keep_checkpoints=3, **{"eval.every": 5}),
                 "--resume", "true"]) == 0
    assert "resumed from" in (out / "run.log").read_text()

    assert main(["train", *flags(steps=4, **{"optim.lr": 0.002}), "--resume", "true", "--resume_force", "true"]) == 0
    log = (out / "run.log").read_text()
    assert ("warning: --resume_force: continuing with settings that differ from the saved run's in --optim.lr "
            "(saved 0.001, now 0.002)") in log
    assert yaml.safe_load((out / "run_config.yaml").read_text())["optim"]["lr"] == 0.002  # the record follows
