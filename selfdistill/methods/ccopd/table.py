"""The CCOPD table (``selfdistill ccopd table``): trained on toy math only, FULL / SHARDED / CONCAT after.

A preset of the one table runner (:func:`selfdistill.experiments.run_preset`):
each row x seed is a normal ``train`` run (``--out/runs/ROW-sSEED``, reused
when finished) followed by :func:`~selfdistill.methods.ccopd.evaluate.evaluate_settings`
on every evaluation task (math in-domain; code and multiple-choice zero-shot)
in every setting; ``base`` is the untrained model. ``results.md`` holds mean
± std over seeds per (row, domain, split) and setting, and the relative
SHARDED gain and FULL change of each row against ``base``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from selfdistill.config import TrainConfig
from selfdistill.experiments import Preset, Run, parse_common, run_preset

#: Rows: name -> dotted overrides on top of ``method=ccopd`` (None = the untrained model).
CCOPD_ROWS: dict[str, dict[str, Any] | None] = {
    "base": None,
    "ccopd": {},
    "ccopd-allturns": {"ccopd.turns": "all"},
}


@dataclass
class CCOPDTableConfig:
    """``selfdistill ccopd table``: rows, seeds, tasks and common settings."""

    rows: list[str] = field(default_factory=list, metadata={
        "help": f"Rows to run (default all: {', '.join(CCOPD_ROWS)})."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds."})
    out: str = field(default="runs/ccopd_table", metadata={"help": "Folder for the runs and the table."})
    train_tasks: list[str] = field(default_factory=lambda: ["toy-math"], metadata={"help": "Training tasks."})
    eval_tasks: list[str] = field(default_factory=lambda: ["toy-math", "toy-code", "toy-mcqa"], metadata={
        "help": "Evaluation tasks (the ones not trained on are zero-shot)."})
    settings: list[str] = field(default_factory=lambda: ["full", "sharded", "concat"], metadata={
        "help": "Evaluation settings."})
    common: list[str] = field(default_factory=list, metadata={
        "help": "Extra dotted overrides for every row, as key=value (e.g. steps=20)."})


def preset(tc: CCOPDTableConfig | None = None) -> Preset:
    """The CCOPD table as a preset of the one table runner: trained on ``train_tasks``, every model
    evaluated by the table in every setting on ``eval_tasks``."""
    tc = tc or CCOPDTableConfig()

    def evaluate(model_path: str, cfg: TrainConfig) -> list[dict]:
        from selfdistill.evaluate import results_to_json
        from selfdistill.methods.ccopd.evaluate import evaluate_settings
        from selfdistill.models import load_model
        from selfdistill.tasks.registry import build_tasks

        model, tok = load_model(replace(cfg.model, path=model_path))
        tasks = build_tasks(replace(cfg.data, tasks=list(tc.eval_tasks)))
        res = evaluate_settings(model, tok, tasks, cfg.eval, cfg.ccopd, tc.settings, cfg.model.system_prompt or None)
        return results_to_json(res)

    rows = {n: [] if over is None else [Run(dict(over))] for n, over in CCOPD_ROWS.items()}
    return Preset("ccopd", rows, common={"method": "ccopd", "data.tasks": list(tc.train_tasks)},
                  top={"eval_after": False}, evaluate=evaluate, eval_file="ccopd_eval.json",
                  format=lambda table, seeds: format_ccopd_markdown(table, replace(tc, seeds=list(seeds))))


def run_ccopd_table(tc: CCOPDTableConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or reuse) every row x seed, evaluate in every setting, write results.md / results.json."""
    return run_preset(preset(tc), tc.rows, tc.seeds, tc.out, parse_common(tc.common), log)


def format_ccopd_markdown(table: dict[str, Any], tc: CCOPDTableConfig) -> str:
    """Per mode: rows (row, task, split) x settings; then each row's relative change against base."""
    keys = sorted({k for row in table.values() for k in row["cells"]})
    pairs = sorted({(k.split("@")[0], k.split("/")[-1]) for k in keys})  # (task, split)
    out = []
    for mode in ("greedy", "sampled"):
        if not any(mode in c for row in table.values() for c in row["cells"].values()):
            continue
        head = ["row", "task", "split"] + list(tc.settings)
        lines = [f"**{mode} accuracy %** (mean ± std over seeds {', '.join(map(str, tc.seeds))}; trained on "
                 f"{', '.join(tc.train_tasks)})", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---" for _ in head) + "|"]
        for name, row in table.items():
            for task, split in pairs:
                cells = []
                for s in tc.settings:
                    v = row["cells"].get(f"{task}@{s}/{split}", {}).get(mode)
                    cells.append(f"{v['mean']:.1f} ± {v['std']:.1f}" if v else "-")
                lines.append("| " + " | ".join([name, task, split] + cells) + " |")
        if "base" in table:
            lines += ["", "| row | setting | mean acc. | vs base (relative) |", "|---|---|---|---|"]
            for name, row in table.items():
                for s in tc.settings:
                    mine = _mean(row, s, mode)
                    base = _mean(table["base"], s, mode)
                    rel = "-" if name == "base" or mine is None or not base else f"{100 * (mine - base) / base:+.1f}%"
                    lines.append(f"| {name} | {s} | {'-' if mine is None else f'{mine:.1f}'} | {rel} |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _mean(row: dict[str, Any], setting: str, mode: str) -> float | None:
    vals = [c[mode]["mean"] for k, c in row["cells"].items() if f"@{setting}/" in k and mode in c]
    return statistics.fmean(vals) if vals else None
