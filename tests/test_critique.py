"""Step-aligned critique: the exact critic on the toy world, the three teacher contexts, the advantage analysis."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import torch

from selfdistill.methods.critique.critic import exact_critique
from selfdistill.tasks.base import Item

# v1-format toy items written out (the critic reads any toy trace; these pin its line-by-line behaviour).
V1 = {
    "math": Item("toy-math-train-0-0", "Compute 51+2-13", "51+2=53\n53-13=40\n#### 40", "40", "math", {"kind": "math"}),
    "code": Item("toy-code-test_ood-0-1", "What does this print?\nd = 2\nz = d + 7\nb = d - 7\nx = b - 5\nc = x * 3\n"
                 "if z > 1:\n    z = z - 7\nprint(c)",
                 "d = 2\nz = 2 + 7 = 9\nb = 2 - 7 = -5\nx = -5 - 5 = -10\nc = -10 * 3 = -30\n9 > 1: z = 9 - 7 = 2\n#### -30",
                 "-30", "code", {"kind": "code_output", "program": "d = 2\nz = d + 7\nb = d - 7\nx = b - 5\nc = x * 3\n"
                                                                    "if z > 1:\n    z = z - 7\nprint(c)"}),
    "mcqa": Item("toy-mcqa-train-0-1", "Which option equals 8+10?\nA) 24\nB) 12\nC) 16\nD) 18", "8+10=18\n#### D", "D",
                 "mcqa", {"kind": "mcqa", "letters": "ABCD"}),
}


def make_item(domain: str, split: str, index: int) -> Item:  # noqa: ARG001 - the pinned v1 items above
    return V1[domain]
from test_grpo import tiny


def _math_item():
    it = make_item("math", "train", 0)  # Compute 51+2-13: 51+2=53, 53-13=40
    assert it.prompt == "Compute 51+2-13" and it.answer == "40"
    return it


def test_one_wrong_step_gets_exactly_that_line_corrected():
    it = _math_item()
    trace = "51+2=54\n53-13=40\n#### 40"
    for chain in (True, False):
        crit = exact_critique(it, trace, chain=chain)
        fixed = crit.corrected_trace().split("\n")
        orig = trace.split("\n")
        assert [i for i, (a, b) in enumerate(zip(orig, fixed)) if a != b] == [0]
        assert fixed[0] == "51+2=53" and len(fixed) == len(orig)
        assert [c.ok for c in crit.checks] == [False, True, True]
        assert crit.checks[0].span == (0, 7)
    rendered = exact_critique(it, trace).render().split("\n")
    assert rendered[1:] == orig[1:]  # correct lines verbatim
    assert rendered[0].startswith("51+2=53") and "51+2=54" in rendered[0]


def test_carried_error_chain_vs_local():
    it = _math_item()
    trace = "51+2=54\n54-13=41\n#### 41"  # the second step is right for its own numbers
    chain = exact_critique(it, trace, chain=True)
    assert chain.corrected_trace() == "51+2=53\n53-13=40\n#### 40"
    local = exact_critique(it, trace, chain=False)
    assert [c.ok for c in local.checks] == [False, True, False]  # the final answer is still wrong
    assert local.corrected_trace() == "51+2=53\n54-13=41\n#### 40"


def test_correct_missing_and_extra_lines():
    it = _math_item()
    ok = exact_critique(it, it.solution)
    assert not ok.wrong and ok.render() == it.solution and ok.corrected_trace() == it.solution
    short = exact_critique(it, "51+2=53")
    assert short.corrected_trace() == it.solution
    assert [(c.original, c.ok) for c in short.checks] == [("51+2=53", True), (None, False), (None, False)]
    extra = exact_critique(it, "51+2=53\n53-13=40\n40+0=40\n#### 40")
    assert extra.corrected_trace() == it.solution and "not needed" in extra.render()


def test_code_and_mcqa_critics_recompute():
    it = make_item("code", "test_ood", 1)  # d = 2 / z = d + 7 / b = d - 7 / x = b - 5 / c = x * 3 / if z > 1 ...
    lines = it.solution.split("\n")
    bad = list(lines)
    bad[4] = "c = -10 * 3 = -20"
    crit = exact_critique(it, "\n".join(bad), chain=False)
    assert crit.corrected_trace() == it.solution  # the wrong line recomputed, the answer line was right
    assert [i for i, c in enumerate(crit.checks) if not c.ok] == [4]
    q = make_item("mcqa", "train", 1)
    assert not exact_critique(q, q.solution).wrong
    assert exact_critique(q, "#### Z").checks[-1].ok is False


def test_token_labels_mark_the_wrong_line(tiny_model_dir):
    from transformers import AutoTokenizer

    from selfdistill.methods.critique.analyze import token_labels

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    it = _math_item()
    text = "51+2=54\n53-13=40\n#### 40"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = token_labels(tok, ids, text, exact_critique(it, text))
    assert labels[:7] == ["wrong_step"] * 7 and labels[7] == "other"
    assert labels[8:16] == ["correct_step"] * 8 and labels[17:24] == ["correct_answer"] * 7
    assert labels[-1] == "other"


def _method(tiny_model_dir, tmp_path, **over):
    from selfdistill.config import ModelConfig
    from selfdistill.methods.base import Context
    from selfdistill.methods.critique import Critique
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import ItemStream, build_tasks

    cfg = tiny(tiny_model_dir, tmp_path / "c", method="critique", **over)
    model, tok = load_model(ModelConfig(path=tiny_model_dir))
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"), is_main_process=True)
    tasks = build_tasks(cfg.data)
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, tasks=tasks, accelerator=acc, out_dir=tmp_path,
                  log=lambda s: None, stream=ItemStream(tasks, 2, 0))
    return Critique(ctx)


def test_three_teacher_contexts(tiny_model_dir, tmp_path):
    from selfdistill.methods.onpolicy import Group

    it = _math_item()
    g = [Group(it, ["51+2=54\n53-13=40\n#### 40", it.solution], [0.0, 1.0])]
    reward = _method(tiny_model_dir, tmp_path, **{"critique.feedback": "reward"}).teacher_prompts(g)[0]
    assert "was incorrect" in reward[0] and "was correct" in reward[1] and "51+2=54" in reward[0]
    ref = _method(tiny_model_dir, tmp_path, **{"critique.feedback": "reference"}).teacher_prompts(g)[0]
    assert all(it.solution in r for r in ref)
    m = _method(tiny_model_dir, tmp_path, **{"critique.feedback": "step"})
    step = m.teacher_prompts(g)[0]
    assert "51+2=53   <- corrected (you wrote: 51+2=54)" in step[0] and "<- corrected" not in step[1]
    assert m._stats["critique_wrong_steps"] == 0.5


def test_model_critic_plumbing(tiny_model_dir, tmp_path):
    """The prompt path (any data): the frozen initial model writes the critique (tiny model: plumbing only)."""
    m = _method(tiny_model_dir, tmp_path, **{"critique.critic": "model", "critique.critic_max_new_tokens": 6})
    assert m._critic_model is not None and m._critic_model.model is m.teacher.copy
    it = _math_item()
    prompt = m._critic_model.prompt(it, "51+2=54")
    assert it.prompt in prompt and "51+2=54" in prompt and "Correct final answer: 40" in prompt
    texts = m.critiques([it, it], ["51+2=54", it.solution])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_critique_trains(tiny_model_dir, tmp_path):
    from selfdistill.trainer import train

    out = tmp_path / "crit"
    cfg = tiny(tiny_model_dir, out, method="critique", **{"critique.feedback": "step",
                                                          "data.tasks": ["toy-math", "toy-code"]})
    assert train(cfg, log=lambda s: None).steps == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["loss"] != 0 for r in rows)
    assert all(r["critique_wrong_steps"] > 0 for r in rows)  # a random model's traces are all wrong


def test_analyze_writes_table_and_plot(tiny_model_dir, tmp_path):
    from selfdistill.config_io import from_dict
    from selfdistill.methods.critique.analyze import CONTEXTS, LABELS, AnalyzeConfig, analyze

    cfg = from_dict(AnalyzeConfig, {"model": {"path": tiny_model_dir}, "out": str(tmp_path / "an"), "items": 2,
                                    "samples": 1, "rollout": {"max_new_tokens": 8}})
    path = analyze(cfg, log=lambda s: None)
    res = json.loads(path.read_text())
    assert set(res["advantage"]) == set(CONTEXTS)
    assert all(set(v) == set(LABELS) for v in res["advantage"].values())
    n = sum(v["n"] for v in res["advantage"]["step"].values())
    assert n > 0 and (tmp_path / "an" / "advantage.png").stat().st_size > 0
