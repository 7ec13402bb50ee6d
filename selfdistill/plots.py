"""Training-curve plots (PNG) from a run folder's metrics and evaluations."""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.atomic import atomic_file


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def plot_training(run_dir: str | Path, out_name: str = "training_curves.png") -> Path:
    """Loss and grad norm per step, and accuracy per split at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    rows = _read_jsonl(run / "metrics.jsonl")
    evals = _read_jsonl(run / "evals.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss"] for r in rows], label="loss")
    if rows and "nll" in rows[0]:
        axes[0].plot(steps, [r["nll"] for r in rows], label="token NLL", alpha=0.7)
    axes[0].set(title="training loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["grad_norm"] for r in rows])
    positive = any(r["grad_norm"] > 0 for r in rows)  # all zero (steps without signal): a log axis has nothing
    axes[1].set(title="gradient norm (before clipping)", xlabel="step", yscale="log" if positive else "linear")
    series: dict[str, list[tuple[int, float]]] = {}
    for e in evals:
        for r in e["results"]:
            val = r["greedy"] if r["greedy"] is not None else r["sampled"]
            if val is not None:
                series.setdefault(f"{r['task']} {r['split']}", []).append((e["step"], 100 * val))
    for name, pts in sorted(series.items()):
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    axes[2].set(title="accuracy % (greedy)", xlabel="step")
    if series:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    out = run / out_name
    with atomic_file(out) as tmp:  # a kill mid-write never leaves half an image
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
