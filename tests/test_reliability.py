"""Reliability: exact resume (signals, crashes, SPD, EMA teacher), crash-safe saving under a
real SIGKILL, non-finite steps, and 2-process training equal to 1 process.

Runs that must match bitwise run in fp32 on CPU with one thread (this process:
conftest; subprocesses: OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.checkpoint import (latest_checkpoint, list_checkpoints, load_state, load_weights_into,
                                    save_checkpoint)
from selfdistill.cli import main
from selfdistill.config import TrainConfig
from selfdistill.config_io import from_dict
from selfdistill.methods.sft import SFT
from selfdistill.trainer import TrainingStopped, train

import tinyrun  # tests/tinyrun.py

REPO = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda s: None}

BASE = {
    "method": "ssd", "steps": 4, "batch_size": 4, "micro_batch_size": 2,
    "data": {"train_size": 20, "test_size": 4},
    "rollout": {"max_new_tokens": 12, "batch_size": 8},
    "eval": {"max_items": 2, "samples": 1, "max_new_tokens": 8},
    "spd": {"probe_size": 4, "probe_samples": 1, "selector": "all", "rank": 2},
    "optim": {"lr": 1e-3, "warmup_steps": 1},
    "eval_before": False, "eval_after": False,
}


def settings(model_dir: str, out: Path, **over) -> dict:
    """Nested settings (dotted overrides) of a tiny run."""
    data = json.loads(json.dumps(BASE))
    data.update({"output_dir": str(out), "model": {"path": model_dir}})
    return tinyrun.settings(data, **over)


def cfg_of(model_dir: str, out: Path, **over) -> TrainConfig:
    return from_dict(TrainConfig, settings(model_dir, out, **over))


def flags_of(model_dir: str, out: Path, **over) -> list[str]:
    """The same run as command-line flags."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"--{prefix}{k}", (",".join(map(str, v)) if isinstance(v, list) else str(v).lower()
                                         if isinstance(v, bool) else str(v))
    return [x for pair in flat(settings(model_dir, out, **over)) for x in pair]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model's weights (the adapter's for a LoRA run)."""
    adapter = folder / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


# A `selfdistill train` process with test hooks: steps slowed down (SLOW_STEP_S) so a
# signal lands mid-run, or the Nth torch.save (PAUSE_AT_SAVE) left half-written and paused.
WRAPPER = r'''
import io, os, sys, time
import torch
slow = float(os.environ.get("SLOW_STEP_S", "0"))
if slow:
    from selfdistill.methods.base import Method
    from selfdistill.methods.selfgen import SelfGenMethod
    from selfdistill.methods.sft import SFT
    for cls in (SelfGenMethod, SFT):
        def make_batch(self, step, items, _orig=cls.make_batch):
            time.sleep(slow)
            return _orig(self, step, items)
        cls.make_batch = make_batch
pause_at = int(os.environ.get("PAUSE_AT_SAVE", "0"))
if pause_at:
    _save, calls = torch.save, [0]
    def save(obj, f, *a, **kw):
        calls[0] += 1
        if calls[0] == pause_at:
            buf = io.BytesIO()
            _save(obj, buf, *a, **kw)
            data = buf.getvalue()
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            print("MID-SAVE", flush=True)
            time.sleep(300)
        return _save(obj, f, *a, **kw)
    torch.save = save
from selfdistill.cli import main
sys.exit(main(sys.argv[1:]))
'''


def start_cli(tmp_path: Path, args: list[str], **env) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "cli_with_hooks.py"
    script.write_text(WRAPPER)
    log = tmp_path / f"cli-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **{k: str(v) for k, v in env.items()}}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(script), "train", *args], cwd=REPO, env=full_env,
                                stdout=fh, stderr=subprocess.STDOUT)
    return proc, log


def wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


# ---------------------------------------------------------------- 1. resume


def test_sigterm_mid_run_then_cli_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    """A real SIGTERM to `selfdistill train`: checkpoint at the step boundary, exit 143; `--resume true` ends
    with the weights and metrics of an uninterrupted run (SSD with two sampling rounds)."""
    over = {"steps": 5, "ssd.rounds": 2}
    ref = tmp_path / "ref"
    train(cfg_of(tiny_model_dir, ref, **over), **QUIET)

    out = tmp_path / "run"
    proc, log = start_cli(tmp_path, flags_of(tiny_model_dir, out, **over), SLOW_STEP_S=0.3)
    metrics = out / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = latest_checkpoint(out / "checkpoints")
    k = load_state(ckpt)["step"]
    assert 2 <= k < 5 and ckpt.name == f"step-{k:06d}"
    assert f"stopped by signal after step {k}; continue with --resume true" in (out / "run.log").read_text()
    assert not (out / "model").exists()  # a stopped run is not a finished one

    assert main(["train", *flags_of(tiny_model_dir, out, **over), "--resume", "true"]) == 0
    assert_same_weights(ref / "model", out / "model")
    assert metric_rows(ref) == metric_rows(out)


def test_sigint_then_resume_spd_exact(tiny_model_dir, tmp_path, monkeypatch):
    """SPD (subspace, round buffer, projection sampling) stopped by SIGINT mid-round resumes exactly,
    the evaluation before training included."""
    from selfdistill.methods.spd import SPD

    over = {"method": "spd", "steps": 6, "spd.rounds": 2, "eval_before": True, "eval_after": True}
    ref = tmp_path / "ref"
    train(cfg_of(tiny_model_dir, ref, **over), **QUIET)

    out = tmp_path / "run"
    orig = SPD.after_step

    def interrupt_at_step_1(self, step):
        orig(self, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer: stop at this step's end

    monkeypatch.setattr(SPD, "after_step", interrupt_at_step_1)
    res = train(cfg_of(tiny_model_dir, out, **over), **QUIET)
    assert res.stopped_by_signal == signal.SIGINT and res.steps == 2 and res.after is None
    saved = load_state(latest_checkpoint(out / "checkpoints"))
    assert saved["step"] == 2 and saved["method"]["subspaces"] is not None and 2 in saved["method"]["buffer"]
    monkeypatch.setattr(SPD, "after_step", orig)

    res = train(cfg_of(tiny_model_dir, out, resume=True, **over), **QUIET)
    assert res.stopped_by_signal is None and res.steps == 6
    assert_same_weights(ref / "model", out / "model")
    assert metric_rows(ref) == metric_rows(out)
    for r in (0, 1):  # each round's capability subspace is the same
        a, b = (load_file(str(d / f"subspace-round{r}.safetensors")) for d in (ref, out))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    ja, jb = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert ja["before"] == jb["before"] and ja["after"] == jb["after"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_crash_then_resume_ema_teacher_exact(tiny_model_dir, tmp_path, monkeypatch, lora):
    """SDFT with an EMA teacher (full weights, or a LoRA adapter): a crash in step 3, resume from the
    step-2 checkpoint, same weights, metrics and EMA teacher as an uninterrupted run."""
    from selfdistill.methods.privileged import SDFT

    over = {"method": "sdft", "teacher.kind": "ema", "teacher.ema_rate": 0.5, "distill.kind": "reverse_kl",
            "save_every": 1, "data.tasks": ["toy-math"]}
    if lora:
        over.update({"model.lora.enabled": True, "model.lora.r": 4})
    ref = tmp_path / "ref"
    train(cfg_of(tiny_model_dir, ref, **over), **QUIET)

    out = tmp_path / "run"
    orig = SDFT.make_batch

    def crash_in_step_3(self, step, items):
        if step == 2:
            raise RuntimeError("simulated crash")
        return orig(self, step, items)

    monkeypatch.setattr(SDFT, "make_batch", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg_of(tiny_model_dir, out, **over), **QUIET)
    monkeypatch.setattr(SDFT, "make_batch", orig)
    assert load_state(latest_checkpoint(out / "checkpoints"))["step"] == 2

    train(cfg_of(tiny_model_dir, out, resume=True, **over), **QUIET)
    assert_same_weights(ref / "model", out / "model")
    assert metric_rows(ref) == metric_rows(out)
    ea = load_state(latest_checkpoint(ref / "checkpoints"))["method"]["teacher"]["ema"]
    eb = load_state(latest_checkpoint(out / "checkpoints"))["method"]["teacher"]["ema"]
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    if not lora:
        student = weights(ref / "model")
        assert not torch.equal(ea["model.norm.weight"], student["model.norm.weight"])  # a real EMA, not a copy


# ---------------------------------------------------------------- 2. crash-safe saving


def test_sigkill_mid_save_keeps_previous_checkpoint_and_resumes(tiny_model_dir, tmp_path):
    """SIGKILL while checkpoint 3's trainer state is half written: checkpoint 2 stays complete and
    loadable, the torn folder is never listed, and the run resumes from 2 to the uninterrupted result."""
    over = {"method": "sft", "steps": 4, "save_every": 1, "keep_checkpoints": 2}
    ref = tmp_path / "ref"
    train(cfg_of(tiny_model_dir, ref, **over), **QUIET)

    out = tmp_path / "run"
    proc, log = start_cli(tmp_path, flags_of(tiny_model_dir, out, **over), PAUSE_AT_SAVE=3)
    try:
        wait_for(lambda: "MID-SAVE" in log.read_text(), proc, log)
    finally:
        proc.kill()  # SIGKILL, in the middle of writing checkpoint 3
    assert proc.wait(timeout=60) == -signal.SIGKILL
    root = out / "checkpoints"
    torn = root / ".tmp-step-000003"
    assert torn.is_dir() and (torn / "trainer_state.pt").exists()  # killed inside the save
    with pytest.raises(Exception):
        torch.load(torn / "trainer_state.pt", weights_only=False)  # really torn
    assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002"]
    ckpt = latest_checkpoint(root)
    assert load_state(ckpt)["step"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_weights_into(model, ckpt)  # the previous checkpoint loads

    train(cfg_of(tiny_model_dir, out, resume=True, **over), **QUIET)
    assert not torn.exists()  # the next save cleared it
    assert [p.name for p in list_checkpoints(root)] == ["step-000003", "step-000004"]
    assert_same_weights(ref / "model", out / "model")
    assert metric_rows(ref) == metric_rows(out)


def test_resaving_a_step_never_leaves_it_missing(tiny_model_dir, tmp_path):
    """Replacing an existing checkpoint sets the old copy aside first; a kill at that moment is recovered."""
    from transformers import AutoModelForCausalLM

    from selfdistill.models import load_tokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer(tiny_model_dir)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, model, tok, {"step": 1}, keep=1)
    save_checkpoint(root, 1, model, tok, {"step": 1, "again": True}, keep=1)
    assert load_state(latest_checkpoint(root))["again"]
    # As if killed between `step-000001 -> .old-step-000001` and the rename of the new copy into place.
    os.rename(root / "step-000001", root / ".old-step-000001")
    (root / ".tmp-step-000001").mkdir()
    assert latest_checkpoint(root) == root / "step-000001" and load_state(root / "step-000001")["again"]
    # A half-deleted old checkpoint (killed while pruning) is never listed.
    save_checkpoint(root, 2, model, tok, {"step": 2}, keep=0)
    (root / ".del-step-000001").mkdir()
    assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002"]


# ---------------------------------------------------------------- 4. numerics


class _NanGrad(torch.autograd.Function):
    """0 in the forward pass, NaN gradient in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("nan"))


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_nonfinite_step_is_skipped_counted_and_logged(tiny_model_dir, tmp_path, monkeypatch, bad):
    snapshots: list[dict[str, torch.Tensor]] = []
    orig_batch, orig_loss = SFT.make_batch, SFT.loss

    def make_batch(self, step, items):
        self.step_now = step
        return orig_batch(self, step, items)

    def loss(self, micro, num_tokens):
        value, info = orig_loss(self, micro, num_tokens)
        if self.step_now == 1:
            if bad == "loss":
                value = value * float("nan")
            else:  # finite loss, NaN gradient
                value = value + _NanGrad.apply(next(self.ctx.model.parameters()))
        return value, info

    def after_step(self, step):
        snapshots.append({n: p.detach().clone() for n, p in self.ctx.model.named_parameters()})

    monkeypatch.setattr(SFT, "make_batch", make_batch)
    monkeypatch.setattr(SFT, "loss", loss)
    monkeypatch.setattr(SFT, "after_step", after_step)
    out = tmp_path / "run"
    res = train(cfg_of(tiny_model_dir, out, method="sft", steps=3), **QUIET)
    assert res.skipped_steps == 1
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert (math.isnan(rows[1]["loss"]) if bad == "loss" else math.isfinite(rows[1]["loss"]))
    assert math.isnan(rows[1]["grad_norm"])
    assert "step 1: non-finite loss or gradient, step skipped (1 in a row)" in (out / "run.log").read_text()
    same = lambda a, b: all(torch.equal(a[n], b[n]) for n in a)
    assert same(snapshots[0], snapshots[1])  # the bad step left the weights alone
    assert not same(snapshots[1], snapshots[2])  # and training went on
    assert all(torch.isfinite(p).all() for p in snapshots[2].values())


def test_too_many_bad_steps_stop_the_run_with_a_clear_message(tiny_model_dir, tmp_path, monkeypatch, capsys):
    orig = SFT.loss
    monkeypatch.setattr(SFT, "loss", lambda self, m, n: (orig(self, m, n)[0] * float("inf"), {}))
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"stopping: 2 steps in a row had a non-finite loss or gradient "
                                              r"\(last at step 2, max_bad_steps=2\)"):
        train(cfg_of(tiny_model_dir, out, method="sft", steps=5, max_bad_steps=2), **QUIET)
    capsys.readouterr()
    rc = main(["train", *flags_of(tiny_model_dir, tmp_path / "cli", method="sft", steps=5, max_bad_steps=3)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "selfdistill: error: stopping: 3 steps in a row had a non-finite loss" in err


def test_nonfinite_update_is_never_published(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Issue 14, item 5: a step whose loss and gradient are finite but whose update is not (an infinite
    learning rate, as the Python API can still set) stops the run at once; neither that step's weights nor
    a final model are saved, and the checkpoint before it stays intact and finite."""
    import selfdistill.trainer as trainer

    finite_then_inf = lambda cfg: (lambda step: 1.0 if step < 1 else float("inf"))  # noqa: E731
    monkeypatch.setattr(trainer, "_lr_lambda", finite_then_inf)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"the update of step 2 made weights non-finite although its loss "
                                              r"and gradient were finite \(optim.lr=0.001\)"):
        train(cfg_of(tiny_model_dir, out, method="sft", steps=3, save_every=1), **QUIET)
    assert not (out / "model").exists()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000001"]
    assert all(torch.isfinite(w).all() for w in weights(out / "checkpoints" / "step-000001").values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    # The same through the command line: one line, exit 1.
    capsys.readouterr()
    rc = main(["train", *flags_of(tiny_model_dir, tmp_path / "cli", method="sft", steps=3)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("selfdistill")]  # (the progress bar shares stderr)
    assert len(lines) == 1 and lines[0].startswith("selfdistill: error: stopping: the update of step 2 made "
                                                   "weights non-finite")
    assert not (tmp_path / "cli" / "model").exists()


def test_infinite_learning_rate_set_through_the_api_is_caught_by_the_update_check(tiny_model_dir, tmp_path):
    """The reported case: optim.lr=inf (the flag is refused up front; a dataclass can still be edited)."""
    cfg = cfg_of(tiny_model_dir, tmp_path / "run", method="sft", steps=2)
    cfg.optim.lr = float("inf")
    with pytest.raises(TrainingStopped, match=r"update of step 1 made weights non-finite .*optim.lr=inf"):
        train(cfg, **QUIET)
    assert not (tmp_path / "run" / "model").exists()


def test_all_masked_batch_gives_zero_loss_not_nan(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from selfdistill.scoring import next_token_loss
    from selfdistill.sequences import make_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = make_batch([[5, 6, 7], [8, 9]], [[10, 11], [12]], pad_id=0)
    batch.completion_mask_BT.zero_()
    loss, _ = next_token_loss(model, batch, num_tokens=torch.tensor(0.0))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    orig = SFT.make_batch

    def masked(self, step, items):
        b = orig(self, step, items)
        b.student.completion_mask_BT.zero_()
        return b

    monkeypatch.setattr(SFT, "make_batch", masked)
    out = tmp_path / "run"
    res = train(cfg_of(tiny_model_dir, out, method="sft", steps=1), **QUIET)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert res.skipped_steps == 0 and not row["skipped"]
    assert row["loss"] == 0.0 and row["tokens"] == 0.0 and row["grad_norm"] == 0.0


# ---------------------------------------------------------------- 6. multi-process


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_match_one(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU) on the same global batch: the same weights and metrics as
    one process, up to float rounding; only the main process writes; both processes exit cleanly."""
    over = {"method": "sft", "steps": 3, "batch_size": 4, "micro_batch_size": 1, "save_every": 2}
    ref = tmp_path / "one"
    train(cfg_of(tiny_model_dir, ref, **over), **QUIET)

    out = tmp_path / "two"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "selfdistill.cli", "train",
                           *flags_of(tiny_model_dir, out, **over)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    log = (out / "run.log").read_text()
    assert "2 process(es)" in log and log.count("method sft:") == 1 and log.count("done in") == 1
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000002", "step-000003"]
    wa, wb = weights(ref / "model"), weights(out / "model")
    for k in wa:  # Adam normalises each update, so a rounding-level gradient difference can move an
        # element with a near-zero gradient by a small fraction of lr (1e-3): 1e-5 is 1% of one step.
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    ra, rb = metric_rows(ref), metric_rows(out)
    assert len(rb) == 3
    for a, b in zip(ra, rb):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.parametrize("method", ["opsd", "spd"])
def test_two_processes_sample_what_one_samples(tiny_model_dir, tmp_path, method):
    """Issue 14 item 6: at temperature 0.8 each completion is a function of (seed, step, position in the global
    batch, sample index) alone, so 2 processes train on the same samples as 1 (an on-policy method, and SPD's
    self-generated rounds): same weights within float tolerance; the log's per-batch statistics (completion
    length, teacher-signal share) describe the global batch, not process 0's half."""
    over = {"method": method, "steps": 2, "batch_size": 4, "micro_batch_size": 2, "rollout.temperature": 0.8,
            "rollout.top_k": 0, "rollout.top_p": 1.0, "data.tasks": ["toy-math"]}
    ref = tmp_path / "one"
    train(cfg_of(tiny_model_dir, ref, **over), **QUIET)
    out = tmp_path / "two"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "selfdistill.cli", "train",
                           *flags_of(tiny_model_dir, out, **over)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wa, wb = weights(ref / "model"), weights(out / "model")
    assert any(not torch.equal(wa[k], v) for k, v in weights(Path(tiny_model_dir)).items())  # it trained
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(metric_rows(ref), metric_rows(out)):
        assert a["tokens"] == b["tokens"] and a["completion_len"] == pytest.approx(b["completion_len"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
