"""Update masks: which coordinates a run changed, random controls of the same density, and how two overlap.

A mask file is a safetensors file of ``uint8`` tensors (1 = may change) keyed by parameter name, with
``kind``, ``source`` and ``density`` in its metadata. ``--optim.mask FILE`` trains only those coordinates
(:mod:`selfdistill.masking`); parameters a mask file does not name are frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from selfdistill.analysis.metrics import top_mask, update_mask
from selfdistill.analysis.weights import Weights, paired
from selfdistill.config_io import ConfigError


def delta_masks(before: str, after: str, atol: float = 0.0, top: float = 0.0,
                dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """Per parameter: |Delta| > atol, or (``top`` > 0) the ``top`` share of coordinates with the largest |Delta|."""
    if not 0.0 <= top <= 1.0:
        raise ConfigError(f"--top {top}: a share of coordinates in [0, 1]")
    out = {}
    for name, b, a in paired(Weights(before), Weights(after), dtype):
        d = (a - b).abs()
        if top > 0:
            out[name] = top_mask(d, top)
        else:
            out[name] = update_mask(d, atol)
    return out


def random_like(masks: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Per parameter, a uniformly random mask with exactly as many ones as ``masks`` has there."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in masks.items():
        r = torch.zeros(m.numel(), dtype=torch.bool)
        r[torch.randperm(m.numel(), generator=g)[: int(m.sum())]] = True
        out[name] = r.view(m.shape)
    return out


def density(masks: dict[str, torch.Tensor]) -> float:
    n = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / n if n else 0.0


def save(masks: dict[str, torch.Tensor], path: str | Path, kind: str, source: str) -> None:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(path),
              metadata={"kind": kind, "source": source, "density": f"{density(masks):.6g}"})


def load(path: str | Path) -> dict[str, torch.Tensor]:
    """A mask file as boolean tensors; a clear error if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(f"mask {path}: no such file (write one with `selfdistill analyze mask`)")
    try:
        raw = load_file(str(path))
    except SafetensorError as e:
        raise ConfigError(f"mask {path}: not a safetensors file ({e})") from None
    for k, v in raw.items():
        if v.dtype not in (torch.uint8, torch.bool) or bool(((v != 0) & (v != 1)).any()):
            raise ConfigError(f"mask {path}: tensor {k!r} is not a 0/1 mask")
    return {k: v.bool() for k, v in raw.items()}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Jaccard and coverage of two masks, per parameter and overall, against independent random masks of
    the same densities (expected |A&B| = n dA dB)."""

    def stats(n: int, na: int, nb: int, both: int) -> dict[str, float]:
        da, db = na / n, nb / n
        union = na + nb - both
        exp_both = n * da * db
        exp_union = na + nb - exp_both
        return {"numel": float(n), "density_a": da, "density_b": db, "jaccard": both / union if union else 0.0,
                "jaccard_random": exp_both / exp_union if exp_union else 0.0,
                "coverage_a_in_b": both / na if na else 0.0, "coverage_random_a_in_b": db,
                "coverage_b_in_a": both / nb if nb else 0.0, "coverage_random_b_in_a": da}

    common = [k for k in a if k in b]
    if not common:
        raise ConfigError("the two masks share no parameter names")
    per, tot = {}, [0, 0, 0, 0]
    for k in common:
        if a[k].shape != b[k].shape:
            raise ConfigError(f"{k}: mask shapes {tuple(a[k].shape)} and {tuple(b[k].shape)} differ")
        cnt = [a[k].numel(), int(a[k].sum()), int(b[k].sum()), int((a[k] & b[k]).sum())]
        per[k] = stats(*cnt)
        tot = [x + y for x, y in zip(tot, cnt)]
    return {"all": stats(*tot), "params": per}


def compare_markdown(res: dict[str, Any], name_a: str, name_b: str) -> str:
    a = res["all"]
    return "\n".join([
        "| masks | density A | density B | Jaccard | Jaccard if random | A in B | if random | B in A | if random |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {name_a} vs {name_b} | {a['density_a']:.2%} | {a['density_b']:.2%} | {a['jaccard']:.3f} | "
        f"{a['jaccard_random']:.3f} | {a['coverage_a_in_b']:.2%} | {a['coverage_random_a_in_b']:.2%} | "
        f"{a['coverage_b_in_a']:.2%} | {a['coverage_random_b_in_a']:.2%} |"])
