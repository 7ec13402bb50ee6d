"""The analysis table: several runs' ``selfdistill analyze`` results side by side, mean ± std over seeds.

Reads ``OUT/analysis/<row>-s<seed>/analysis.json`` (fp32), ``.../<row>-s<seed>-bf16/analysis.json`` and
``OUT/analysis/compare-<a>-<b>-s<seed>.json``, as scripts/opd_analysis_table.sh writes them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

#: (column, how to read it from (fp32 result, bf16 result), format)
COLUMNS: list[tuple[str, Callable[[dict, dict], float], str]] = [
    ("||D||_F", lambda a, b: a["groups"]["all"]["all"]["fro"], "{:.3f}"),
    ("exact zeros fp32", lambda a, b: a["groups"]["all"]["all"]["zero_share_n"], "{:.1%}"),
    ("exact zeros bf16", lambda a, b: b["groups"]["all"]["all"]["zero_share_n"], "{:.1%}"),
    ("|D| < 1e-3 RMS(W)", lambda a, b: a["groups"]["all"]["all"]["below_0.001_rms_n"], "{:.1%}"),
    ("energy in top 1% coords", lambda a, b: a["groups"]["all"]["all"]["energy_top_1pct_n"], "{:.1%}"),
    ("energy: attention", lambda a, b: a["groups"]["block"].get("attention", {}).get("energy_share", 0.0), "{:.1%}"),
    ("energy: MLP", lambda a, b: a["groups"]["block"].get("mlp", {}).get("energy_share", 0.0), "{:.1%}"),
    ("energy: embedding", lambda a, b: a["groups"]["block"].get("embedding", {}).get("energy_share", 0.0), "{:.1%}"),
    ("stable rank", lambda a, b: a["groups"]["all"]["all"]["stable_rank_e"], "{:.1f}"),
    ("eff. rank / dim", lambda a, b: a["groups"]["all"]["all"]["effective_rank_e"]
     / a["groups"]["all"]["all"]["min_dim_e"], "{:.2f}"),
    ("in W's top-5% subspaces", lambda a, b: a["groups"]["all"]["all"]["in_both_5pct_e"], "{:.1%}"),
    ("if random", lambda a, b: a["groups"]["all"]["all"]["in_both_5pct_random_e"], "{:.2%}"),
    ("low-W enrich. fp32 (top 5%)", lambda a, b: a["groups"]["all"]["all"]["top_5pct_low_enrichment_n"], "{:.2f}"),
    ("principal enrich. fp32 (top 5%)", lambda a, b: a["groups"]["all"]["all"]["top_5pct_principal_enrichment_n"],
     "{:.2f}"),
    ("low-W enrich. bf16 (!=0)", lambda a, b: b["groups"]["all"]["all"]["atol_0_low_enrichment_n"], "{:.2f}"),
]


def _ms(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs)).rstrip('%')}"


def analysis_table(out: str | Path, rows: list[str], seeds: list[int]) -> str:
    """Markdown: one line per row, the columns above, mean ± sample std over the seeds found."""
    out = Path(out) / "analysis"
    lines = ["| row | seeds | " + " | ".join(c for c, _, _ in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        got = [(json.loads((out / f"{r}-s{s}" / "analysis.json").read_text()),
                json.loads((out / f"{r}-s{s}-bf16" / "analysis.json").read_text()))
               for s in seeds if (out / f"{r}-s{s}-bf16" / "analysis.json").exists()
               and (out / f"{r}-s{s}" / "analysis.json").exists()]
        cells = [_ms([f(a, b) for a, b in got], fmt) for _, f, fmt in COLUMNS]
        lines.append(f"| {r} | {len(got)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overlap_table(out: str | Path, pairs: list[tuple[str, str]], seeds: list[int]) -> str:
    """Markdown: Jaccard and coverage of two rows' update masks, against random masks of the same densities."""
    out = Path(out) / "analysis"
    lines = ["| masks | seeds | density | Jaccard | Jaccard if random | A in B | if random |",
             "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        got: list[dict[str, Any]] = [json.loads(p.read_text())["all"] for s in seeds
                                     if (p := out / f"compare-{a}-{b}-s{s}.json").exists()]
        lines.append(f"| {a} vs {b} | {len(got)} | {_ms([g['density_a'] for g in got], '{:.1%}')} | "
                     f"{_ms([g['jaccard'] for g in got], '{:.3f}')} | "
                     f"{_ms([g['jaccard_random'] for g in got], '{:.3f}')} | "
                     f"{_ms([g['coverage_a_in_b'] for g in got], '{:.1%}')} | "
                     f"{_ms([g['coverage_random_a_in_b'] for g in got], '{:.1%}')} |")
    return "\n".join(lines)
