"""Training only a coordinate mask (``--optim.mask FILE``): every update outside it is exactly zero.

How: parameters the mask file does not name are frozen (``requires_grad`` off); for the others the
gradient is multiplied by the mask before clipping, so AdamW's moments stay exactly zero outside it and
its step there is exactly zero too. Decoupled weight decay would still shrink those coordinates, so with
``weight_decay > 0`` their starting values are kept and written back after each step (one extra copy of
the masked parameters; none when weight decay is off, the default).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from selfdistill.config_io import ConfigError


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class ParamMask:
    """A coordinate mask installed on a model's parameters."""

    def __init__(self, model: torch.nn.Module, path: str, weight_decay: float) -> None:
        from selfdistill.analysis.masks import load
        from selfdistill.analysis.weights import canonical_name as _canonical

        raw = {_canonical(k): v for k, v in load(path).items()}
        self.path = path
        self.masks: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.kept: list[torch.Tensor] = []
        named = list(model.named_parameters())
        known = {_canonical(n) for n, _ in named}
        unknown = [k for k in raw if k not in known and not k.startswith("lm_head.")]  # (tied heads)
        if unknown:
            raise ConfigError(f"optim.mask {path}: {len(unknown)} name(s) the model does not have, e.g. "
                              f"{unknown[0]!r}: a mask of another architecture?")
        frozen = 0
        for n, p in named:
            m = raw.get(_canonical(n))
            if m is None:
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen += p.numel()
                continue
            if tuple(m.shape) != tuple(p.shape):
                raise ConfigError(f"optim.mask {path}: {n} has shape {tuple(m.shape)} in the mask but "
                                  f"{tuple(p.shape)} in the model")
            mask = m.to(device=p.device, dtype=p.dtype)
            self.masks.append((p, mask))
            if weight_decay > 0:
                self.kept.append(p.detach().clone())
        trainable = sum(int(m.sum()) for _, m in self.masks)
        self.frozen, self.trainable = frozen, trainable
        self.total = sum(p.numel() for _, p in named)

    def summary(self) -> str:
        return (f"optim.mask {self.path} (sha256 {file_digest(self.path)}): {self.trainable:,} of {self.total:,} "
                f"coordinates trainable ({self.trainable / max(self.total, 1):.2%}); "
                f"{self.frozen:,} in parameters the mask does not name are frozen")

    def grads(self) -> None:
        """Zero every gradient outside the mask (call after backward, before clipping)."""
        for p, m in self.masks:
            if p.grad is not None:
                p.grad.mul_(m)

    def after_step(self) -> None:
        """Write back the starting values outside the mask (only needed with weight decay)."""
        if not self.kept:
            return
        with torch.no_grad():
            for (p, m), k in zip(self.masks, self.kept):
                p.copy_(torch.where(m.bool(), p, k))
