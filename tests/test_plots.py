"""The training-curves plot shows what each method optimises (no line that copies another) and its signal."""

from __future__ import annotations

import json

from selfdistill.plots import plot_training, training_figure


def _run(tmp_path, rows, method):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "evals.jsonl").write_text(json.dumps({"step": 0, "kind": "before", "results": [
        {"task": "toy-math", "split": "test_id", "greedy": 0.5, "sampled": None}]}) + "\n")
    (tmp_path / "run_config.yaml").write_text(f"method: {method}\nseed: 0\n")
    return tmp_path


def labels(ax):
    return [l.get_label() for l in ax.get_lines()]


def test_sft_loss_is_not_drawn_twice_and_signal_panels_appear(tmp_path):
    (tmp_path / "a").mkdir()
    sft = _run(tmp_path / "a", [{"step": s, "loss": 1.0 / s, "nll": 1.0 / s, "grad_norm": 0.5} for s in (1, 2, 3)], "sft")
    fig = training_figure(sft)
    assert len(fig.axes) == 3 and labels(fig.axes[0]) == ["loss"] and "(sft)" in fig.axes[0].get_title()
    (tmp_path / "b").mkdir()
    opcod = _run(tmp_path / "b", [{"step": s, "loss": 2.0, "loss_student": 1.2, "loss_peer": 0.8, "grad_norm": 0.5,
                                   "grad_norm_peer": 0.1, "teacher_signal_frac": 0.25 * s, "reward_mean": 0.1}
                                  for s in (1, 2, 3)], "opcod")
    fig = training_figure(opcod)
    assert labels(fig.axes[0]) == ["loss", "loss_peer", "loss_student"]
    assert labels(fig.axes[1]) == ["grad_norm", "grad_norm_peer"]
    assert len(fig.axes) == 4 and labels(fig.axes[3]) == ["samples with a teacher signal", "mean reward"]
    assert plot_training(opcod).stat().st_size > 1000
