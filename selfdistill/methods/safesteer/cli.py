"""``selfdistill safesteer direction | tokens | eval``: SafeSteer's tools on the command line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from selfdistill.config import DataConfig, ModelConfig
from selfdistill.config_io import ConfigError, add_flags, from_args
from selfdistill.evaluate import EvalConfig
from selfdistill.method_configs import SafeSteerConfig

_HELP = "SafeSteer tools: the refusal direction, the safety tokens, the safety evaluation."


_REFUSAL_HELP = "The refusal task: toy-refusal, or refusal:HARMFUL_FILE,HARMLESS_FILE (JSONL / JSON / CSV)."


@dataclass
class DirectionRunConfig:
    """``selfdistill safesteer direction``: find and save a model's refusal direction."""

    model: ModelConfig = field(default_factory=ModelConfig)
    refusal: str = field(default="toy-refusal", metadata={"help": _REFUSAL_HELP})
    data: DataConfig = field(default_factory=DataConfig)
    safesteer: SafeSteerConfig = field(default_factory=SafeSteerConfig)
    out: str = field(default="safesteer", metadata={"help": "Folder for direction.safetensors/.json/.png."})


@dataclass
class TokensRunConfig:
    """``selfdistill safesteer tokens``: choose and save the safety tokens of a steered model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    refusal: str = field(default="toy-refusal", metadata={"help": _REFUSAL_HELP})
    data: DataConfig = field(default_factory=DataConfig)
    safesteer: SafeSteerConfig = field(default_factory=SafeSteerConfig)
    out: str = field(default="safesteer/tokens.json", metadata={"help": "Output JSON."})
    seed: int = field(default=0, metadata={"help": "Seed of the steered samples."})


def _capability() -> list[str]:
    return ["toy-math", "toy-code", "toy-mcqa"]


def _safety_eval_cfg() -> EvalConfig:
    return EvalConfig(splits=["test_id", "test_ood"], samples=0, max_items=500)


@dataclass
class SafetyEvalConfig:
    """``selfdistill safesteer eval``: refusal, over-refusal and capability of a model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    refusal: str = field(default="toy-refusal", metadata={"help": _REFUSAL_HELP})
    data: DataConfig = field(default_factory=DataConfig)
    capability: list[str] = field(default_factory=_capability, metadata={
        "help": "Task specs whose greedy accuracy measures the capability kept (empty: none)."})
    capability_splits: list[str] = field(default_factory=lambda: ["test_id"], metadata={
        "help": "Splits of the capability tasks."})
    eval: EvalConfig = field(default_factory=_safety_eval_cfg)
    steer: str = field(default="", metadata={
        "help": "A direction folder: add it (coeff x) at its block while generating (steering at inference)."})
    coeff: float = field(default=0.0, metadata={
        "help": "Steering coefficient with --steer (0 = the one the direction was selected with)."})
    json_out: str = field(default="", metadata={"help": "Also write the results (with per-item outcomes) here."})


def add_commands(sub) -> None:
    p = sub.add_parser("safesteer", help=_HELP)
    ssub = p.add_subparsers(dest="safesteer_command", required=True)
    for name, cls, help_ in (("direction", DirectionRunConfig, "Find the refusal direction; save and plot it."),
                             ("tokens", TokensRunConfig, "Choose the safety tokens of the steered model."),
                             ("eval", SafetyEvalConfig, "Refusal, over-refusal and capability of a model.")):
        c = ssub.add_parser(name, help=help_)
        c.add_argument("--config", help="YAML file with settings (flags override it).")
        add_flags(c, cls)




def _refusal_task(spec: str, data: DataConfig):
    from selfdistill.methods.safesteer import refusal_task
    from selfdistill.tasks.registry import build_task

    return refusal_task([build_task(spec, data)])


def run(ns) -> int:
    from selfdistill.models import load_model

    cmd = ns.safesteer_command
    cls = {"direction": DirectionRunConfig, "tokens": TokensRunConfig, "eval": SafetyEvalConfig}[cmd]
    cfg = from_args(cls, ns)
    system = cfg.model.system_prompt or None
    if cmd == "direction":
        from selfdistill.methods.safesteer import find_direction
        from selfdistill.methods.safesteer.direction import plot_direction

        task = _refusal_task(cfg.refusal, cfg.data)
        model, tok = load_model(cfg.model)
        d = find_direction(model, tok, task, cfg.safesteer, system)
        d.save(cfg.out)
        plot_direction(d, Path(cfg.out) / "direction.png")
        print(f"wrote {cfg.out}/direction.safetensors, direction.json, direction.png")
        return 0
    if cmd == "tokens":
        from selfdistill.methods.safesteer import find_tokens
        from selfdistill.methods.safesteer.direction import load_direction

        if not cfg.safesteer.direction:
            raise ConfigError("safesteer tokens: pass --safesteer.direction DIR "
                              "(from `selfdistill safesteer direction`)")
        task = _refusal_task(cfg.refusal, cfg.data)
        d = load_direction(cfg.safesteer.direction)
        model, tok = load_model(cfg.model)
        toks = find_tokens(model, tok, task, d, cfg.safesteer, system, seed=cfg.seed)
        toks.save(cfg.out)
        print(f"wrote {cfg.out}: " + " ".join(repr(t) for t in toks.info["text"]))
        return 0
    from selfdistill.methods.safesteer.direction import load_direction
    from selfdistill.methods.safesteer.evaluate import format_safety, safety_eval
    from selfdistill.tasks.registry import build_task

    task = _refusal_task(cfg.refusal, cfg.data)
    capability = [build_task(spec, cfg.data) for spec in cfg.capability if spec]
    model, tok = load_model(cfg.model)
    d = load_direction(cfg.steer) if cfg.steer else None
    from selfdistill.methods.safesteer import steering_coeff

    coeff = cfg.coeff or (steering_coeff(d) if d is not None else 1.0)
    res = safety_eval(model, tok, task, capability, cfg.eval, system, d, coeff, cfg.capability_splits)
    print(format_safety(res))
    if cfg.json_out:
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_out).write_text(json.dumps(res, indent=1) + "\n")
    return 0
