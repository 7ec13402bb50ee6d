"""OPCoD: the cognizance gate, feedback anchoring, teacher views, and co-training of two models end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from selfdistill.config_io import ConfigError
from selfdistill.method_configs import OPCoDConfig
from selfdistill.methods.opcod.views import Attempts, gate_open, peer_feedback, teacher_views, up_to_answer
from selfdistill.tasks.base import Item

import tinyrun  # tests/tinyrun.py

ITEM = Item("q", "Compute 47+8-5", "", "50", "math", {"kind": "math"})
GOOD = "47+8=55\n55-5=50\n#### 50\nextra chatter"


@pytest.fixture(scope="module")
def peer_dir(tmp_path_factory):
    from conftest import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("peer"), seed=1)


def tiny(model_dir, peer, out, **over):

    base = {"method": "opcod", "output_dir": str(out), "steps": 2, "batch_size": 2, "micro_batch_size": 2,
            "model": {"path": model_dir}, "opcod": {"peer": peer},
            "data": {"tasks": ["toy-math", "toy-code"], "train_size": 8, "test_size": 2},
            "onpolicy": {"samples_per_prompt": 2}, "rollout": {"max_new_tokens": 8, "batch_size": 8},
            "eval": {"max_items": 1, "samples": 0, "max_new_tokens": 4, "splits": ["test_id"]},
            "optim": {"lr": 1e-3, "warmup_steps": 1}}
    return tinyrun.config(base, **over)


def test_gate_opens_and_closes_as_specified():
    knows = Attempts([GOOD, "nope"], [1.0, 0.0], [-0.1, -3.0])
    lost = Attempts(["a", "b"], [0.0, 0.0], [-0.2, -0.3])
    unsure = Attempts([GOOD, GOOD], [1.0, 1.0], [-2.0, -1.0])
    cfg = OPCoDConfig  # verified: success > 0 and >= min_peer_success (0.5 by default)
    assert gate_open(cfg(gate="verified"), knows) and not gate_open(cfg(gate="verified"), lost)
    assert not gate_open(cfg(gate="verified", min_peer_success=0.75), knows)
    assert not gate_open(cfg(gate="verified", min_peer_success=0.0), lost)  # no verified success: closed
    # confidence: the best rollout (verified first, then most confident) vs the threshold; label-free.
    assert gate_open(cfg(gate="confidence"), knows) and gate_open(cfg(gate="confidence"), lost)
    assert not gate_open(cfg(gate="confidence"), unsure)
    assert gate_open(cfg(gate="confidence", confidence_threshold=-1.5), unsure)
    assert gate_open(cfg(gate="both"), knows) and not gate_open(cfg(gate="both"), lost)
    assert not gate_open(cfg(gate="both"), unsure)
    assert gate_open(cfg(gate="always"), lost) and not gate_open(cfg(gate="never"), knows)
    assert not gate_open(cfg(gate="always"), Attempts([], [], []))
    # relative: only when the peer is more successful on the problem than the student.
    assert gate_open(cfg(gate_relative=True), knows, student_success=0.0)
    assert not gate_open(cfg(gate_relative=True), knows, student_success=0.5)
    assert unsure.best() == 1 and knows.best() == 0


def test_feedback_is_anchored_to_the_problem():
    fb = peer_feedback(OPCoDConfig(), ITEM, Attempts([GOOD], [1.0], [0.0]))
    assert fb == "The problem's quantities: 47, 8, 5.\nA peer's worked solution:\n47+8=55\n55-5=50\n#### 50"
    assert up_to_answer("no marker") is None
    assert peer_feedback(OPCoDConfig(), ITEM, Attempts(["55 without a marker"], [1.0], [0.0])) is None
    assert peer_feedback(OPCoDConfig(), ITEM, Attempts(["#### 1"], [0.0], [0.0])) is None  # not grounded
    raw = peer_feedback(OPCoDConfig(anchor=False), ITEM, Attempts(["#### 1\nmore"], [0.0], [0.0]))
    assert raw == "A peer's worked solution:\n#### 1\nmore"


def test_teacher_views_combine_own_attempt_and_gated_feedback():
    cfg = OPCoDConfig()
    mine = Attempts(["#### 50", "#### 3", "#### 9"], [1.0, 0.0, 0.0], [0.0] * 3)
    peer_knows = Attempts([GOOD], [1.0], [0.0])
    views, stats = teacher_views(cfg, [ITEM], [mine], [peer_knows])
    v = views[0]
    assert v[0] is not None and "A correct attempt" not in v[0] and "Feedback from a peer" in v[0]
    assert "A correct attempt at this problem:\n#### 50" in v[1] and "47, 8, 5" in v[1]
    assert v[1].startswith(ITEM.prompt) and v[1].endswith("Use this to answer correctly in your own words.")
    assert stats["gate_open_frac"] == 1.0 and stats["feedback_frac"] == 1.0
    views, stats = teacher_views(cfg, [ITEM], [Attempts(["x"], [0.0], [0.0])], [Attempts(["y"], [0.0], [0.0])])
    assert views == [[None]] and stats["gate_open_frac"] == 0.0
    views, _ = teacher_views(OPCoDConfig(own_attempt="none", gate="never"), [ITEM], [mine], [peer_knows])
    assert views == [[None, None, None]]


def test_opcod_trains_both_models(tiny_model_dir, peer_dir, tmp_path, monkeypatch):
    """Two steps end to end: both models' weights change; peer saved, evaluated, checkpointed."""
    import selfdistill.tasks.verify as V
    from selfdistill.trainer import train

    monkeypatch.setattr(V, "verify_item", lambda item, text: True)  # a random model is never right
    out = tmp_path / "co"
    res = train(tiny(tiny_model_dir, peer_dir, out, **{"opcod.gate": "always", "opcod.anchor": False,
                                                      "save_every": 2}), log=lambda s: None)
    assert res.steps == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_student"] > 0 and r["loss_peer"] > 0 and r["feedback_frac"] == 1.0 for r in rows)
    assert all(abs(r["loss"] - r["loss_student"] - r["loss_peer"]) < 1e-5 for r in rows)

    def changed(a, b):
        ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
        with torch.no_grad():
            return sum(float((p - q).abs().sum()) for p, q in zip(ma.parameters(), mb.parameters()))

    assert changed(out / "model", tiny_model_dir) > 0
    assert changed(out / "peer_model", peer_dir) > 0
    peer_res = json.loads((out / "peer_results.json").read_text())
    assert peer_res["before"] and peer_res["after"] and peer_res["updated"]
    state = torch.load(next((out / "checkpoints").glob("step-*")) / "trainer_state.pt", weights_only=False)
    assert state["trainees"]["peer"]["optimizer"]["state"]  # the peer's AdamW moments are checkpointed


def test_confidence_gate_and_one_way_setup(tiny_model_dir, peer_dir, tmp_path):
    from accelerate import Accelerator

    from selfdistill.methods.base import Context
    from selfdistill.methods.opcod import OPCoD
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import ItemStream, build_tasks

    cfg = tiny(tiny_model_dir, peer_dir, tmp_path, **{"opcod.gate": "confidence", "opcod.update_peer": False})
    model, tok = load_model(cfg.model)
    tasks = build_tasks(cfg.data)
    ctx = Context(cfg, model, tok, tasks, Accelerator(cpu=True), tmp_path, lambda s: None, None,
                  ItemStream(tasks, 2, 0))
    m = OPCoD(ctx)
    assert m.trainees() == [] and not any(p.requires_grad for p in m.peer.ctx.model.parameters())
    batch = m.make_batch(0, ctx.items_for_step(0))
    assert batch.others == {} and len(batch) == 4
    ro, groups = m.rollout(ctx.items_for_step(0))
    ro = type(ro)(ro.prompt_ids, [c[:2] + tok("#### 7", add_special_tokens=False)["input_ids"] for c in ro.completion_ids],
                  [t[:2] + "#### 7" for t in tok.batch_decode([c[:2] for c in ro.completion_ids])], ro.finished)
    att = m.attempts(ro, groups)
    conf = [c for a in att for c in a.confidences]
    assert all(c < 0 and math.isfinite(c) for c in conf)  # mean log-prob of the answer tokens "7"
    from selfdistill.trainer import train

    for peer, msg in (("", "needs the second model"), (str(tmp_path / "nope"), "opcod.peer")):
        with pytest.raises(ConfigError, match=msg):  # rejected before anything is written
            train(tiny(tiny_model_dir, peer, tmp_path / "rejected"), log=lambda s: None)
        assert not (tmp_path / "rejected").exists()


def test_pareto_verdict():
    from selfdistill.methods.opcod.table import pareto

    def row(math, code):
        return {"cells": {"toy-math/test_id": {"greedy": {"mean": math}}, "toy-code/test_id": {"greedy": {"mean": code}}}}

    table = {"base/A": row(50, 10), "base/B": row(10, 50), "up/A": row(55, 10), "up/B": row(12, 50),
             "trade/A": row(60, 5), "trade/B": row(20, 60)}
    assert pareto(table, "up", ["math", "code"]) == "yes"
    assert pareto(table, "trade", ["math", "code"]) == "no"  # A lost on code
    assert pareto(table, "base", ["math", "code"]) == "-"


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_peer_is_stepped_by_the_trainer_and_resumes_exactly(tiny_model_dir, peer_dir, tmp_path, monkeypatch):
    """Issue 13 item 2: the peer is one of the trainer's trained models, so a crash in step 3 and a resume
    from the step-2 checkpoint give the same A, the same B and the same metrics as an uninterrupted run."""
    import selfdistill.tasks.verify as V
    from selfdistill.checkpoint import latest_checkpoint, load_state
    from selfdistill.methods.opcod import OPCoD
    from selfdistill.trainer import train

    monkeypatch.setattr(V, "verify_item", lambda item, text: True)
    over = {"opcod.gate": "always", "steps": 3, "save_every": 1, "eval_before": False, "eval_after": False}
    ref = tmp_path / "ref"
    train(tiny(tiny_model_dir, peer_dir, ref, **over), log=lambda s: None)
    orig = OPCoD.make_batch

    def crash_in_step_3(self, step, items):
        if step == 2:
            raise RuntimeError("simulated crash")
        return orig(self, step, items)

    out = tmp_path / "run"
    monkeypatch.setattr(OPCoD, "make_batch", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(tiny_model_dir, peer_dir, out, **over), log=lambda s: None)
    monkeypatch.setattr(OPCoD, "make_batch", orig)
    assert load_state(latest_checkpoint(out / "checkpoints"))["step"] == 2
    train(tiny(tiny_model_dir, peer_dir, out, resume=True, **over), log=lambda s: None)
    for name in ("model", "peer_model"):
        a, b = _weights(ref / name), _weights(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if not k.startswith("time_")}  # noqa: E731
                       for l in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(ref) == strip(out)
    assert all(r["grad_norm_peer"] > 0 and r["skipped_peer"] is False for r in strip(ref))


def test_a_non_finite_peer_step_is_skipped_and_counts_towards_max_bad_steps(tiny_model_dir, peer_dir, tmp_path,
                                                                           monkeypatch):
    import selfdistill.tasks.verify as V
    from selfdistill.methods.opcod import _Student
    from selfdistill.trainer import TrainingStopped, train

    monkeypatch.setattr(V, "verify_item", lambda item, text: True)
    orig = _Student.loss

    def nan_for_the_peer(self, micro, num_tokens):
        loss, info = orig(self, micro, num_tokens)
        return (loss * float("nan") if type(self) is _Student else loss), info  # the peer is a plain _Student

    monkeypatch.setattr(_Student, "loss", nan_for_the_peer)
    out = tmp_path / "nan"
    with pytest.raises(TrainingStopped, match="2 steps in a row had a non-finite loss or gradient"):
        train(tiny(tiny_model_dir, peer_dir, out, steps=4, max_bad_steps=2, **{"opcod.gate": "always"}),
              log=lambda s: None)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_peer"] for r in rows] == [True, True] and all(r["skipped"] for r in rows)
    assert all(math.isfinite(r["loss_student"]) for r in rows)
    assert "non-finite loss or gradient (peer), step skipped" in (out / "run.log").read_text()


def test_opcod_table_runs_through_the_one_table_runner(tiny_model_dir, peer_dir, tmp_path, monkeypatch):
    """Rows of several runs, a run that trains two models, base rows of two models: keys ROW/A and ROW/B,
    each compared with base/A or base/B on the same items; finished runs reused."""
    import shutil

    import selfdistill.tasks.verify as V
    from selfdistill.methods.opcod.table import OPCoDTableConfig, run_opcod_table

    monkeypatch.setattr(V, "verify_item", lambda item, text: True)
    for d, src in (("math", tiny_model_dir), ("code", peer_dir)):
        shutil.copytree(src, tmp_path / "peers" / d / "model")
    common = ["steps=1", "batch_size=2", "micro_batch_size=2", "data.train_size=4", "data.test_size=2",
              "rollout.max_new_tokens=4", "eval.max_items=1", "eval.max_new_tokens=4", "eval.samples=0",
              "eval.splits=test_id", "onpolicy.samples_per_prompt=2", "opcod.gate=always"]
    tc = OPCoDTableConfig(peers=str(tmp_path / "peers"), rows=["base", "opcod", "sft"], seeds=[0],
                          out=str(tmp_path / "t"), common=common)
    text = run_opcod_table(tc, log=lambda s: None).read_text()
    assert "| opcod | A |" in text and "| opcod | B |" in text and "| sft | B |" in text
    table = json.loads((tmp_path / "t" / "results.json").read_text())["table"]
    assert set(table) == {"base/A", "base/B", "opcod/A", "opcod/B", "sft/A", "sft/B"}
    assert table["opcod/B"]["baseline"] == "base/B" and table["sft/A"]["baseline"] == "base/A"
    assert (tmp_path / "t" / "runs" / "opcod-s0" / "peer_model" / "config.json").exists()
    stamp = (tmp_path / "t" / "runs" / "sft-b-s0" / "results.json").stat().st_mtime
    run_opcod_table(tc, log=lambda s: None)
    assert (tmp_path / "t" / "runs" / "sft-b-s0" / "results.json").stat().st_mtime == stamp
