"""Training-curve plots (PNG) from a run folder's metrics and evaluations."""

from __future__ import annotations

import json
import math
from pathlib import Path

from selfdistill.atomic import atomic_file

#: A method's own per-step signal, plotted when its log has it (share of the batch that carried a signal,
#: mean reward, ...): what tells a run that learns from one that has nothing to learn from.
SIGNALS = {
    "teacher_signal_frac": "samples with a teacher signal", "reward_mean": "mean reward",
    "groups_with_signal": "groups with a reward spread", "solved_frac": "prompts verified correct",
    "gate_open_frac": "peer gate open", "feedback_frac": "samples with feedback",
}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and
           not isinstance(r.get(key), bool) and math.isfinite(float(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training(run_dir: str | Path, out_name: str = "training_curves.png") -> Path:
    """``run_dir/out_name``: :func:`training_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = training_figure(run_dir)
    out = Path(run_dir) / out_name
    with atomic_file(out) as tmp:  # a kill mid-write never leaves half an image
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def training_figure(run_dir: str | Path):
    """What the method optimised per step (its loss, each trained model's, and a distinct token NLL), the
    gradient norm(s), the method's own signal (share of the batch with a teacher signal, reward, ...) when
    it logs one, and accuracy per split at every evaluation (before, periodic, after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    rows = _read_jsonl(run / "metrics.jsonl")
    evals = _read_jsonl(run / "evals.jsonl")
    method = ""
    if (run / "run_config.yaml").exists():
        import yaml

        method = str((yaml.safe_load((run / "run_config.yaml").read_text()) or {}).get("method", ""))
    signals = [k for k in SIGNALS if rows and any(k in r for r in rows)]
    fig, axes = plt.subplots(1, 4 if signals else 3, figsize=(20 if signals else 15, 4))
    loss_keys = ["loss"] + sorted(k for k in (rows[0] if rows else {}) if k.startswith("loss_"))
    for k in loss_keys:
        axes[0].plot(*_series(rows, k), label=k)
    xs, nll = _series(rows, "nll")
    if nll and any(abs(a - b) > 1e-6 for a, b in zip(nll, _series(rows, "loss")[1])):  # not a copy of the loss
        axes[0].plot(xs, nll, label="token NLL", alpha=0.7)
    axes[0].set(title=f"training loss{f' ({method})' if method else ''}", xlabel="step")
    axes[0].legend(fontsize=8)
    positive = False
    for k in ["grad_norm"] + sorted(k for k in (rows[0] if rows else {}) if k.startswith("grad_norm_")):
        s, v = _series(rows, k)
        axes[1].plot(s, v, label=k)
        positive = positive or any(x > 0 for x in v)
    # All zero (steps without signal): a log axis has nothing to show.
    axes[1].set(title="gradient norm (before clipping)", xlabel="step", yscale="log" if positive else "linear")
    axes[1].legend(fontsize=8)
    series: dict[str, list[tuple[int, float]]] = {}
    for e in evals:
        for r in e["results"]:
            val = r["greedy"] if r["greedy"] is not None else r["sampled"]
            if val is not None:
                series.setdefault(f"{r['task']} {r['split']}", []).append((e["step"], 100 * val))
    for name, pts in sorted(series.items()):
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    axes[2].set(title="accuracy % (greedy; sampled when greedy is off)", xlabel="step", ylim=(0, 100))
    if series:
        axes[2].legend(fontsize=7)
    if signals:
        for k in signals:
            axes[3].plot(*_series(rows, k), label=SIGNALS[k])
        axes[3].set(title="the method's signal per step", xlabel="step")
        axes[3].legend(fontsize=8)
    fig.tight_layout()
    return fig
