"""Shared fixtures: a tiny random Qwen3 with the toy tokenizer, saved to a temp folder."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def make_tiny_model_dir(path, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A tiny random Qwen3 causal LM + the toy tokenizer, in HF format."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from selfdistill.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(seed)
    tok = build_toy_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))
