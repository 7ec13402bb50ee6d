"""The SafeSteer table from `scripts/safesteer_table.sh`'s evaluation files: mean (sample std, ddof=1)
over seeds and the paired per-item difference with the base model (95% bootstrap interval over seeds and
items).  python scripts/safesteer_summary.py results/tables/safesteer"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selfdistill.stats import paired_bootstrap, sample_std

ROWS = [("base", "base model"), ("steer", "steering at inference only"), ("safesteer", "SafeSteer (safety tokens)"),
        ("detached", "SafeSteer, log-ratio detached (ours)"),
        ("full", "full-vocabulary reverse KL"), ("sft", "SFT on refusal texts")]
COLS = [("refused/test_id/forbidden", "refusal, training categories"),
        ("refused/test_ood/forbidden", "refusal, held-out categories"),
        ("refused/test_id/harmless", "over-refusal (test_id)"),
        ("refused/test_ood/harmless", "over-refusal (test_ood)"),
        ("correct/toy-math/test_id", "math"), ("correct/toy-code/test_id", "code"),
        ("correct/toy-mcqa/test_id", "mcqa")]


def chosen_lr(folder: Path, row: str) -> str | None:
    choice = folder / "lr" / "choice.json"
    return json.loads(choice.read_text()).get(row) if choice.is_file() else None


def runs(folder: Path, row: str) -> list[dict]:
    single = folder / "eval" / f"{row}.json"
    if single.is_file():
        return [json.loads(single.read_text())]
    lr = chosen_lr(folder, row)
    return [json.loads(p.read_text()) for p in sorted((folder / "eval").glob(f"{row}-lr{lr}-s*.json"))]


def main(folder: Path) -> None:
    base = runs(folder, "base")[0]
    print("| row | lr | seeds | " + " | ".join(c for _, c in COLS) + " |")
    print("|---|---|---|" + "---|" * len(COLS))
    for row, label in ROWS:
        rs = runs(folder, row)
        if not rs:
            continue
        cells = []
        for key, _ in COLS:
            per_seed = [100 * sum(r["items"][key]) / max(1, len(r["items"][key])) for r in rs]
            mean = sum(per_seed) / len(per_seed)
            cell = f"{mean:.1f}" + (f" ({sample_std(per_seed):.1f})" if len(rs) > 1 else "")
            if row != "base":
                d = paired_bootstrap([r["items"][key] for r in rs], [base["items"][key]] * len(rs))
                cell += f"<br>{d.format()}"
            cells.append(cell)
        print(f"| {label} | {chosen_lr(folder, row) or '-'} | {len(rs)} | " + " | ".join(cells) + " |")
    n = {key: len(base["items"][key]) for key, _ in COLS}
    print("\nItems per column: " + ", ".join(f"{c} {n[k]}" for k, c in COLS) + ". Cells: mean over seeds "
          "(sample std, ddof=1), then the paired difference with the base model [95% bootstrap interval], "
          "in points. Greedy decoding throughout. Each trained row's learning rate was chosen on valid "
          "(lr/choice.md).")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/tables/safesteer"))
