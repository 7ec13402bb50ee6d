"""``selfdistill opcod make-peers``: two variants of one model, each stronger in a different domain.

Briefly fine-tunes the base model (``sft`` on reference solutions) on one toy
domain per variant: ``OUT/math/model`` and ``OUT/code/model`` by default, the
pair OPCoD co-distils. Each variant is evaluated on every domain so the
specialisation is visible (``OUT/peers.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError, from_dict, set_dotted, to_dict
from selfdistill.experiments import note_if_changed, parse_common, train_row


@dataclass
class PeersConfig:
    """``selfdistill opcod make-peers``: which base, domains and how long."""

    out: str = field(default="runs/peers", metadata={"help": "Folder: OUT/<domain>/model per peer."})
    base: str = field(default="toy", metadata={"help": "The model both peers start from."})
    domains: list[str] = field(default_factory=lambda: ["math", "code"], metadata={
        "help": "One peer per toy domain, fine-tuned on that domain only."})
    steps: int = field(default=100, metadata={"help": "SFT steps per peer."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per step."})
    lr: float = field(default=3e-4, metadata={
        "help": "SFT learning rate (3e-4 x 100 steps: the first setting that made the toy peers differ; "
                "1e-4 x 30 left them equal, 1e-3 x 60 hurt both; docs/methods/ccopd_opcod.md)."})
    evaluate: bool = field(default=True, metadata={"help": "Evaluate base and peers on every domain."})
    common: list[str] = field(default_factory=list, metadata={
        "help": "Extra dotted overrides for the SFT runs, as key=value."})


def peer_config(pc: PeersConfig, domain: str) -> TrainConfig:
    data = to_dict(TrainConfig())
    data.update({"method": "sft", "steps": pc.steps, "batch_size": pc.batch_size, "eval_before": False,
                 "eval_after": False, "output_dir": str(Path(pc.out) / domain)})
    data["micro_batch_size"] = min(data["micro_batch_size"], pc.batch_size)
    data["model"]["path"] = pc.base
    data["data"]["tasks"] = [f"toy-{domain}"]
    data["optim"]["lr"] = pc.lr
    for k, v in parse_common(pc.common).items():
        set_dotted(data, k, v)
    return from_dict(TrainConfig, data)


def make_peers(pc: PeersConfig, log: Callable[[str], None] = print) -> dict[str, str]:
    """Train (or reuse) one SFT peer per domain; returns {domain: model folder}."""
    if len(pc.domains) < 2:
        raise ConfigError("domains: name at least two (one peer per domain)")
    paths: dict[str, str] = {}
    for d in pc.domains:
        cfg = peer_config(pc, d)
        model = Path(cfg.output_dir) / "model"
        if not (model / "config.json").exists():
            log(f"== peer {d}: sft on toy-{d} for {pc.steps} steps")
            train_row(cfg)
        else:
            note_if_changed(f"peer {d}", cfg.seed, Path(cfg.output_dir), cfg, log)
        paths[d] = str(model)
    if pc.evaluate:
        rows = {"base": _eval(pc.base, pc)} | {f"{d}-peer": _eval(p, pc) for d, p in paths.items()}
        md = _markdown(rows)
        (Path(pc.out) / "peers.md").write_text(md)
        (Path(pc.out) / "peers.json").write_text(json.dumps(rows, indent=2) + "\n")
        log(md)
    a, b = paths[pc.domains[0]], paths[pc.domains[1]]
    log(f"peers ready; co-distil them with:\n  selfdistill train --method opcod --model.path {a} "
        f"--opcod.peer {b} --data.tasks {','.join('toy-' + d for d in pc.domains)}")
    return paths


def _eval(path: str, pc: PeersConfig) -> list[dict[str, Any]]:
    from selfdistill.evaluate import evaluate, results_to_json
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import build_tasks

    cfg = peer_config(pc, pc.domains[0])
    model, tok = load_model(replace(cfg.model, path=path))
    tasks = build_tasks(replace(cfg.data, tasks=[f"toy-{d}" for d in pc.domains]))
    return results_to_json(evaluate(model, tok, tasks, cfg.eval, cfg.model.system_prompt or None))


def _markdown(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Greedy and sampled accuracy per model and (task, split), one table each."""
    keys = [f"{r['task']}/{r['split']}" for r in next(iter(rows.values()))]
    out = []
    for mode in ("greedy", "sampled"):
        lines = [f"**{mode} accuracy %**", "", "| model | " + " | ".join(keys) + " |",
                 "|---" * (len(keys) + 1) + "|"]
        for name, res in rows.items():
            cells = ["-" if r[mode] is None else f"{100 * r[mode]:.1f}" for r in res]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"
