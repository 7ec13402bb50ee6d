"""SGSD: the gated loss pinned to a hand computation; skill bank build, merge, retrieval; 2 steps end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selfdistill.objectives import gated_token_loss, teacher_support
from selfdistill.methods.sgsd.retrieval import TfidfSimilarity, tfidf_cosine
from selfdistill.methods.sgsd.skills import Candidate, RuleExtractor, SkillBank, Trajectory, retrieve, teacher_pool
from selfdistill.tasks.base import Item
from selfdistill.toy.tasks import make_item
from test_grpo import tiny


def _ell(d: float, tau: float = 1.0) -> float:
    """log 2 - softplus(-d^2 / 2 tau), written out."""
    return math.log(2) - math.log(1 + math.exp(-d * d / (2 * tau)))


def test_gated_loss_by_hand():
    s = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -0.4], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]],
                     requires_grad=True)
    t = torch.tensor([[-0.5, -1.0, -9.0], [-1.2, -0.3, -0.43], [-0.96, -1.0, -1.0], [-0.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    w = torch.tensor([0.7, 0.3, 1.0, 0.5])
    # Row 0: deltas 0.5, 1.0 (third masked) -> support 0.75 > 0.05: +1; reward 1: outcome +1 -> polarity +1.
    # Row 1: deltas -1, 0, -0.03 -> support -0.3433: -1; reward 0: outcome -1 -> polarity +1.
    # Row 2: deltas 0.04, 0, 0 -> support 0.0133 in the dead zone -> polarity 0.
    # Row 3: deltas 0.5, 0, 0 -> support 0.1667: +1; reward 0: outcome -1 -> polarity -1.
    rows = [0.7 * (_ell(0.5) + _ell(1.0)) / 2, 0.3 * (_ell(-1.0) + _ell(0.0) + _ell(-0.03)) / 3, 0.0,
            -0.5 * (_ell(0.5) + 0 + 0) / 3]
    got = gated_token_loss(s, t, mask, rewards, w, reduction="none")
    torch.testing.assert_close(got, torch.tensor(rows), atol=1e-6, rtol=0)
    loss = gated_token_loss(s, t, mask, rewards, w, num_items_in_batch=2)  # e.g. 2 rollouts, 2 teachers each
    assert loss.item() == pytest.approx(sum(rows) / 2, abs=1e-6)
    loss.backward()
    # d l / d log p_S = -sigmoid(-d^2 / 2) * d  (d = log p_T - log p_S), times w * polarity / n_tokens / 2.
    g = lambda d: -d / (1 + math.exp(d * d / 2))  # noqa: E731
    want = torch.tensor([[0.7 * g(0.5) / 2, 0.7 * g(1.0) / 2, 0.0],
                         [0.3 * g(-1.0) / 3, 0.0, 0.3 * g(-0.03) / 3],
                         [0.0, 0.0, 0.0],
                         [-0.5 * g(0.5) / 3, 0.0, 0.0]]) / 2
    torch.testing.assert_close(s.grad, want, atol=1e-6, rtol=0)
    # Mean over distinct rollouts when no global count is given.
    by_group = gated_token_loss(s, t, mask, rewards, w, groups_R=torch.tensor([0, 0, 1, 1]))
    assert by_group.item() == pytest.approx(sum(rows) / 2, abs=1e-6)


def test_support_is_clipped_and_bounded_loss_saturates():
    support, sign = teacher_support(torch.tensor([[10.0, -1.0]]), torch.tensor([[1, 1]]))
    assert support.item() == pytest.approx((3.0 - 1.0) / 2) and sign.item() == 1.0
    big = gated_token_loss(torch.tensor([[-50.0]]), torch.tensor([[0.0]]), None, torch.tensor([1.0]))
    assert big.item() == pytest.approx(math.log(2), abs=1e-6)


def test_tfidf_by_hand():
    # idf(a) = log(3/2) + 1, idf(b) = log(3/3) + 1 = 1; query "a" against doc "a b".
    wa = math.log(1.5) + 1
    sims = tfidf_cosine(["a", "zzz"], ["a b", "b c"])
    assert sims[0][0] == pytest.approx(wa / math.sqrt(wa * wa + 1))
    assert sims[0][1] == 0.0 and sims[1] == [0.0, 0.0]


def _item(prompt: str, answer: str) -> Item:
    return Item(id="toy-math-test", prompt=prompt, solution="", answer=answer, domain="math", meta={"kind": "math"})


def test_rule_extractor_on_toy_math():
    it = _item("Compute 12+49-5", "56")
    # "wrote 63 for 12+49" (carried twice): a carry mistake, then a wrong final answer.
    bad = RuleExtractor(3).one(Trajectory(it, "12+49=63\n63-5=58\n#### 58", False))
    assert [c.kind for c in bad] == ["mistake"] and "carry" in bad[0].text
    assert "add_carry" in bad[0].keys
    good = RuleExtractor(3).one(Trajectory(it, "12+49=61\n61-5=56\n#### 56", True))
    assert len(good) == 3 and all(c.kind == "skill" for c in good)
    assert "carry" in good[0].text  # the specific feature of 12+49 comes first
    lost = RuleExtractor(3).one(Trajectory(it, "12+49=61", False))
    assert any("every operation" in c.text for c in lost) and any("####" in c.text for c in lost)


def test_guidance_in_the_toy_worlds_closed_vocabulary():
    it = _item("Compute 12+49-5", "56")
    skill = RuleExtractor(3).one(Trajectory(it, "12+49=61\n61-5=56\n#### 56", True))[0]
    mistake = RuleExtractor(3).one(Trajectory(it, "12+49=63\n63-5=58\n#### 58", False))[0]
    from selfdistill.methods.sgsd.skills import Entry, TeacherSpec

    spec = TeacherSpec(Entry(skill.text, "skill", "math", skill.keys), Entry(mistake.text, "mistake", "math",
                                                                              mistake.keys), 1.0, 1.0)
    assert spec.guidance("tags") == "skill: carry"  # both are about the carry: one line
    assert "Useful skill:" in spec.guidance() and "carry" in spec.guidance()
    assert TeacherSpec(Entry("Write one step per line.", "skill", "math", ["math", "steps"]), None, 1.0,
                       1.0).guidance("tags") == ""


def test_bank_merge_dedup_capacity_and_json(tmp_path):
    bank = SkillBank()
    c = lambda text, kind="skill": Candidate(text, kind, "math", ["math"])  # noqa: E731
    added = bank.add([c("Carry the one when digits sum past nine."), c("carry the one when digits sum past nine"),
                      c("Carry the one when the digits sum past nine."), c("Subtract the ones digit first."),
                      c("Check the answer line.", "mistake")], threshold=0.8, capacity=30)
    assert len(bank.skills) == 2 and bank.skills[0].count == 3 and len(added) == 3
    # A new entry below the threshold is added; max_new and capacity bound the bank.
    bank.add([c("Read every option before answering."), c("Write one step per line.")], threshold=0.8,
             capacity=3, max_new=1)
    assert len(bank.skills) == 3 and bank.skills[0].count == 3
    # Full: an online update's new entry displaces an older one of the same (lowest) frequency.
    new = bank.add([c("Always write the answer marker last.")], threshold=0.8, capacity=3, step=25)
    assert len(bank.skills) == 3 and new and new[0] in bank.skills and bank.skills[1] is new[0]
    bank.save(tmp_path / "bank.json")
    again = SkillBank.load(tmp_path / "bank.json")
    assert again.to_dict() == bank.to_dict() and json.loads((tmp_path / "bank.json").read_text())["skills"]
    with pytest.raises(FileNotFoundError, match="bank_path"):
        SkillBank.load(tmp_path / "none.json")


def test_retrieval_is_deterministic_and_weights_are_softmax():
    ex = RuleExtractor(3)
    trajs = []
    for i in range(12):
        for d in ("math", "code", "mcqa"):
            it = make_item(d, "train", i)
            trajs += [Trajectory(it, it.solution, True), Trajectory(it, it.solution.replace("=", "=1", 1), False)]
    bank = SkillBank()
    bank.add([c for cs in ex(trajs) for c in cs])
    assert bank.skills and bank.mistakes
    it = next(it for it in (make_item("math", "valid", i) for i in range(100))
              if {"carry", "borrow"} <= set(it.meta["skills"]))  # a carry and a borrow
    pool = teacher_pool(bank, it, 8, TfidfSimilarity())
    assert pool == teacher_pool(bank, it, 8, TfidfSimilarity())
    assert 1 <= len(pool) <= 8
    assert all((t.skill is None or t.skill.domain == "math") and (t.mistake is None or t.mistake.domain == "math")
               for t in pool)
    ex_ = [math.exp(t.score) for t in pool]
    for t, e in zip(pool, ex_):
        assert t.weight == pytest.approx(e / sum(ex_))
    skills = retrieve(bank, it, "skill", 8, TfidfSimilarity())
    assert [s for _, s in skills] == sorted((s for _, s in skills), reverse=True)
    top3 = " ".join(e.text for e, _ in skills[:3])
    assert "carry" in top3 and "borrow" in top3
    # The i-th teacher pairs the i-th skill with the i-th mistake.
    mistakes = retrieve(bank, it, "mistake", 8, TfidfSimilarity())
    assert pool[0].skill is skills[0][0] and pool[0].mistake is mistakes[0][0]
    assert teacher_pool(bank, it, 2, TfidfSimilarity()) and len(teacher_pool(bank, it, 2, TfidfSimilarity())) == 2


def test_special_and_marker_tokens_are_excluded(tiny_model_dir):
    from transformers import AutoTokenizer

    from selfdistill.methods.sgsd import excluded_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("#### 12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    drop = excluded_token_ids(tok, ids, "#")
    assert drop == {tok.convert_tokens_to_ids("#"), tok.eos_token_id}


def test_sgsd_trains_with_online_update(tiny_model_dir, tmp_path):
    from selfdistill.trainer import train

    out = tmp_path / "sgsd"
    cfg = tiny(tiny_model_dir, out, method="sgsd", **{
        "onpolicy.samples_per_prompt": 2, "sgsd.bank_prompts": 3, "sgsd.bank_samples": 1, "sgsd.update_every": 1,
        "sgsd.num_teachers": 2, "micro_batch_size": 3, "sgsd.support_threshold": 0.0, "save_every": 2})
    assert train(cfg, log=lambda s: None).steps == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # (A random tiny model barely reads its context: without the dead zone every teacher has a sign.)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert all(1 <= r["teachers_per_prompt"] <= 2 and "polarity_pos_frac" in r and "bank_added" in r for r in rows)
    bank = SkillBank.load(out / "skill_bank.json")
    assert len(bank) > 0
    # The bank is part of the checkpoint (a resumed run retrieves from the same bank).
    from selfdistill.checkpoint import latest_checkpoint, load_state

    state = load_state(latest_checkpoint(out / "checkpoints"))
    assert SkillBank.from_dict(state["method"]["bank"]).to_dict() == bank.to_dict()


def test_method_loss_matches_a_row_by_row_reference(tiny_model_dir, tmp_path):
    """Student rows repeated per teacher, one student forward per rollout, completions left-aligned behind
    prompts of different lengths: the micro-batched loss equals a row-by-row computation from plain logits."""
    from types import SimpleNamespace

    from selfdistill.config import ModelConfig
    from selfdistill.methods.base import Context
    from selfdistill.methods.sgsd import SGSD
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import ItemStream, build_tasks

    cfg = tiny(tiny_model_dir, tmp_path / "m", method="sgsd", batch_size=2, **{
        "onpolicy.samples_per_prompt": 2, "sgsd.num_teachers": 3, "sgsd.support_threshold": 0.0,
        "data.tasks": ["toy-math"]})
    model, tok = load_model(ModelConfig(path=tiny_model_dir))
    with torch.no_grad():  # larger weights, so that the teachers' contexts move the log-probs visibly
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(6.0)
        model.model.norm.weight.mul_(10.0)
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"), is_main_process=True)
    tasks = build_tasks(cfg.data)
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, tasks=tasks, accelerator=acc, out_dir=tmp_path,
                  log=lambda s: None, stream=ItemStream(tasks, 2, 0))
    method = SGSD(ctx)
    method.bank = SkillBank()
    trajs = [Trajectory(it, it.solution.replace("=", "=1", 1), ok)
             for it in ctx.stream.items[:6] for ok in (True, False)]
    method.bank.add([c for cs in RuleExtractor(3)(trajs) for c in cs])
    torch.manual_seed(0)
    batch = method.make_batch(0, ctx.stream.for_step(0))
    assert len(batch) > 4  # several teachers per rollout
    n_rollouts = 4
    got = sum(method.loss(m, torch.tensor(1.0))[0] for m in batch.split(3))

    def row_logp(seq, r):
        n = int(seq.attention_mask_BT[r].sum())
        ids = seq.input_ids_BT[r, :n]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
        tok_logp = logp.gather(-1, ids[1:, None])[:, 0]
        return tok_logp[seq.completion_mask_BT[r, 1:n].bool()].tolist(), ids[1:][seq.completion_mask_BT[r, 1:n].bool()]

    total = 0.0
    for r in range(len(batch)):
        ls, ids = row_logp(batch.student, r)
        lt, ids_t = row_logp(batch.teacher, r)
        assert torch.equal(ids, ids_t)
        keep = [g for g, on in zip(batch.tensors["gate_BT"][r, 1:].tolist(),
                                   batch.student.completion_mask_BT[r, 1:].tolist()) if on]
        deltas = [b - a for a, b, k in zip(ls, lt, keep) if k]
        if not deltas:
            continue
        support = sum(max(-3.0, min(3.0, d)) for d in deltas) / len(deltas)
        polarity = (1 if batch.tensors["rewards_B"][r] > 0 else -1) * (1 if support > 0 else -1 if support < 0 else 0)
        total += float(batch.tensors["weights_B"][r]) * polarity * sum(_ell(d) for d in deltas) / len(deltas)
    assert abs(total) > 1e-3
    assert got.item() == pytest.approx(total / n_rollouts, rel=1e-4)
