"""Integration tests on the shipped toy model (loaded offline from the package)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill.evaluate import EvalConfig, evaluate
from selfdistill.toy.pretrain import DEFAULT_MODEL_DIR
from selfdistill.toy.tasks import ToyTask


def test_shipped_model_loads_offline_and_is_small():
    files = list(Path(DEFAULT_MODEL_DIR).iterdir())
    assert sum(f.stat().st_size for f in files) < 20 * 2**20
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    assert model.config.model_type == "qwen3"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    text = tok.apply_chat_template([{"role": "user", "content": "Compute 12+3"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_shipped_model_is_partly_competent():
    """Greedy accuracy on a few valid items per domain: above zero, below perfect."""
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    tok.padding_side = "left"
    tasks = [ToyTask(d, test_size=24) for d in ("math", "code", "mcqa")]
    res = evaluate(model, tok, tasks, EvalConfig(splits=["valid"], samples=0, max_items=24))
    accs = [r.greedy for r in res]
    assert all(0.0 < a < 1.0 for a in accs), accs
