"""Crash-safe checkpoints: written to a temporary folder, renamed into place.

A checkpoint folder ``step-000012`` holds the model in Hugging Face format
(``save_pretrained``), the tokenizer, and ``trainer_state.pt`` (optimizer,
scheduler, RNG streams, method state, metrics so far). It is assembled under
``.tmp-step-000012`` and appears under its final name by one atomic
``os.rename``; a process killed mid-save leaves only a stale temporary folder,
which the next save removes, and the previous checkpoint stays loadable.
Re-saving an existing step sets the old copy aside (``.old-step-...``) until
the new one is in place, so no moment exists without a complete copy.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

_PREFIX = "step-"
STATE_FILE = "trainer_state.pt"


def _name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG stream a run draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model, tokenizer, state: dict[str, Any], keep: int = 2,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` atomically under ``ckpt_root``; keep the newest ``keep``.

    ``state_dict``: the weights to save in ``model``'s Hugging Face format when the model cannot give them
    itself (gathered from FSDP shards); else the model's own."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for pattern in (f".tmp-{_PREFIX}*", f".del-{_PREFIX}*"):
        for stale in ckpt_root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    _recover(ckpt_root)
    final = ckpt_root / _name(step)
    tmp = ckpt_root / f".tmp-{_name(step)}"
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old_copy = ckpt_root / f".old-{_name(step)}"
    if final.exists():  # re-saving a step: set the old copy aside, never delete before the rename
        shutil.rmtree(old_copy, ignore_errors=True)
        os.rename(final, old_copy)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    shutil.rmtree(old_copy, ignore_errors=True)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        gone = ckpt_root / f".del-{old.name}"  # renamed first: a half-deleted folder is never listed
        os.rename(old, gone)
        shutil.rmtree(gone, ignore_errors=True)
    return final


def _recover(ckpt_root: Path) -> None:
    """A kill between setting an old copy aside and renaming its replacement in: put it back."""
    for old in ckpt_root.glob(f".old-{_PREFIX}*"):
        final = ckpt_root / old.name[len(".old-"):]
        try:
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            elif (old / STATE_FILE).exists():
                os.rename(old, final)
        except OSError:  # another process got there first
            pass


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not ckpt_root.exists():
        return []
    _recover(ckpt_root)
    done = [p for p in ckpt_root.glob(f"{_PREFIX}*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (optimizer, scheduler, RNG, method...)."""
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def load_weights_into(model, ckpt: Path) -> None:
    """Load a checkpoint's weights into an already-built (possibly LoRA) model, exactly."""
    from safetensors.torch import load_file

    from selfdistill.models import unwrap

    if (ckpt / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        return
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {ckpt} has no model weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    target = unwrap(model)
    missing, unexpected = target.load_state_dict(sd, strict=False)
    tied = _tied(target, missing, sd)
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")


def _tied(model, missing, loaded) -> set[str]:
    """The missing keys that share their tensor with a loaded one (tied embeddings: ``lm_head.weight``,
    ModernBERT's ``decoder.weight``): saved once, restored with their twin."""
    own = model.state_dict()
    by_ptr: dict[int, list[str]] = {}
    for k, v in own.items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    return {k for k in missing if any(j != k and j in loaded for j in by_ptr.get(own[k].data_ptr(), []))}
