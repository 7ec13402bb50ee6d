"""Loading a student (any ``AutoModelForCausalLM``), optionally with LoRA.

The embedded toy model is the default (``path: toy``). Paths are checked
before loading so a wrong folder or a non-causal-LM fails with one clear line.

Methods reach the model's parts through :func:`unwrap` (accelerate/DDP and PEFT
wrappers). Under FSDP2 those parts hold shards outside a forward: a training
loss runs through :func:`sharded_forward`, anything else that runs the model
inside :func:`full_params` (the trainer enters it around sampling, method
set-up, after-step hooks and evaluation).
"""

from __future__ import annotations

import contextlib
import json

from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES)

from selfdistill.config import LoraSettings, ModelConfig
from selfdistill.config_io import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers() -> None:
    """No third-party progress bars ("Loading weights", "Writing model shards") on every load and save:
    the run log says what happens, and one-line errors stay one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_model_path(path: str) -> str:
    """``toy`` -> the embedded checkpoint, ``toy-diffusion`` -> the embedded masked-diffusion one; anything
    else unchanged."""
    if path == "toy-diffusion":
        from selfdistill.toy.diffusion_model import DEFAULT_DIFFUSION_DIR

        if not (DEFAULT_DIFFUSION_DIR / "config.json").exists():
            raise ConfigError(f"the embedded toy diffusion model is missing from {DEFAULT_DIFFUSION_DIR}; "
                              "run `selfdistill toy pretrain-diffusion --out " + str(DEFAULT_DIFFUSION_DIR) + "` to rebuild it")
        return str(DEFAULT_DIFFUSION_DIR)
    if path in ("toy", "", None):
        from selfdistill.toy.pretrain import DEFAULT_MODEL_DIR

        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise ConfigError(f"the embedded toy model is missing from {DEFAULT_MODEL_DIR}; "
                              "run `selfdistill toy pretrain` to rebuild it")
        return str(DEFAULT_MODEL_DIR)
    return path


def check_model_config(path: str, trust_remote_code: bool = False, setting: str = "model.path"):
    """Raise a one-line error (naming ``setting``) unless ``path`` holds a causal-LM or masked-diffusion-LM config
    (:func:`model_kind`); return it."""
    p = Path(path)
    if (p.exists() and p.is_dir() and not (p / "config.json").exists()) or (p.exists() and p.is_file()):
        raise ConfigError(f"{setting} {path}: no config.json there; expected a Hugging Face model folder")
    if not p.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ConfigError(f"{setting} {path}: no such folder")
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # hub errors, bad JSON, unknown model types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{setting} {path}: cannot read its config ({first})") from None
    if model_kind(cfg) is None and not trust_remote_code:
        raise ConfigError(f"{setting} {path}: model type {cfg.model_type!r} is not a causal LM "
                          "(AutoModelForCausalLM cannot load it) nor a masked-diffusion LM (AutoModelForMaskedLM)")
    return cfg


def model_kind(config) -> str | None:
    """``causal`` (autoregressive, ``AutoModelForCausalLM``), ``masked`` (a masked-diffusion LM: a
    ``*ForMaskedLM`` architecture, ``AutoModelForMaskedLM``), or None."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_tokenizer(path: str, trust_remote_code: bool = False, setting: str = "model.path"):
    """The tokenizer, left-padded, with a pad token (EOS if it has none); one-line errors naming ``setting``."""
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{setting} {path}: cannot load its tokenizer ({_first_line(e)})") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ConfigError(f"{setting} {path}: the tokenizer has neither a pad nor an eos token, so batches "
                              "cannot be padded and completions never end; set eos_token (and pad_token) in "
                              "tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


def adapter_base(path: str | Path) -> str | None:
    """The base model a PEFT adapter folder names (``adapter_config.json`` and no ``config.json``), else None."""
    p = Path(path)
    if not (p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").exists()):
        return None
    try:
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}/adapter_config.json: cannot read it ({_first_line(e)})") from None
    if not base:
        raise ConfigError(f"{p}/adapter_config.json names no base_model_name_or_path")
    return str(base)


def load_model(cfg: ModelConfig, device: str | torch.device | None = None):
    """(model, tokenizer) for ``cfg``; LoRA-wrapped when ``cfg.lora.enabled``.

    ``cfg.path`` may be a LoRA adapter folder (a LoRA run's ``model/``): its base is loaded and the adapter
    merged in, or, with ``cfg.lora.enabled``, kept as a trainable adapter (training continues on it).
    """
    quiet_transformers()
    adapter = resolve_model_path(cfg.path)
    base = adapter_base(adapter)
    path = resolve_model_path(base) if base is not None else adapter
    config = check_model_config(path, cfg.trust_remote_code,
                             "model.path" if base is None else f"model.path {cfg.path}: its base")
    has_tok = base is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tok = load_tokenizer(adapter if has_tok else path, cfg.trust_remote_code)
    auto = AutoModelForMaskedLM if model_kind(config) == "masked" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # torn weights, shapes that differ
        raise ConfigError(f"model.path {cfg.path}: cannot load the model ({_first_line(e)})") from None
    if device is not None:
        model.to(device)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=cfg.lora.enabled)
        if cfg.lora.enabled:
            return model, tok
        merged = model.merge_and_unload()
        for q in merged.parameters():  # PEFT froze the base; a merged model trains like any other
            q.requires_grad_(True)
        return merged, tok
    if cfg.lora.enabled:
        model = wrap_lora(model, cfg.lora)
    return model, tok


def portable_base(spec: str) -> str:
    """What an adapter should name as its base: ``toy`` and hub ids as given, local folders absolute."""
    if spec in ("toy", "", None):
        return "toy"
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def wrap_lora(model, cfg: LoraSettings):
    """A PEFT LoRA model; the frozen base doubles as the initial-policy teacher."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = cfg.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    masked = type(model).__name__.endswith("ForMaskedLM")  # a diffusion LM: PEFT's generic wrapper
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      task_type=None if masked else "CAUSAL_LM")
    return get_peft_model(model, lcfg)


def unwrap_ddp(model):
    """Through accelerate/DDP wrappers only: a PEFT model stays one (what ``save_pretrained`` saves as an
    adapter, and what a teacher needs to disable its adapter)."""
    return getattr(model, "module", model)


def unwrap(model):
    """The underlying ``PreTrainedModel`` (through accelerate/DDP and PEFT wrappers)."""
    m = getattr(model, "module", model)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def _fsdp_units(model) -> list:
    """The FSDP2 units of ``model`` (root first), or [] when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in unwrap_ddp(model).modules() if isinstance(m, FSDPModule)]


def _root_call(root, fn):
    """``fn()`` run as a forward of the FSDP2 root (its method ``selfdistill_forward``, registered once)."""
    if not hasattr(root, "selfdistill_forward"):
        from torch.distributed.fsdp import register_fsdp_forward_method

        root.selfdistill_forward = (lambda self, f: f()).__get__(root)
        register_fsdp_forward_method(root, "selfdistill_forward")
    return root.selfdistill_forward(fn)


def sharded_forward(model, fn):
    """``fn()`` (a loss that reaches any sub-module of ``model``), run so that FSDP2 gathers full parameters
    before it and reduce-scatters their gradients in the backward of its result; without FSDP, ``fn()``.

    FSDP only gathers inside a module's forward; the losses call the decoder and read the LM head's weight
    themselves, so the whole loss runs as a forward of the root (``register_fsdp_forward_method``)."""
    units = _fsdp_units(model)
    return _root_call(units[0], fn) if units else fn()


@contextlib.contextmanager
def full_params(model) -> Iterator[torch.nn.Module]:
    """``unwrap(model)`` with every parameter whole, for code outside a training step's loss that reaches its
    sub-modules: sampling, teacher views and EMA updates, evaluation, saving. Without FSDP: ``unwrap(model)``.

    Under FSDP2 every process must enter it together (the parameters are all-gathered once on entry); inside,
    the units neither gather nor free, so nothing inside is a collective (processes may sample different
    numbers of tokens). On exit the parameters are sharded again. Entered again inside itself, it does nothing.
    """
    units = _fsdp_units(model)
    if not units or getattr(units[0], "_selfdistill_full", False):
        yield unwrap(model)
        return
    _root_call(units[0], lambda: None)  # FSDP's lazy set-up must start from the root
    for u in units:  # (prepare_fsdp's units never free their parameters after a forward: nothing re-gathers)
        u.unshard()
    units[0]._selfdistill_full = True
    try:
        yield unwrap(model)
    finally:
        units[0]._selfdistill_full = False
        for u in units:
            u.reshard()
