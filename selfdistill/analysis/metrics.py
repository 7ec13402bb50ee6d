"""What an update Delta W = W_after - W_before looks like, one matrix at a time (arXiv 2606.13657's metrics).

Pure tensor functions returning flat ``dict[str, float]`` rows, so the report can aggregate and tabulate
them without knowing which metric is which. Inputs are float tensors of one parameter; matrices are 2-D
(a 1-D parameter, e.g. a norm's weight, gets the sparsity metrics only).

Choices the paper leaves open, stated here once:

- ``EXACT_SVD_MAX`` (the smaller dimension up to which singular values are exact, in float64);
  beyond it a randomized SVD of rank ``RANDOMIZED_RANK`` is used and the spectral rows that need the
  whole spectrum (effective and numerical rank) are computed over those values only (lower bounds),
  flagged by ``svd_exact = 0``.
- Low-|W| coordinates: the ``LOW_FRACTION`` share of coordinates with the smallest |W_before|.
- Principal coordinates: the ``LOW_FRACTION`` share with the largest |entry| of W_before's rank-k
  reconstruction, k = ``PRINCIPAL_RANK_SHARE`` of the smaller dimension.
"""

from __future__ import annotations

import math

import torch

ABS_THRESHOLDS = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
REL_THRESHOLDS = (1e-4, 1e-3, 1e-2)  # times RMS(W_before)
TOP_SHARES = (0.001, 0.01, 0.05)  # top coordinates whose share of ||Delta||^2 is reported
RANK_TOLS = (1e-6, 1e-5, 1e-4)  # numerical rank: singular values above tol * sigma_1
TOPK_ENERGY = (1, 2, 4, 8, 16, 32, 64)
TOPK_ENERGY_SHARES = (0.01, 0.05, 0.10)  # of the smaller dimension
SUBSPACE_SHARES = (0.01, 0.05, 0.10, 0.20)  # k as a share of the smaller dimension
EXACT_SVD_MAX = 4096
RANDOMIZED_RANK = 256
LOW_FRACTION = 0.10
PRINCIPAL_RANK_SHARE = 0.10
MASK_ATOLS = (0.0, 1e-5)
#: Also the mask of the largest |Delta| coordinates (this share): an fp32 AdamW update touches nearly every
#: coordinate, so its atol masks are nearly all ones and say nothing about where the update is large.
MASK_TOP = 0.05


def _pct(x: float) -> str:
    return f"{x * 100:g}".replace(".", "_")


def sparsity(delta: torch.Tensor, before: torch.Tensor) -> dict[str, float]:
    """Exact-zero and below-threshold shares, energy concentration and norms of ``delta``."""
    d = delta.detach().double().flatten()
    w = before.detach().double().flatten()
    n = d.numel()
    a = d.abs()
    energy = float((d * d).sum())
    rms_w = float(w.pow(2).mean().sqrt())
    row: dict[str, float] = {"numel": float(n), "zero_share": float((d == 0).sum()) / n}
    for t in ABS_THRESHOLDS:
        row[f"below_{t:g}"] = float((a < t).sum()) / n
    for tau in REL_THRESHOLDS:
        row[f"below_{tau:g}_rms"] = float((a < tau * rms_w).sum()) / n
    if energy > 0:
        sq = (d * d).sort(descending=True).values
        for s in TOP_SHARES:
            k = max(1, int(math.ceil(s * n)))
            row[f"energy_top_{_pct(s)}pct"] = float(sq[:k].sum()) / energy
    else:
        row.update({f"energy_top_{_pct(s)}pct": 0.0 for s in TOP_SHARES})
    fro = math.sqrt(energy)
    row.update({"energy": energy, "fro": fro, "rel_fro": fro / max(float(w.norm()), 1e-30),
                "linf": float(a.max()) if n else 0.0, "mean_abs": float(a.mean()), "rms": math.sqrt(energy / n)})
    return row


def singular_values(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Singular values of ``m`` (descending), and whether they are exact (else randomized, top ones only)."""
    if min(m.shape) <= EXACT_SVD_MAX:
        return torch.linalg.svdvals(m.detach().double()), True
    q = min(RANDOMIZED_RANK, min(m.shape))
    _, s, _ = torch.svd_lowrank(m.detach().float(), q=q, niter=6)
    return s.double(), False


def spectrum(delta: torch.Tensor, svals: tuple[torch.Tensor, bool] | None = None) -> dict[str, float]:
    """Spectral norm, stable / effective / numerical rank and top-k energy of a 2-D ``delta`` (``svals``:
    its :func:`singular_values`, when the caller has them already)."""
    s, exact = svals if svals is not None else singular_values(delta)
    energy_total = float(delta.detach().double().pow(2).sum())
    small = min(delta.shape)
    row: dict[str, float] = {"svd_exact": float(exact), "min_dim": float(small)}
    if energy_total == 0 or float(s[0]) == 0:
        row.update({"sigma_1": 0.0, "sigma1_over_fro": 0.0, "stable_rank": 0.0, "effective_rank": 0.0})
        row.update({f"rank_{t:g}": 0.0 for t in RANK_TOLS})
        row.update({f"top{k}_energy": 0.0 for k in TOPK_ENERGY})
        row.update({f"top{_pct(x)}pct_energy": 0.0 for x in TOPK_ENERGY_SHARES})
        return row
    s1 = float(s[0])
    p = s / s.sum()
    p = p[p > 0]
    sq = s * s
    row.update({"sigma_1": s1, "sigma1_over_fro": s1 / math.sqrt(energy_total),
                "stable_rank": energy_total / (s1 * s1),
                "effective_rank": math.exp(float(-(p * p.log()).sum()))})
    for t in RANK_TOLS:
        row[f"rank_{t:g}"] = float((s > t * s1).sum())
    for k in TOPK_ENERGY:
        row[f"top{k}_energy"] = float(sq[:k].sum()) / energy_total
    for x in TOPK_ENERGY_SHARES:
        row[f"top{_pct(x)}pct_energy"] = float(sq[: max(1, round(x * small))].sum()) / energy_total
    return row


def top_svd(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets of ``m`` (U: rows x k, S: k, V: cols x k), exact where small."""
    if min(m.shape) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(m.detach().double(), full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    u, s, v = torch.svd_lowrank(m.detach().float(), q=min(max(k, RANDOMIZED_RANK), min(m.shape)), niter=6)
    return u[:, :k].double(), s[:k].double(), v[:, :k].double()


def subspace_ks(shape: tuple[int, ...]) -> list[int]:
    """The subspace ranks k (1 / 5 / 10 / 20 % of the smaller dimension, at least 1)."""
    return [max(1, round(x * min(shape))) for x in SUBSPACE_SHARES]


def before_svd_rank(shape: tuple[int, ...]) -> int:
    """How many of W_before's singular triplets the subspace and principal-coordinate metrics read."""
    return max(max(subspace_ks(shape)), max(1, round(PRINCIPAL_RANK_SHARE * min(shape))))


def subspace(before: torch.Tensor, after: torch.Tensor,
             top_before: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """How much of Delta lies in W_before's top singular subspaces (with what a random direction would put
    there), how those subspaces turn, and how the singular values drift (``top_before``: W_before's
    :func:`top_svd` of at least the largest k, when the caller has it already)."""
    wb, wa = before.detach().double(), after.detach().double()
    d = wa - wb
    energy = float(d.pow(2).sum())
    ks = subspace_ks(tuple(d.shape))
    kmax = max(ks)
    ub, sb, vb = top_before if top_before is not None else top_svd(wb, kmax)
    ua, sa, va = top_svd(wa, kmax)
    row: dict[str, float] = {}
    for share, k in zip(SUBSPACE_SHARES, ks):
        tag = f"{_pct(share)}pct"
        # What a delta of random direction would put there: k/rows of its energy on the left, k/cols on
        # the right, (k/rows)(k/cols) in both.
        row[f"in_both_{tag}_random"] = k * k / (d.shape[0] * d.shape[1])
        uk, vk = ub[:, :k], vb[:, :k]
        left = uk.T @ d  # k x cols
        if energy > 0:
            row[f"in_both_{tag}"] = float((left @ vk).pow(2).sum()) / energy
            row[f"in_left_{tag}"] = float(left.pow(2).sum()) / energy
            row[f"in_right_{tag}"] = float((d @ vk).pow(2).sum()) / energy
        else:
            row[f"in_both_{tag}"] = row[f"in_left_{tag}"] = row[f"in_right_{tag}"] = 0.0
        for side, b, a in (("left", uk, ua[:, :k]), ("right", vk, va[:, :k])):
            cos = torch.linalg.svdvals(b.T @ a).clamp(max=1.0)
            row[f"angle_sin_{side}_{tag}"] = float((1 - cos * cos).clamp(min=0).sqrt().mean())
        row[f"sv_drift_{tag}"] = float((sa[:k] - sb[:k]).norm() / sb[:k].norm().clamp(min=1e-30))
    return row


def update_mask(delta: torch.Tensor, atol: float) -> torch.Tensor:
    """Coordinates the update touched: |Delta| > atol."""
    return delta.detach().abs() > atol


def top_mask(delta: torch.Tensor, share: float) -> torch.Tensor:
    """The ``share`` of coordinates with the largest |Delta| (at least one; ties broken by position)."""
    return _lowest(-delta.detach().abs().double(), share)


def _lowest(x: torch.Tensor, share: float) -> torch.Tensor:
    """Boolean mask of the ``share`` of coordinates with the smallest ``x`` (ties broken by position)."""
    flat = x.flatten()
    k = max(1, int(round(share * flat.numel())))
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[torch.argsort(flat, stable=True)[:k]] = True
    return out.view(x.shape)


def low_weight_set(before: torch.Tensor) -> torch.Tensor:
    """The ``LOW_FRACTION`` of coordinates with the smallest |W_before|."""
    return _lowest(before.detach().abs().double(), LOW_FRACTION)


def principal_set(before: torch.Tensor,
                  top_before: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The ``LOW_FRACTION`` of coordinates with the largest |entry| of W_before's rank-k reconstruction."""
    k = max(1, round(PRINCIPAL_RANK_SHARE * min(before.shape)))
    u, s, v = top_before if top_before is not None else top_svd(before, k)
    recon = (u[:, :k] * s[:k]) @ v[:, :k].T
    return _lowest(-recon.abs(), LOW_FRACTION)


def overlap(mask: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Density of ``mask``; overlap |M & R| / |M|, coverage |M & R| / |R|, enrichment overlap / density(R)
    (1 = no more than a random mask of the same density)."""
    n = mask.numel()
    m, r = int(mask.sum()), int(ref.sum())
    both = int((mask & ref).sum())
    ov = both / m if m else 0.0
    return {"density": m / n, "overlap": ov, "coverage": both / r if r else 0.0,
            "enrichment": ov / (r / n) if r else 0.0}


def near_zero(delta: torch.Tensor, before: torch.Tensor,
              top_before: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """Whether the update falls on the smallest weights and on the principal coordinates (per mask)."""
    low = low_weight_set(before)
    prin = principal_set(before, top_before) if before.dim() == 2 else None
    row: dict[str, float] = {}
    masks = [(f"atol_{atol:g}", update_mask(delta, atol)) for atol in MASK_ATOLS]
    masks.append((f"top_{_pct(MASK_TOP)}pct", top_mask(delta, MASK_TOP)))
    for tag, m in masks:
        for k, v in overlap(m, low).items():
            row[f"{tag}_{'density' if k == 'density' else 'low_' + k}"] = v
        if prin is not None:
            for k, v in overlap(m, prin).items():
                if k != "density":
                    row[f"{tag}_principal_{k}"] = v
    return row
