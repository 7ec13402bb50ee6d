"""The pretraining mixture: pure, masked on assistant turns only, held-out templates never seen, words known."""

from __future__ import annotations

import collections

from selfdistill import method_configs as mc
from selfdistill.toy import templates as T
from selfdistill.toy.mixture import SHARES, example, group_shards
from selfdistill.toy.pretrain import PretrainConfig, chunk_batches, encode_example
from selfdistill.toy.tokenizer import build_toy_tokenizer, toy_words


def test_examples_are_pure_and_cover_every_component():
    assert example(0, 7) == example(0, 7) and example(0, 7) != example(1, 7)
    seen = collections.Counter(example(0, i)[0] for i in range(1500))
    assert set(seen) == set(SHARES)


def test_loss_mask_covers_assistant_turns_only_and_matches_the_chat_template():
    tok = build_toy_tokenizer()
    for i in range(60):
        _, msgs, trained = example(0, i)
        ids, mask = encode_example(tok, msgs, trained)
        assert ids == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        masked = tok.decode([t for t, m in zip(ids, mask) if m])
        want = "".join(m["content"] for m in msgs if m["role"] == "assistant")
        assert masked.replace("<|im_end|>", "") == want


def test_held_out_templates_never_occur_in_pretraining_but_their_words_do():
    texts = [m["content"] for i in range(3000) for m in example(0, i)[1]]
    words = set(toy_words())
    for kind, tpl in T.HELD_OUT.items():
        head = tpl.split("{ctx}")[0].replace("{problem}", "").strip()
        tail = tpl.split("{ctx}")[-1].replace("{problem}", "").strip()
        for piece in (head, tail):
            if len(piece) > 12:
                assert not any(piece in t for t in texts), (kind, piece)
        assert T.words(tpl.replace("{problem}", "").replace("{ctx}", "").replace("{verdict}", "")) <= words
    # the methods' defaults are the held-out paraphrases
    fill = dict(problem="P", ctx="C")
    assert mc.OPSD_TEMPLATE.format(problem="P", solution="C") == T.HELD_OUT["reference"].format(**fill)
    assert mc.SDFT_TEMPLATE.format(problem="P", demonstration="C") == T.HELD_OUT["demonstration"].format(**fill)
    assert mc.SDPO_TEMPLATE.format(problem="P", attempt="C") == T.HELD_OUT["correct_attempt"].format(**fill)
    assert mc.SGSD_TEMPLATE.format(problem="P", guidance="C") == T.HELD_OUT["skill"].format(**fill)
    assert mc.CRITIQUE_STEP_TEMPLATE.format(problem="P", critique="C") == T.HELD_OUT["critique"].format(**fill)


def test_template_words_are_single_tokens_and_digits_single_characters():
    tok = build_toy_tokenizer()
    ids = tok("Here is a reference solution: 4821", add_special_tokens=False)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[:5] == ["Here", " is", " ", "a", " reference"] or "reference" in "".join(toks)
    assert [t for t in toks if t.strip().isdigit()] == ["4", "8", "2", "1"]
    assert tok.decode(ids) == "Here is a reference solution: 4821"


def test_sharded_training_uses_fewer_turns_than_evaluation():
    assert group_shards(["a", "b", "c", "d", "e"], 2) == ["a\nb\nc", "d\ne"]
    turns = [sum(m["role"] == "user" for m in example(0, i)[1]) for i in range(2000) if example(0, i)[0] == "sharded"]
    assert max(turns) <= 3 and min(turns) >= 2


def test_batches_fit_the_token_budget_and_are_deterministic():
    tok = build_toy_tokenizer()
    cfg = PretrainConfig(tokens_per_step=2048)
    a, b = chunk_batches(tok, cfg, 0, size=128), chunk_batches(tok, cfg, 0, size=128)
    assert a == b
    assert all(len(x) * max(len(e[0]) for e in x) <= 2048 or len(x) == 1 for x in a)


def test_copy_part_is_an_exact_copy_and_the_reading_curriculum_grows():
    from selfdistill.toy.mixture import CURRICULUM

    copies = [example(0, i)[1] for i in range(3000) if example(0, i)[0] == "copy"]
    assert copies and all(m[1]["content"] in m[0]["content"] for m in copies)

    def records_rows(start: int) -> list[int]:
        return [example(0, i)[1][0]["content"].count("\nid ") for i in range(start, start + 1500)
                if example(0, i)[0] == "records"]

    early, late = records_rows(0), records_rows(CURRICULUM)
    assert max(early) <= 5 and max(late) > 15  # 4 records at most at the start, up to 24 after the curriculum
