"""The weights an analysis compares: read tensor by tensor from Hugging Face folders, named by layer and module.

Weights are read straight from the ``*.safetensors`` files (no model is built), so any architecture works
and one pair of tensors (with its delta) is in memory at a time. A run folder is read through its
``model/``; a LoRA run's adapter is merged into its base first (through PEFT), since the update of
interest is the base weights' (W + BA - W).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from selfdistill.config_io import ConfigError

#: Module types by the last name part (Llama/Qwen/Mistral/Gemma/OLMo names, GPT-2 / Phi fused ones).
_MODULES = {
    "q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o", "dense": "attn.o",
    "qkv_proj": "attn.qkv", "c_attn": "attn.qkv", "query_key_value": "attn.qkv", "Wqkv": "attn.qkv",
    "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down", "gate_up_proj": "mlp.gate_up",
    "fc1": "mlp.up", "fc2": "mlp.down", "c_fc": "mlp.up", "w1": "mlp.gate", "w3": "mlp.up", "w2": "mlp.down",
    "embed_tokens": "embed", "wte": "embed", "wpe": "embed", "lm_head": "lm_head",
}
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class ParamName:
    """Where a parameter sits: its layer (-1 outside the blocks), module type and block."""

    name: str
    layer: int
    module: str
    block: str  # attention | mlp | embedding | norm | other


def classify(name: str, ndim: int) -> ParamName:
    """Layer, module type and block of a parameter name (e.g. ``model.layers.3.mlp.up_proj.weight``)."""
    m = _LAYER.search("." + name)
    layer = int(m.group(1)) if m else -1
    parts = name.split(".")
    leaf = parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]
    if "norm" in leaf or "ln" in leaf.split("_") or ndim == 1 and leaf not in _MODULES:
        module = "norm" if "norm" in leaf or leaf.startswith("ln") else "other"
    elif parts[-1] == "c_proj" or leaf == "c_proj":
        module = "mlp.down" if ".mlp." in name else "attn.o"
    else:
        module = _MODULES.get(leaf, "other")
    if parts[-1] == "bias" and module != "norm":
        module += ".bias"
    block = {"attn": "attention", "mlp": "mlp", "embed": "embedding", "lm_head": "embedding",
             "norm": "norm"}.get(module.split(".")[0], "other")
    return ParamName(name, layer, module, block)


def model_folder(path: str) -> Path:
    """The Hugging Face folder behind ``path``: itself, a run's ``model/``, or the embedded toy model."""
    if path in ("toy", ""):
        from selfdistill.models import resolve_model_path

        return Path(resolve_model_path("toy"))
    p = Path(path)
    if (p / "model").is_dir() and not (p / "config.json").exists():
        p = p / "model"
    if not p.is_dir():
        raise ConfigError(f"{path}: no such folder (expected a Hugging Face model folder or a run folder)")
    if not list(p.glob("*.safetensors")):
        raise ConfigError(f"{path}: no .safetensors files in {p} (save the model with safetensors)")
    return p


def _is_adapter(p: Path) -> bool:
    return (p / "adapter_config.json").exists() and not (p / "config.json").exists()


def _merged_adapter(p: Path) -> dict[str, torch.Tensor]:
    """The base weights with a LoRA adapter merged in (W + scale * B A), by PEFT (:func:`load_model`)."""
    from selfdistill.config import ModelConfig
    from selfdistill.models import load_model

    merged, _ = load_model(ModelConfig(path=str(p), dtype="float32"))
    return {k: v.detach() for k, v in merged.state_dict().items()}


class Weights:
    """Named tensors of one model, read lazily (float32 unless a dtype is asked for)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = model_folder(path)
        self._merged = _merged_adapter(self.folder) if _is_adapter(self.folder) else None
        self._where: dict[str, Path] = {}
        if self._merged is None:
            from safetensors import safe_open

            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        self._where[k] = f

    def names(self) -> list[str]:
        return list(self._merged) if self._merged is not None else list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if self._merged is not None:
            return self._merged[name].float()
        from safetensors import safe_open

        with safe_open(str(self._where[name]), "pt") as h:
            return h.get_tensor(name).float()


def canonical_name(name: str) -> str:
    """A name without the prefixes PEFT and wrappers add (``base_model.model.``), so folders line up."""
    for pre in ("base_model.model.", "module."):
        if name.startswith(pre):
            name = name[len(pre):]
    return name


def common_names(before: Weights, after: Weights) -> dict[str, tuple[str, str]]:
    """Canonical name -> (its name in ``before``, in ``after``) for every parameter both hold."""
    b_names = {canonical_name(n): n for n in before.names()}
    a_names = {canonical_name(n): n for n in after.names()}
    common = {n: (b_names[n], a_names[n]) for n in b_names if n in a_names}
    if not common:
        raise ConfigError(f"{before.path} and {after.path} share no parameter names: not the same architecture")
    return common


def paired(before: Weights, after: Weights, dtype: str = "fp32") -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, W_before, W_after) for every parameter in both, read one pair at a time, in ``dtype`` (``bf16``
    rounds both to bfloat16 first, as a bf16 training run stores them, then compares in float32); refuses
    mismatched shapes."""
    for n, (bn, an) in common_names(before, after).items():
        wb, wa = before.get(bn), after.get(an)
        if wb.shape != wa.shape:
            raise ConfigError(f"{n}: shape {tuple(wb.shape)} in {before.path} but {tuple(wa.shape)} in "
                              f"{after.path}: not the same architecture")
        if dtype == "bf16":
            wb, wa = wb.bfloat16().float(), wa.bfloat16().float()
        yield n, wb, wa
