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

A preset of the one table runner (:func:`selfdistill.experiments.run_preset`).
The table reports mean ± std over seeds per model and (domain, split), and
whether each row is a Pareto improvement over ``base``: no model loses on
any domain (mean over splits) and at least one gains.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from selfdistill.config_io import ConfigError
from selfdistill.experiments import Preset, Run, parse_common, run_preset

_CO = {"method": "opcod", "onpolicy.samples_per_prompt": 4}
#: Rows: the runs of each, as (folder suffix, student label, peer label or None, overrides, label -> output).
_ROWS: dict[str, list[tuple[str, str, str | None, dict[str, Any], dict[str, str]]]] = {
    "base": [],
    "opcod": [("", "A", "B", dict(_CO), {"A": "model", "B": "peer"})],
    "oneway": [("a", "A", "B", {**_CO, "opcod.update_peer": False}, {"A": "model"}),
               ("b", "B", "A", {**_CO, "opcod.update_peer": False}, {"B": "model"})],
    "self": [("", "A", "B", {**_CO, "opcod.gate": "never"}, {"A": "model", "B": "peer"})],
    "sft": [("a", "A", None, {"method": "sft"}, {"A": "model"}),
            ("b", "B", None, {"method": "sft"}, {"B": "model"})],
}
OPCOD_ROWS = list(_ROWS)


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


def preset(tc: OPCoDTableConfig | None = None) -> Preset:
    """The OPCoD table as a preset of the one table runner: every row's runs name the model each trains
    (A or B) and its peer; the table keys are ``ROW/A`` and ``ROW/B``."""
    tc = tc or OPCoDTableConfig()
    models = _models(tc)
    rows = {name: [Run({"model.path": models[student], **({"opcod.peer": models[peer]} if peer else {}), **over},
                       suffix, outputs) for suffix, student, peer, over, outputs in runs]
            for name, runs in _ROWS.items()}
    return Preset("opcod", rows, common={"data.tasks": [f"toy-{d}" for d in tc.domains]}, base_models=models,
                  format=lambda table, seeds: format_opcod_markdown(table, OPCoDTableConfig(
                      tc.peers, tc.domains, tc.rows, list(seeds), tc.out, tc.common)))


def run_opcod_table(tc: OPCoDTableConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or reuse) every row x seed; write results.md / results.json."""
    return run_preset(preset(tc), tc.rows, tc.seeds, tc.out, parse_common(tc.common), log)


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
    rows = sorted({n.split("/")[0] for n in table}, key=OPCOD_ROWS.index)
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
