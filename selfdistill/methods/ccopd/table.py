"""The CCOPD table (``selfdistill ccopd table``): trained on toy math only, FULL / SHARDED / CONCAT after.

Each row x seed is a normal ``train`` run (``--out/runs/ROW-sSEED``, reused
when finished) followed by :func:`~selfdistill.methods.ccopd.evaluate.evaluate_settings`
on every evaluation task (math in-domain; code and multiple-choice zero-shot)
in every setting; ``base`` is the untrained model. ``results.md`` holds mean
± std over seeds per (row, domain, split) and setting, and the relative
SHARDED gain and FULL change of each row against ``base``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from selfdistill.config import TrainConfig
from selfdistill.experiments import check_rows, note_if_changed, parse_common, run_config, summarise, train_row

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


def row_config(name: str, overrides: dict[str, Any] | None, seed: int, out: Path, tc: CCOPDTableConfig,
               method: str = "ccopd") -> TrainConfig:
    """The training config of one row and seed (evaluation is done by the table, not the run)."""
    over = {"method": method, "data.tasks": list(tc.train_tasks), **parse_common(tc.common), **(overrides or {})}
    return run_config(over, seed, out / "runs" / f"{name}-s{seed}", eval_after=False)


def _evaluate(model_path: str, cfg: TrainConfig, tc: CCOPDTableConfig) -> list[dict]:
    from selfdistill.methods.ccopd.evaluate import evaluate_settings
    from selfdistill.evaluate import results_to_json
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import build_tasks

    model, tok = load_model(replace(cfg.model, path=model_path))
    tasks = build_tasks(replace(cfg.data, tasks=list(tc.eval_tasks)))
    res = evaluate_settings(model, tok, tasks, cfg.eval, cfg.ccopd, tc.settings, cfg.model.system_prompt or None)
    return results_to_json(res)


def run_ccopd_table(tc: CCOPDTableConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or reuse) every row x seed, evaluate in every setting, write results.md / results.json."""
    names = check_rows(tc.rows, CCOPD_ROWS, "a CCOPD row")
    out = Path(tc.out)
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        for seed in tc.seeds:
            cfg = row_config(name, CCOPD_ROWS[name], seed, out, tc)
            run_dir = Path(cfg.output_dir)
            done = run_dir / "ccopd_eval.json"
            if done.exists() and CCOPD_ROWS[name] is not None:
                note_if_changed(name, seed, run_dir, cfg, log)
            if not done.exists():
                log(f"== {name} seed {seed}")
                t0 = time.time()
                model_path = cfg.model.path
                if CCOPD_ROWS[name] is not None:
                    if not (run_dir / "model" / "config.json").exists():
                        train_row(cfg)
                    model_path = str(run_dir / "model")
                after = _evaluate(model_path, cfg, tc)
                run_dir.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps({"row": name, "seed": seed, "wall_s": time.time() - t0,
                                            "after": after}, indent=2))
            results.setdefault(name, []).append(json.loads(done.read_text()))
    table = summarise(results)
    md = format_ccopd_markdown(table, tc)
    (out / "results.json").write_text(json.dumps({"seeds": tc.seeds, "rows": {n: CCOPD_ROWS[n] for n in names},
                                                  "common": tc.common, "table": table}, indent=2) + "\n")
    (out / "results.md").write_text(md)
    log(md)
    return out / "results.md"


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
