"""CCOPD: sharding, the three conversation settings, the sharded rollout, training, evaluation, the table."""

from __future__ import annotations

import json

import pytest

from selfdistill.methods.ccopd.conversation import messages_for, sharded_rollout
from selfdistill.methods.ccopd.shard import (Sharder, covers, join_shards, load_shards_file, numbers, parse_model_shards,
                                     sentence_shards, shard_with_model, toy_shards)
from selfdistill.config_io import ConfigError
from selfdistill.method_configs import CCOPDConfig
from selfdistill.rollout import SamplingConfig
from selfdistill.sequences import chat_messages, chat_prompt, encode_prompts
from selfdistill.tasks.base import Item
from selfdistill.toy.tasks import make_item

import tinyrun  # tests/tinyrun.py


def tiny(model_dir, out, **over):

    base = {"method": "ccopd", "output_dir": str(out), "steps": 2, "batch_size": 2, "micro_batch_size": 2,
            "model": {"path": model_dir}, "data": {"tasks": ["toy-math"], "train_size": 8, "test_size": 2},
            "rollout": {"max_new_tokens": 8, "batch_size": 8}, "ccopd": {"turn_max_new_tokens": 4},
            "eval_before": False, "eval_after": False, "optim": {"lr": 1e-3, "warmup_steps": 1}}
    return tinyrun.config(base, **over)


def test_toy_math_example_is_the_documented_one():
    it = Item("x", "Compute 47+8-5", "", "50", "math", {"kind": "math"})
    assert toy_shards(it) == ["I need a number computed step by step.", "Start from 47.", "Add 8.",
                              "Then subtract 5. What is the result?"]


@pytest.mark.parametrize("domain", ["math", "code", "mcqa"])
def test_toy_sharding_is_deterministic_and_covers_the_prompt(domain):
    for split in ("train", "test_id", "test_ood"):
        for i in range(25):
            it = make_item(domain, split, i)
            shards = toy_shards(it)
            assert shards == toy_shards(make_item(domain, split, i)) == Sharder(CCOPDConfig())(it)
            assert len(shards) >= 3 and all(s.strip() for s in shards)
            assert covers(it.prompt, shards), (it.prompt, shards)
            assert sorted(numbers(it.prompt)) == sorted(numbers(join_shards(shards))), it.prompt
            if domain == "code":  # every program line is revealed, in order
                body = it.prompt.split("\n", 1)[1].split("\n")
                text = join_shards(shards)
                assert all(line in text for line in body)
                assert [text.index(l) for l in body] == sorted(text.index(l) for l in body)
    assert not covers("Compute 1+2", ["Start from 1."])


def test_shards_from_file_meta_and_sentences(tmp_path):
    f = tmp_path / "shards.jsonl"
    f.write_text(json.dumps({"id": "q1", "shards": ["Goal.", "Fact 3."]}) + "\n"
                 + json.dumps({"prompt": "P two", "shards": ["G", "F"]}) + "\n")
    by_id, by_prompt = load_shards_file(f)
    assert by_id == {"q1": ["Goal.", "Fact 3."]} and by_prompt == {"P two": ["G", "F"]}
    sh = Sharder(CCOPDConfig(shards_file=str(f)))
    assert sh(Item("q1", "whatever", "", "3", "math")) == ["Goal.", "Fact 3."]
    assert sh(Item("other", "P two", "", "3", "math")) == ["G", "F"]
    assert sh(Item("m", "p", "", "1", "math", {"shards": ["a", "b"]})) == ["a", "b"]
    with pytest.raises(ValueError, match="item nope: no shards"):
        sh(Item("nope", "Free text.", "", "1", "math"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q", "shards": []}) + "\n")
    with pytest.raises(ValueError, match=r"row 1, field 'shards'"):
        load_shards_file(bad)
    s = sentence_shards("Tom has 3 apples. He buys 4 more. Then 2 rot.\nHow many are left?", max_shards=3)
    assert s[0] == "Tom has 3 apples." and len(s) == 3 and covers("3 4 2", s)


def test_chat_messages_matches_chat_prompt_and_renders_turns(tiny_model_dir):
    from selfdistill.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    assert chat_messages(tok, [{"role": "user", "content": "hi"}], "sys") == chat_prompt(tok, "hi", "sys")
    text = chat_messages(tok, messages_for("sharded", None, ["a", "b", "c"], ["r1", "r2"]))
    assert text == ("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nr1<|im_end|>\n"
                    "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\nr2<|im_end|>\n"
                    "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError):
        chat_messages(tok, [{"role": "assistant", "content": "x"}])


def test_three_settings_have_the_right_formats(tiny_model_dir):
    from selfdistill.models import load_model
    from selfdistill.config import ModelConfig

    it = make_item("math", "test_id", 0)
    shards = toy_shards(it)
    assert messages_for("full", it, shards) == [{"role": "user", "content": it.prompt}]
    assert messages_for("concat", it, shards) == [{"role": "user", "content": "\n".join(shards)}]
    assert messages_for("concat", it, shards, join="space")[0]["content"] == " ".join(shards)
    model, tok = load_model(ModelConfig(path=tiny_model_dir))
    convs = sharded_rollout(model, tok, [shards, shards[:2]], SamplingConfig(max_new_tokens=5, temperature=0.0), 3)
    for c, n in zip(convs, (len(shards), 2)):
        assert len(c.turns) == n and c.final.final and not any(t.final for t in c.turns[:-1])
        assert all(len(t.completion_ids) <= 3 for t in c.turns[:-1]) and len(c.final.completion_ids) <= 5
        msgs = c.messages()
        assert [m["role"] for m in msgs] == ["user", "assistant"] * n
        assert [m["content"] for m in msgs[::2]] == c.shards
        # The final turn's prompt is the conversation so far: every shard, the model's own replies between.
        expect = chat_messages(tok, messages_for("sharded", None, c.shards, [t.text for t in c.turns[:-1]]))
        assert c.final.prompt_ids == encode_prompts(tok, [expect])[0]
        assert [t.revealed for t in c.turns] == list(range(1, n + 1))


@pytest.mark.parametrize("turns", ["final", "all"])
def test_ccopd_trains_two_steps(tiny_model_dir, tmp_path, turns):
    from selfdistill.trainer import train

    out = tmp_path / turns
    res = train(tiny(tiny_model_dir, out, **{"ccopd.turns": turns}), log=lambda s: None)
    assert res.steps == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 and r["tokens"] > 0 for r in rows)
    assert all(r["turns_mean"] == 4 for r in rows)  # toy math train items: goal, start, two operations
    if turns == "all":  # every assistant turn is a training row
        assert all(r["tokens"] > 8 for r in rows)


def test_teacher_sees_full_prompt_and_student_the_conversation(tiny_model_dir, tmp_path):
    from selfdistill.methods.base import Context
    from selfdistill.methods.ccopd import CCOPD
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import ItemStream, build_tasks
    from accelerate import Accelerator

    cfg = tiny(tiny_model_dir, tmp_path, **{"ccopd.turns": "all"})
    model, tok = load_model(cfg.model)
    tasks = build_tasks(cfg.data)
    ctx = Context(cfg, model, tok, tasks, Accelerator(cpu=True), tmp_path, lambda s: None, None,
                  ItemStream(tasks, 2, 0))
    m = CCOPD(ctx)
    with pytest.raises(ConfigError, match="context"):  # checked before a run writes anything
        CCOPD.check(tiny(tiny_model_dir, tmp_path, **{"ccopd.turn_max_new_tokens": 200}), tasks)
    items = ctx.items_for_step(0)
    batch = m.make_batch(0, items)
    n = [len(toy_shards(it)) for it in items]
    assert len(batch) == sum(n)  # one row per turn of every conversation
    t_text = tok.batch_decode(batch.teacher.input_ids_BT, skip_special_tokens=False)
    s_text = tok.batch_decode(batch.student.input_ids_BT, skip_special_tokens=False)
    shards, last = toy_shards(items[0]), n[0] - 1
    assert chat_prompt(tok, items[0].prompt) in t_text[last]  # final turn: the clean full prompt
    assert chat_prompt(tok, "\n".join(shards[:2])) in t_text[1]  # 'revealed' teacher of turn 2
    assert s_text[last].count("<|im_start|>user") == n[0] and t_text[last].count("<|im_start|>user") == 1


def test_model_sharding_plumbing(tiny_model_dir):
    from selfdistill.config import ModelConfig
    from selfdistill.models import load_model

    assert parse_model_shards("SHARD: Goal.\nnoise\nshard: Add 3.\nSHARD:") == ["Goal.", "Add 3."]
    model, tok = load_model(ModelConfig(path=tiny_model_dir))
    items = [make_item("math", "test_id", i) for i in range(2)]
    rows = shard_with_model(model, tok, items, SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert [r["id"] for r in rows] == [it.id for it in items]
    for r, it in zip(rows, items):  # a random model's reply cannot shard: the sentence rule stands in
        assert r["source"] in ("model", "fallback") and covers(it.prompt, r["shards"])


def test_ccopd_eval_and_table_run(tiny_model_dir, tmp_path):
    from selfdistill.methods.ccopd.table import CCOPDTableConfig, run_ccopd_table

    common = [f"model.path={tiny_model_dir}", "steps=1", "batch_size=2", "micro_batch_size=2",
              "data.train_size=4", "data.test_size=2", "rollout.max_new_tokens=4", "eval.max_items=1",
              "eval.max_new_tokens=4", "eval.samples=0", "eval.splits=test_id", "ccopd.turn_max_new_tokens=2"]
    tc = CCOPDTableConfig(rows=["base", "ccopd"], seeds=[0], out=str(tmp_path), common=common)
    text = run_ccopd_table(tc, log=lambda s: None).read_text()
    assert "| base | toy-math | test_id |" in text and "| ccopd | toy-mcqa | test_id |" in text
    assert "| ccopd | sharded |" in text
    res = json.loads((tmp_path / "runs" / "ccopd-s0" / "ccopd_eval.json").read_text())["after"]
    assert [r["task"] for r in res] == [f"toy-{d}@{s}" for s in ("full", "sharded", "concat")
                                        for d in ("math", "code", "mcqa")]
