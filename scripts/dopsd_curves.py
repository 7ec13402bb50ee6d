"""Accuracy against optimizer steps for a d-OPSD table folder (``selfdistill table --preset d-opsd --out DIR``):
the mean over seeds of each row's greedy accuracy at every evaluation (step 0 = the base row), as Markdown,
and a plot ``DIR/curves.png``.

    python scripts/dopsd_curves.py results/tables/d-opsd
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def curves(folder: Path) -> dict[str, dict[str, dict[int, list[float]]]]:
    """row -> split -> step -> accuracy (%) per seed."""
    out: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    base = sorted((folder / "runs").glob("base-s*/results.json"))
    for f in sorted((folder / "runs").glob("*-s*/evals.jsonl")):
        row = f.parent.name.rsplit("-s", 1)[0]
        for line in f.read_text().splitlines():
            e = json.loads(line)
            for r in e["results"]:
                out[row][f"{r['task']} {r['split']}"][e["step"]].append(100 * r["greedy"])
    for f in base:
        for r in json.loads(f.read_text())["after"]:
            for row in list(out):
                out[row][f"{r['task']} {r['split']}"][0].append(100 * r["greedy"])
    return out


def main(folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(Path(folder))
    splits = sorted({s for row in data.values() for s in row})
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        print(f"\n**{split}**, greedy accuracy % (mean over seeds, n seeds in brackets)\n")
        steps = sorted({st for row in data.values() for st in row[split]})
        print("| row | " + " | ".join(f"step {s}" for s in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for row in sorted(data):
            pts = data[row][split]
            cells = [f"{statistics.mean(pts[s]):.1f} ({len(pts[s])})" if pts.get(s) else "-" for s in steps]
            print(f"| {row} | " + " | ".join(cells) + " |")
            xs = [s for s in steps if pts.get(s)]
            ax.plot(xs, [statistics.mean(pts[s]) for s in xs], marker="o", label=row)
        ax.set(title=split, xlabel="optimizer step", ylabel="greedy accuracy %")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(folder) / "curves.png", dpi=100)
    print(f"\nplot: {Path(folder) / 'curves.png'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/tables/d-opsd")
