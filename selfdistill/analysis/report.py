"""``selfdistill analyze BEFORE AFTER``: every matrix's update measured, aggregated, and written as a report.

Aggregates are over groups of parameters (the whole model, each block, module type and layer): counts and
energies add up; every per-matrix metric is averaged two ways, weighted by element count (``*_n``, the
pooled share for the share metrics) and by update energy ||Delta||^2 (``*_e``, what the big updates look
like). The report shows the element-weighted sparsity and the energy-weighted spectrum; the JSON has both.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from selfdistill.analysis import metrics as M
from selfdistill.analysis.weights import Weights, classify, common_names, paired

#: The singular values kept per matrix for the spectra plot.
KEEP_SINGULAR = 128

BF16_NOTE = ("A delta formed from bfloat16 weights has exact zeros from rounding alone: an update smaller "
             "than half a bf16 step of its weight (|W| * 2^-8) leaves the stored weight unchanged, and small "
             "weights have finer steps. Both forms are computed; the tables show the one named above.")


def analyze(before: str, after: str, dtype: str = "fp32", progress: bool = True) -> dict[str, Any]:
    """Every parameter's metrics for Delta = AFTER - BEFORE (``dtype`` fp32 or bf16), and their aggregates."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype {dtype!r}: choose fp32 or bf16")
    wb, wa = Weights(before), Weights(after)
    rows: list[dict[str, Any]] = []
    spectra: dict[str, list[float]] = {}
    other = "bf16" if dtype == "fp32" else "fp32"
    pairs = paired(wb, wa)  # float32, read lazily: one pair in memory at a time
    for name, b32, a32 in tqdm(pairs, total=len(common_names(wb, wa)), desc="analyze", disable=not progress,
                               dynamic_ncols=True):
        b16, a16 = b32.bfloat16().float(), a32.bfloat16().float()
        b, a = (b32, a32) if dtype == "fp32" else (b16, a16)
        where = classify(name, b.dim())
        d = a - b
        row: dict[str, Any] = {"name": name, "layer": where.layer, "module": where.module, "block": where.block,
                               "shape": list(b.shape), **M.sparsity(d, b)}
        od = (a16 - b16) if other == "bf16" else (a32 - b32)
        row[f"zero_share_{other}"] = float((od == 0).sum()) / d.numel()
        top_before = None
        if b.dim() == 2:
            svals = M.singular_values(d)  # once: the spectrum rows and the plot
            top_before = M.top_svd(b, M.before_svd_rank(tuple(b.shape)))  # once: subspace and principal set
            row.update(M.spectrum(d, svals))
            row.update(M.subspace(b, a, top_before))
            spectra[name] = [float(x) for x in svals[0][:KEEP_SINGULAR]]
        row.update(M.near_zero(d, b, top_before))
        rows.append(row)
    return {"before": before, "after": after, "dtype": dtype, "other_dtype": other, "params": rows,
            "spectra": spectra, "groups": aggregate(rows), "settings": settings()}


def settings() -> dict[str, Any]:
    """The analysis' fixed choices (recorded with every result)."""
    return {"exact_svd_max_dim": M.EXACT_SVD_MAX, "randomized_rank": M.RANDOMIZED_RANK,
            "low_fraction": M.LOW_FRACTION, "principal_rank_share": M.PRINCIPAL_RANK_SHARE,
            "mask_atols": list(M.MASK_ATOLS), "subspace_shares": list(M.SUBSPACE_SHARES)}


_NOT_AVERAGED = {"name", "layer", "module", "block", "shape", "numel", "energy"}


def _group(rows: list[dict[str, Any]], total_energy: float) -> dict[str, float]:
    n = sum(r["numel"] for r in rows)
    e = sum(r["energy"] for r in rows)
    out: dict[str, float] = {"params": float(len(rows)), "numel": n, "energy": e,
                             "energy_share": e / total_energy if total_energy else 0.0,
                             "fro": math.sqrt(e)}
    keys = {k for r in rows for k, v in r.items() if k not in _NOT_AVERAGED and isinstance(v, (int, float))}
    for k in sorted(keys):
        have = [r for r in rows if k in r]
        wn = sum(r["numel"] for r in have)
        we = sum(r["energy"] for r in have)
        out[f"{k}_n"] = sum(r[k] * r["numel"] for r in have) / wn if wn else 0.0
        out[f"{k}_e"] = sum(r[k] * r["energy"] for r in have) / we if we else 0.0
    return out


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Group metrics for ``all``, each ``block``, ``module`` and ``layer``."""
    total = sum(r["energy"] for r in rows)
    out: dict[str, dict[str, dict[str, float]]] = {"all": {"all": _group(rows, total)}}
    for key in ("block", "module", "layer"):
        groups: dict[str, list] = defaultdict(list)
        for r in rows:
            groups[str(r[key])].append(r)
        order = sorted(groups, key=lambda g: (int(g) if key == "layer" else g))
        out[key] = {g: _group(groups[g], total) for g in order}
    return out


# ---- writing ------------------------------------------------------------------------------------------

_COLUMNS = [  # (header, group key, format)
    ("params", "params", "{:.0f}"), ("elements", "numel", "{:,.0f}"), ("energy %", "energy_share", "{:.1%}"),
    ("zero", "zero_share_n", "{:.1%}"), ("<1e-6", "below_1e-06_n", "{:.1%}"),
    ("<1e-3 rms", "below_0.001_rms_n", "{:.1%}"), ("<1e-2 rms", "below_0.01_rms_n", "{:.1%}"),
    ("top1% energy", "energy_top_1pct_n", "{:.1%}"), ("rel fro", "rel_fro_e", "{:.2e}"),
    ("stable rank", "stable_rank_e", "{:.1f}"), ("eff. rank / dim", "_eff_rank_share", "{:.2f}"),
    ("in W top-5%", "in_both_5pct_e", "{:.1%}"), ("if random", "in_both_5pct_random_e", "{:.2%}"),
    ("low-W enrich.", "top_5pct_low_enrichment_n", "{:.2f}"),
]


def _cell(g: dict[str, float], key: str, fmt: str) -> str:
    if key == "_eff_rank_share":
        dim = g.get("min_dim_e", 0.0)
        return f"{g['effective_rank_e'] / dim:.2f}" if dim and "effective_rank_e" in g else "-"
    return fmt.format(g[key]) if key in g else "-"


def table(groups: dict[str, dict[str, float]], label: str) -> str:
    """A Markdown table of groups (one row each)."""
    head = f"| {label} | " + " | ".join(h for h, _, _ in _COLUMNS) + " |"
    rule = "|" + "---|" * (len(_COLUMNS) + 1)
    lines = [head, rule]
    for name, g in groups.items():
        lines.append(f"| {name} | " + " | ".join(_cell(g, k, f) for _, k, f in _COLUMNS) + " |")
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    """The report: what was compared, the whole-model summary, then by block, module and layer."""
    a = res["groups"]["all"]["all"]
    other = res["other_dtype"]
    lines = [f"# Update analysis: {res['after']} vs {res['before']}", "",
             f"Delta formed in **{res['dtype']}** (exact-zero share {a['zero_share_n']:.2%}; formed in {other}: "
             f"{a[f'zero_share_{other}_n']:.2%}). {BF16_NOTE}", "",
             "Columns: shares of elements (element-weighted) for the sparsity columns; energy-weighted means "
             "over matrices for the rest (relative Frobenius norm, stable rank ||D||_F^2/sigma_1^2, effective "
             "rank exp(H(sigma/sum sigma)) over the smaller dimension, share of ||D||^2 inside W_before's top-5% "
             "singular subspaces (both sides) and what a delta of random direction would put there, "
             "enrichment of the top-5% |D| mask on the lowest-10% |W| coordinates (element-weighted; 1 = as "
             "a random mask).", "",
             "## Whole model", "", table(res["groups"]["all"], "model"), "",
             "## By block", "", table(res["groups"]["block"], "block"), "",
             "## By module type", "", table(res["groups"]["module"], "module"), "",
             "## By layer", "", table(res["groups"]["layer"], "layer"), ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    """Per-layer energy shares by block, sparsity against threshold, and the largest updates' spectra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []

    def finish(fig, ax, xlabel: str, ylabel: str, name: str, legend_size: int = 8) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    rows = res["params"]
    layers = sorted({r["layer"] for r in rows})
    blocks = sorted({r["block"] for r in rows})
    total = sum(r["energy"] for r in rows) or 1.0
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(layers)
    for b in blocks:
        vals = [sum(r["energy"] for r in rows if r["layer"] == lay and r["block"] == b) / total for lay in layers]
        ax.bar([str(x) for x in layers], vals, bottom=bottom, label=b)
        bottom = [x + y for x, y in zip(bottom, vals)]
    finish(fig, ax, "layer (-1 = outside the blocks)", "share of ||Delta||^2", "energy_by_layer.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    g = res["groups"]["block"]
    for b, gb in g.items():
        ax.plot(M.ABS_THRESHOLDS, [gb[f"below_{t:g}_n"] for t in M.ABS_THRESHOLDS], marker="o", label=b)
    ax.set_xscale("log")
    finish(fig, ax, "|Delta| threshold", "share of coordinates below", "sparsity_vs_threshold.png")

    top = sorted((r for r in rows if r["name"] in res["spectra"]), key=lambda r: -r["energy"])[:6]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in top:
        s = torch.tensor(res["spectra"][r["name"]])
        if float(s[0]) > 0:
            ax.plot(range(1, len(s) + 1), (s / s[0]).tolist(), label=r["name"].replace("model.", ""))
    ax.set_yscale("log")
    ax.set_title("the 6 largest updates", fontsize=9)
    finish(fig, ax, "index", "sigma_i / sigma_1", "spectra.png", legend_size=6)
    return paths


def write(res: dict[str, Any], out: str | Path, plots: bool = True) -> list[Path]:
    """``analysis.json``, ``report.md`` and the plots in ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(res, indent=1))
    (out / "report.md").write_text(markdown(res))
    written = [out / "analysis.json", out / "report.md"]
    return written + (plot(res, out) if plots else [])
