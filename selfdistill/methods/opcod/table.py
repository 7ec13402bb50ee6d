"""The OPCoD table (``selfdistill opcod table``): each model's accuracy on both domains, before and after.

Models A and B are the peers of ``selfdistill opcod make-peers``
(``PEERS/<domain>/model``). Rows (each a set of normal ``train`` runs,
``--out/runs/ROW[-x]-sSEED``, reused when finished):

- ``base``: A and B untrained;
- ``opcod``: co-distillation, both models updated in one run;
- ``oneway``: one-way distillation: A learns from a frozen B, and (another
  run) B from a frozen A;
- ``self``: both models updated, gate ``never``: each distils only from its
  own verified rollouts (no peer);
- ``sft``: single-model fine-tuning of each model on both domains (labels).

The table reports mean ± std over seeds per model and (domain, split), and
whether each row is a Pareto improvement over ``base``: no model loses on
any domain (mean over splits) and at least one gains.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError
from selfdistill.experiments import check_rows, note_if_changed, parse_common, run_config, summarise, train_row


class Run(NamedTuple):
    """One training run of a row: student label, peer label (or None), overrides, outputs per label."""

    suffix: str
    student: str
    peer: str | None
    overrides: dict[str, Any]
    outputs: dict[str, str]  # model label -> "student" | "peer"


_CO = {"method": "opcod", "onpolicy.samples_per_prompt": 4}
OPCOD_ROWS: dict[str, list[Run]] = {
    "base": [],
    "opcod": [Run("", "A", "B", dict(_CO), {"A": "student", "B": "peer"})],
    "oneway": [Run("a", "A", "B", {**_CO, "opcod.update_peer": False}, {"A": "student"}),
               Run("b", "B", "A", {**_CO, "opcod.update_peer": False}, {"B": "student"})],
    "self": [Run("", "A", "B", {**_CO, "opcod.gate": "never"}, {"A": "student", "B": "peer"})],
    "sft": [Run("a", "A", None, {"method": "sft"}, {"A": "student"}),
            Run("b", "B", None, {"method": "sft"}, {"B": "student"})],
}


@dataclass
class OPCoDTableConfig:
    """``selfdistill opcod table``: peers, rows, seeds and common settings."""

    peers: str = field(default="runs/peers", metadata={
        "help": "make-peers folder: model A = PEERS/<first domain>/model, B = PEERS/<second domain>/model."})
    domains: list[str] = field(default_factory=lambda: ["math", "code"], metadata={
        "help": "The two domains (A's, then B's); training and evaluation use both."})
    rows: list[str] = field(default_factory=list, metadata={
        "help": f"Rows to run (default all: {', '.join(OPCOD_ROWS)})."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds."})
    out: str = field(default="runs/opcod_table", metadata={"help": "Folder for the runs and the table."})
    common: list[str] = field(default_factory=list, metadata={
        "help": "Extra dotted overrides for every run, as key=value (e.g. steps=20)."})


def _models(tc: OPCoDTableConfig) -> dict[str, str]:
    if len(tc.domains) != 2:
        raise ConfigError(f"domains: expected two, got {tc.domains}")
    paths = {lab: str(Path(tc.peers) / d / "model") for lab, d in zip("AB", tc.domains)}
    for lab, p in paths.items():
        if not (Path(p) / "config.json").exists():
            raise ConfigError(f"peers: no model at {p}; run `selfdistill opcod make-peers --out {tc.peers}` first")
    return paths


def _config(tc: OPCoDTableConfig, run: Run, name: str, seed: int, models: dict[str, str]) -> TrainConfig:
    over = {"data.tasks": [f"toy-{d}" for d in tc.domains], "model.path": models[run.student],
            **({"opcod.peer": models[run.peer]} if run.peer else {}), **parse_common(tc.common), **run.overrides}
    tag = f"{name}-{run.suffix}" if run.suffix else name
    return run_config(over, seed, Path(tc.out) / "runs" / f"{tag}-s{seed}", eval_after=True)


def _base_eval(tc: OPCoDTableConfig, seed: int, models: dict[str, str]) -> dict[str, list[dict]]:
    from selfdistill.evaluate import evaluate, results_to_json
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import build_tasks

    cfg = _config(tc, Run("", "A", None, {}, {}), "base", seed, models)
    out = {}
    for lab, path in models.items():
        model, tok = load_model(replace(cfg.model, path=path))
        out[lab] = results_to_json(evaluate(model, tok, build_tasks(cfg.data), cfg.eval,
                                            cfg.model.system_prompt or None))
    return out


def run_opcod_table(tc: OPCoDTableConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or reuse) every row x seed; write results.md / results.json."""
    models = _models(tc)
    names = check_rows(tc.rows, OPCOD_ROWS, "an OPCoD row")
    out = Path(tc.out)
    results: dict[str, list[dict[str, Any]]] = {}  # "row/label" -> per seed {"after": [...]}
    for name in names:
        for seed in tc.seeds:
            if name == "base":
                done = out / "runs" / f"base-s{seed}" / "results.json"
                if not done.exists():
                    log(f"== base seed {seed}")
                    done.parent.mkdir(parents=True, exist_ok=True)
                    done.write_text(json.dumps(_base_eval(tc, seed, models), indent=2))
                for lab, res in json.loads(done.read_text()).items():
                    results.setdefault(f"base/{lab}", []).append({"after": res, "wall_s": 0.0})
                continue
            for run in OPCOD_ROWS[name]:
                cfg = _config(tc, run, name, seed, models)
                run_dir = Path(cfg.output_dir)
                if not (run_dir / "results.json").exists():
                    log(f"== {name}{'-' + run.suffix if run.suffix else ''} seed {seed}")
                    train_row(cfg)
                else:
                    note_if_changed(run_dir.name, seed, run_dir, cfg, log)
                main = json.loads((run_dir / "results.json").read_text())
                for lab, which in run.outputs.items():
                    after = main["after"] if which == "student" else \
                        json.loads((run_dir / "peer_results.json").read_text())["after"]
                    results.setdefault(f"{name}/{lab}", []).append({"after": after, "wall_s": main.get("wall_s", 0)})
    table = summarise(results)
    md = format_opcod_markdown(table, tc)
    (out / "results.json").write_text(json.dumps({"seeds": tc.seeds, "models": models, "common": tc.common,
                                                  "rows": names, "table": table}, indent=2) + "\n")
    (out / "results.md").write_text(md)
    log(md)
    return out / "results.md"


def _domain_mean(row: dict[str, Any], domain: str, mode: str) -> float | None:
    vals = [c[mode]["mean"] for k, c in row["cells"].items() if k.startswith(f"toy-{domain}/") and mode in c]
    return statistics.fmean(vals) if vals else None


def pareto(table: dict[str, Any], row: str, domains: list[str], mode: str = "greedy") -> str:
    """'yes' if no model of ``row`` is below base on any domain and one is above; 'no'; '-' if unknown."""
    deltas = []
    for lab in "AB":
        mine, base = table.get(f"{row}/{lab}"), table.get(f"base/{lab}")
        if mine is None or base is None:
            continue
        for d in domains:
            a, b = _domain_mean(mine, d, mode), _domain_mean(base, d, mode)
            if a is None or b is None:
                return "-"
            deltas.append(a - b)
    if not deltas or row == "base":
        return "-"
    return "yes" if min(deltas) >= 0 and max(deltas) > 0 else "no"


def format_opcod_markdown(table: dict[str, Any], tc: OPCoDTableConfig) -> str:
    keys = sorted({k for row in table.values() for k in row["cells"]})
    rows = sorted({n.split("/")[0] for n in table}, key=lambda n: list(OPCOD_ROWS).index(n))
    out = []
    for mode in ("greedy", "sampled"):
        if not any(mode in c for row in table.values() for c in row["cells"].values()):
            continue
        head = ["row", "model"] + [k.replace("toy-", "").replace("/test_", " ") for k in keys] + ["Pareto vs base"]
        lines = [f"**{mode} accuracy %** (mean ± std over seeds {', '.join(map(str, tc.seeds))}; A = "
                 f"{tc.domains[0]} peer, B = {tc.domains[1]} peer)", "",
                 "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for name in rows:
            for lab in "AB":
                row = table.get(f"{name}/{lab}")
                if row is None:
                    continue
                cells = [row["cells"].get(k, {}).get(mode) for k in keys]
                cells = [f"{v['mean']:.1f} ± {v['std']:.1f}" if v else "-" for v in cells]
                lines.append("| " + " | ".join([name, lab] + cells + [pareto(table, name, tc.domains, mode)]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"
