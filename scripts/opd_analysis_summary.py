"""Print the OPD update analysis tables of a folder made by scripts/opd_analysis_table.sh (Markdown).

Usage: python scripts/opd_analysis_summary.py OUT [SEEDS, default 0,1,2]
"""

from __future__ import annotations

import sys
from pathlib import Path

from selfdistill.analysis.summary import analysis_table, overlap_table

if __name__ == "__main__":
    out = Path(sys.argv[1])
    seeds = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2").split(",")]
    print("**What each run changed** (Delta = after - the shipped toy model; `selfdistill analyze`; mean ± std "
          "over seeds)\n")
    print(analysis_table(out, ["opsd", "grpo", "sft"], seeds))
    print("\n**Update masks** (top 5% of coordinates by |Delta| per matrix; `selfdistill analyze compare`)\n")
    print(overlap_table(out, [("opsd", "grpo"), ("opsd", "sft"), ("grpo", "sft")], seeds))
    md = out / "results.md"
    if md.exists():
        print("\n**Accuracy** (`selfdistill table --preset opd-analysis`)\n")
        text = md.read_text()
        print(text[text.index("**greedy accuracy"):] if "**greedy accuracy" in text else text)
