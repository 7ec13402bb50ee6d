"""The one table runner: rows x seeds of training runs, one command, for every table.

``selfdistill table --preset spd`` (and ``selfdistill ccopd table`` /
``selfdistill opcod table``, which build their preset from their own flags)
trains every row of the preset for every seed (each a normal ``train`` run, in
``--out/runs/ROW-sSEED``), reads or makes the after-training accuracies, and
writes ``results.md`` / ``results.json`` with mean +- sample standard
deviation (ddof = 1) over seeds per domain and split, wall time, and for each
row a paired per-item comparison with its baseline (``Preset.baselines``;
``base`` by default): the mean difference with a 95% bootstrap interval over
seeds and items (:mod:`selfdistill.stats`). The ``base`` row is the untrained
model evaluated with each seed's evaluation settings. Rows are ordinary flag
overrides (:class:`Run`); a row may be several runs and a run may train
several models (OPCoD). A method's own presets live in its folder
(``selfdistill/methods/<name>/table.py``). Finished runs are reused, so an
interrupted table continues where it stopped, and every reused run whose
saved settings differ from the row's says so.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError, flatten, from_dict, set_dotted, to_dict

@dataclass(frozen=True)
class Run:
    """One training run of a table row: its overrides, its folder's suffix, and which trained model is which.

    ``outputs`` maps a label to ``"model"`` (the run's own model) or a trainee's name (e.g. OPCoD's ``"peer"``,
    whose results the method writes to ``<name>_results.json``); label ``""`` is the row itself.
    """

    overrides: dict[str, Any] = field(default_factory=dict)
    suffix: str = ""
    outputs: dict[str, str] = field(default_factory=lambda: {"": "model"})


@dataclass
class Preset:
    """A table: rows (each a list of runs; an empty list is the untrained model), baselines, how to evaluate.

    Presets of one method live in its folder (``selfdistill/methods/<name>/table.py``, listed in
    :data:`PRESET_MODULES`); comparisons across methods live here (:data:`PRESETS`).
    """

    name: str
    rows: dict[str, list[Run]]
    #: The row each row is compared with (rows not named: ``base``).
    baselines: dict[str, str] = field(default_factory=dict)
    #: Dotted overrides under every run (the command's ``--common`` and then the row's own win over these).
    common: dict[str, Any] = field(default_factory=dict)
    #: Top-level settings of every training run (e.g. ``eval_after=False`` when the table evaluates).
    top: dict[str, Any] = field(default_factory=dict)
    #: The untrained row's models: label -> model path (default: the settings' ``model.path``, label ``""``).
    base_models: dict[str, str] = field(default_factory=dict)
    #: When set, the table evaluates every model itself: (model path, run settings) -> per-split results.
    evaluate: Callable[[str, TrainConfig], list[dict]] | None = None
    #: Where a trained run's table evaluation is cached (with ``evaluate``).
    eval_file: str = "table_eval.json"
    #: (table, seeds) -> Markdown; default :func:`format_markdown`.
    format: Callable[[dict[str, Any], list[int]], str] | None = None


def single_runs(spec: dict[str, dict[str, Any]]) -> dict[str, list[Run]]:
    """Rows given as name -> overrides of one run (``base`` = the untrained model)."""
    return {name: ([] if name == "base" else [Run(dict(over))]) for name, over in spec.items()}


#: Comparisons across methods (one method's own presets are in its folder: PRESET_MODULES).
PRESETS: dict[str, Preset] = {
    "privileged": Preset("privileged", single_runs({
        "base": {},
        "sft": {"method": "sft"},
        "opsd": {"method": "opsd"},
        "sdft": {"method": "sdft", "distill.kind": "reverse_kl", "teacher.kind": "ema"},
        # 8 prompts x 4 samples: the same 32 sequences per step as the other rows.
        "sdpo": {"method": "sdpo", "batch_size": 8, "onpolicy.samples_per_prompt": 4, "distill.topk": 20,
                 "distill.is_clip": 2.0, "teacher.kind": "ema"},
    })),
    # Feedback family (docs/methods/sgsd_critique.md). Group methods: 8 prompts x 4 samples, the same 32
    # sequences per step as the one-sample rows.
    "feedback": Preset("feedback", single_runs({
        "base": {},
        "grpo": {"method": "grpo", "batch_size": 8, "onpolicy.samples_per_prompt": 4},
        "opsd": {"method": "opsd"},
        "sgsd": {"method": "sgsd", "batch_size": 8, "onpolicy.samples_per_prompt": 4},
        "critique-reward": {"method": "critique", "critique.feedback": "reward"},
        "critique-reference": {"method": "critique", "critique.feedback": "reference"},
        "critique-step": {"method": "critique", "critique.feedback": "step"},
    })),
    # What OPD changes in the weights (docs/methods/opd_analysis.md; scripts/opd_analysis_table.sh): OPSD
    # against GRPO and SFT at equal steps, then OPSD retrained on coordinate masks ({out} and {seed} are
    # this table's folder and the row's seed; the masks come from `selfdistill analyze mask`).
    "opd-analysis": Preset("opd-analysis", single_runs({
        "base": {},
        "sft": {"method": "sft"},
        "opsd": {"method": "opsd"},
        "grpo": {"method": "grpo", "batch_size": 8, "onpolicy.samples_per_prompt": 4},
        "opsd-ownmask": {"method": "opsd", "optim.mask": "{out}/masks/opsd-s{seed}.safetensors"},
        "opsd-randmask": {"method": "opsd", "optim.mask": "{out}/masks/opsd-s{seed}-random.safetensors"},
        "opsd-grpomask": {"method": "opsd", "optim.mask": "{out}/masks/grpo-s{seed}.safetensors"},
    }), baselines={"opsd-ownmask": "opsd", "opsd-randmask": "opsd-ownmask", "opsd-grpomask": "opsd-ownmask"}),
}

#: A method's own presets: name -> module whose ``preset()`` returns it (imported only when used).
PRESET_MODULES: dict[str, str] = {"spd": "selfdistill.methods.spd.table", "ccopd": "selfdistill.methods.ccopd.table",
                                  "opcod": "selfdistill.methods.opcod.table",
                                  "d-opsd": "selfdistill.methods.dopsd.table"}


def preset_names() -> list[str]:
    return [*PRESET_MODULES, *PRESETS]


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (a method's is built by its folder with its default settings)."""
    import importlib

    if name in PRESETS:
        return PRESETS[name]
    if name in PRESET_MODULES:
        return importlib.import_module(PRESET_MODULES[name]).preset()
    raise ConfigError(f"preset: unknown {name!r}; known: {', '.join(preset_names())}")


def baseline_of(preset: Preset, row: str) -> str | None:
    """The row ``row`` is compared with (None for the base row itself)."""
    return None if row == "base" else preset.baselines.get(row, "base")


@dataclass
class TableConfig:
    """``selfdistill table``: which rows, seeds and common settings."""

    preset: str = field(default="spd", metadata={"help": f"Rows to run: {', '.join(preset_names())}."})
    rows: list[str] = field(default_factory=list, metadata={
        "help": "Only these rows of the preset (default: all)."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds."})
    out: str = field(default="runs/table", metadata={"help": "Folder for the runs and the table."})
    common: list[str] = field(default_factory=list, metadata={
        "help": "Extra dotted overrides for every row, as key=value (e.g. steps=20)."})
    check: bool = field(default=True, metadata={
        "help": "Run `selfdistill toy check` on the rows' model first (reused from OUT/check.json) and print "
                "it above the table."})


def parse_common(pairs: list[str]) -> dict[str, Any]:
    """``["steps=20", "optim.lr=1e-4"]`` -> dotted overrides (values parsed by the config layer)."""
    out: dict[str, Any] = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ConfigError(f"common: expected key=value, got {kv!r}")
        out[k] = v
    return out


def check_rows(names: list[str], known: Any, what: str) -> list[str]:
    """``names`` (all of ``known`` when empty), or a clear error naming the first unknown one."""
    names = list(names) or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"rows: {unknown[0]!r} is not {what} ({', '.join(known)})")
    return names


def run_config(overrides: dict[str, Any], seed: int, output_dir: Path, **top: Any) -> TrainConfig:
    """One table run's settings: defaults, then ``overrides`` (dotted), then seed, folder and ``top``.

    Every table run is evaluated with seed ``1234 + seed`` on 500 items per split (standard error ~2
    points; ``data.test_size`` / ``eval.max_items`` override it) and does not evaluate before training.
    """
    data = to_dict(TrainConfig())
    data["data"]["test_size"] = 500
    data["eval"]["max_items"] = 0
    for k, v in overrides.items():
        set_dotted(data, k, v)
    data.update({"seed": seed, "output_dir": str(output_dir), "eval_before": False, **top})
    data["eval"]["seed"] = 1234 + seed
    return from_dict(TrainConfig, data)


def _run_config(preset: Preset, name: str, run: Run, seed: int, out: Path, common: dict[str, Any],
                **top: Any) -> TrainConfig:
    """One run's settings: the preset's common overrides, the command's, then the row's; its folder."""
    # String settings may name the table's folder and the row's seed (e.g. a per-seed mask file).
    # (Plain replacement, not str.format: a row's prompt template keeps its own {placeholders}.)
    overrides = {k: v.replace("{out}", str(out)).replace("{seed}", str(seed)) if isinstance(v, str) else v
                 for k, v in {**preset.common, **common, **run.overrides}.items()}
    tag = f"{name}-{run.suffix}" if run.suffix else name
    return run_config(overrides, seed, out / "runs" / f"{tag}-s{seed}", **{**preset.top, **top})


def plain_evaluate(model_path: str, cfg: TrainConfig) -> list[dict]:
    """A model's accuracy on the run's tasks with the run's evaluation settings."""
    from dataclasses import replace

    from selfdistill.evaluate import evaluate, results_to_json
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import build_tasks

    model, tok = load_model(replace(cfg.model, path=model_path))
    return results_to_json(evaluate(model, tok, build_tasks(cfg.data), cfg.eval, cfg.model.system_prompt or None))


def _key(row: str, label: str) -> str:
    return f"{row}/{label}" if label else row


def _base_results(preset: Preset, name: str, seed: int, out: Path, common: dict[str, Any], log) -> dict[str, dict]:
    """The untrained row: every base model evaluated with the seed's evaluation settings (cached per label)."""
    cfg = _run_config(preset, name, Run(), seed, out, common, steps=1)
    models = preset.base_models or {"": cfg.model.path}
    folder = Path(cfg.output_dir)
    got = {}
    for label, path in models.items():
        done = folder / (f"results-{label}.json" if label else "results.json")
        if not done.exists():
            log(f"== {_key(name, label)} seed {seed}")
            t0 = time.time()
            after = (preset.evaluate or plain_evaluate)(path, cfg)
            folder.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"method": "base", "model": path, "wall_s": time.time() - t0,
                                        "before": None, "after": after}, indent=2))
        got[label] = json.loads(done.read_text())
    return got


def _trained_results(preset: Preset, name: str, run: Run, seed: int, out: Path, common: dict[str, Any],
                     log) -> dict[str, dict]:
    """One training run of a row (reused when finished) and the results of each model it names."""
    cfg = _run_config(preset, name, run, seed, out, common)
    run_dir = Path(cfg.output_dir)
    if (run_dir / "results.json").exists():
        note_if_changed(run_dir.name.rsplit("-s", 1)[0], seed, run_dir, cfg, log)
    else:
        log(f"== {run_dir.name.rsplit('-s', 1)[0]} seed {seed}")
        train_row(cfg)
    main = json.loads((run_dir / "results.json").read_text())
    got = {}
    for label, which in run.outputs.items():
        model_dir = run_dir / ("model" if which == "model" else f"{which}_model")
        if preset.evaluate is not None:
            stem = preset.eval_file.rsplit(".", 1)[0]
            done = run_dir / (preset.eval_file if which == "model" else f"{stem}-{which}.json")
            if not done.exists():
                t0 = time.time()
                after = preset.evaluate(str(model_dir), cfg)
                done.write_text(json.dumps({"row": name, "seed": seed, "model": str(model_dir),
                                            "wall_s": main.get("wall_s", 0.0) + time.time() - t0,
                                            "after": after}, indent=2))
            got[label] = json.loads(done.read_text())
        elif which == "model":
            got[label] = main
        else:  # a trainee's own evaluation, written by its method
            got[label] = {"wall_s": main.get("wall_s", 0.0),
                          "after": json.loads((run_dir / f"{which}_results.json").read_text())["after"]}
    return got


def run_preset(preset: Preset, rows: list[str], seeds: list[int], out: str | Path, common: dict[str, Any],
               log=print, check: bool = False) -> Path:
    """Every table: run (or reuse) each row x seed, summarise with paired intervals, write results.md/.json.

    ``rows`` empty = all of the preset's. With ``check``, the toy world's preconditions on the rows' model
    (run once per folder) lead the table. A folder made on another world or model is refused.
    """
    names = check_rows(rows, preset.rows, f"in preset {preset.name}")
    out = Path(out)
    base_cfg = _run_config(preset, "base", Run(), 0, out, common)
    check_world(out, next(iter((preset.base_models or {"": base_cfg.model.path}).values())))
    checked = preconditions(base_cfg.model.path, out, log) if check and _is_causal(base_cfg.model.path) else ""
    results: dict[str, list[dict[str, Any]]] = {}
    baselines: dict[str, str | None] = {}
    for name in names:
        for seed in seeds:
            runs = preset.rows[name]
            parts = [_base_results(preset, name, seed, out, common, log)] if not runs else [
                _trained_results(preset, name, run, seed, out, common, log) for run in runs]
            for got in parts:
                for label, res in got.items():
                    results.setdefault(_key(name, label), []).append(res)
                    base = baseline_of(preset, name)
                    baselines[_key(name, label)] = _key(base, label) if base else None
    table = summarise(results, baselines)
    record = {"preset": preset.name, "seeds": list(seeds), "common": {**preset.common, **common},
              "rows": {n: [asdict(r) for r in preset.rows[n]] for n in names}, "table": table}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    md = (checked + "\n\n" if checked else "") + (preset.format or format_markdown)(table, list(seeds))
    (out / "results.md").write_text(md)
    log(md)
    return out / "results.md"


def run_table(tc: TableConfig, log=print) -> Path:
    """``selfdistill table``: one preset's rows x seeds (see :func:`run_preset`)."""
    return run_preset(get_preset(tc.preset), tc.rows, tc.seeds, tc.out, parse_common(tc.common), log, check=tc.check)


def train_row(cfg: TrainConfig) -> None:
    """One table run; a run stopped by a signal stops the table too (exit 128 + signal), resumable by rerunning.

    A folder left by an unfinished attempt (no ``results.json``) is this table's own: it is replaced
    (``overwrite``; a live run holding the folder's lock is still refused).
    """
    from dataclasses import replace

    from selfdistill.trainer import train

    folder = Path(cfg.output_dir)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "results.json").exists():
        cfg = replace(cfg, overwrite=True)
    res = train(cfg, log=lambda s: None)
    if res.stopped_by_signal:
        raise SystemExit(128 + res.stopped_by_signal)


def check_world(out: Path, model: str) -> None:
    """Refuse to add rows to a table folder made on another world or model (its finished rows would be
    reused as if they were made on this one); stamp a new folder."""
    from selfdistill.toy.check import world_stamp

    stamp, path = world_stamp(model), out / "world.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != stamp:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in stamp.items() if old.get(k) != v)
            raise ConfigError(f"{out} holds rows made on another world or model ({diff}); "
                              "use another --out or delete the folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=2) + "\n")


def _is_causal(model: str) -> bool:
    """The toy check probes causal LMs; a masked-diffusion model's tables report its base row instead."""
    from selfdistill.models import check_model_config, model_kind, resolve_model_path

    return model_kind(check_model_config(resolve_model_path(model))) == "causal"


def preconditions(model: str, out: Path, log) -> str:
    """The toy world's preconditions on ``model`` (``selfdistill toy check``) as Markdown, run once per folder."""
    from selfdistill.toy.check import CheckConfig, check, failed, world_stamp

    out.mkdir(parents=True, exist_ok=True)
    stamp = json.dumps(world_stamp(model), indent=2)
    for where in (out, out.parent):  # a check of the same model beside the tables (scripts/make_tables.sh) serves
        md, meta = where / "check.md", where / "check_model.json"
        if md.exists() and meta.exists() and meta.read_text() == stamp:
            break
    else:
        rows = check(CheckConfig(model=model, out=str(out)), log=lambda s: None)
        md = out / "check.md"
        log(f"toy check: {len(failed(rows))} preconditions fail")
    text = f"**Preconditions** (`selfdistill toy check --model {model}`)\n\n" + md.read_text().strip()
    log(text)
    return text


def note_if_changed(name: str, seed: int, run_dir: Path, cfg: TrainConfig, log) -> None:
    """A reused run whose saved settings differ from the row's now: say which keys.

    Keys the saved run predates count as differences only where the row sets them away from the default.
    """
    import yaml

    saved_p = run_dir / "run_config.yaml"
    if not saved_p.exists():
        return
    saved, now = flatten(yaml.safe_load(saved_p.read_text())), flatten(to_dict(cfg))
    default = flatten(to_dict(TrainConfig()))
    skip = ("resume", "output_dir")
    diff = sorted(k for k in now if k not in skip and (
        saved[k] != now[k] if k in saved else now[k] != default.get(k)))
    newer = sorted(k for k in now if k not in saved and k not in diff)
    gone = sorted(k for k in saved if k not in now)
    if diff:
        log(f"note: reusing {name} seed {seed}; its saved settings differ in {', '.join(diff)}")
    if newer:
        log(f"note: reusing {name} seed {seed}; it predates the settings {', '.join(newer)} (defaults assumed)")
    if gone:
        log(f"note: reusing {name} seed {seed}; its saved settings {', '.join(gone)} no longer exist")


MODES = ("greedy", "sampled")


def _per_item(runs: list[dict[str, Any]], mode: str) -> dict[str, list[tuple[list[str], list[float]]]]:
    """(task/split or 'all/split') -> per seed (item ids, per-item scores); pooled over tasks for 'all/'."""
    out: dict[str, list[tuple[list[str], list[float]]]] = {}
    for r in runs:
        pooled: dict[str, tuple[list[str], list[float]]] = {}
        for s in r["after"]:
            vals = s.get(f"{mode}_items")
            if vals is None or s.get("ids") is None:
                continue
            out.setdefault(f"{s['task']}/{s['split']}", []).append((s["ids"], vals))
            ids, v = pooled.setdefault(f"all/{s['split']}", ([], []))
            ids += s["ids"]
            v += vals
        for k, iv in pooled.items():
            out.setdefault(k, []).append(iv)
    return out


def _paired(row: list[tuple[list[str], list[float]]], base: list[tuple[list[str], list[float]]]) -> dict | None:
    from selfdistill.stats import paired_bootstrap

    if len(row) != len(base) or any(a[0] != b[0] for a, b in zip(row, base)):
        return None  # different seeds or items: no paired comparison
    d = paired_bootstrap([a[1] for a in row], [b[1] for b in base])
    return {"diff": d.diff, "lo": d.lo, "hi": d.hi, "seeds": d.n_seeds, "items": d.n_items}


def summarise(results: dict[str, list[dict[str, Any]]], baselines: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Per row: mean and sample std (ddof=1) over seeds of each (task, split, mode); mean wall time; and
    the paired per-item difference with the row's baseline (``baselines[row]``) with a 95% bootstrap interval."""
    from selfdistill.stats import sample_std

    baselines = baselines or {}
    table: dict[str, Any] = {}
    for name, runs in results.items():
        cells: dict[str, dict[str, list[float]]] = {}
        for r in runs:
            for s in r["after"]:
                for mode in MODES:
                    if s[mode] is not None:
                        cells.setdefault(f"{s['task']}/{s['split']}", {}).setdefault(mode, []).append(100 * s[mode])
        row = {}
        for key, modes in cells.items():
            row[key] = {m: {"mean": statistics.fmean(v), "std": sample_std(v), "n": len(v)} for m, v in modes.items()}
        entry: dict[str, Any] = {"cells": row, "wall_s": statistics.fmean(r["wall_s"] for r in runs)}
        base = baselines.get(name)
        if base and base in results:
            entry["baseline"] = base
            entry["paired"] = {}
            for mode in MODES:
                mine, theirs = _per_item(runs, mode), _per_item(results[base], mode)
                for key in sorted(set(mine) & set(theirs)):
                    p = _paired(mine[key], theirs[key])
                    if p is not None:
                        entry["paired"].setdefault(key, {})[mode] = p
        table[name] = entry
    return table


def format_markdown(table: dict[str, Any], seeds: list[int]) -> str:
    """One Markdown table per mode (greedy, sampled): rows x (domain, split)."""
    keys = sorted({k for row in table.values() for k in row["cells"]})
    out = []
    for mode in ("greedy", "sampled"):
        head = ["row"] + [k.replace("toy-", "").replace("/test_", " ") for k in keys] + ["mean", "wall s"]
        lines = [f"**{mode} accuracy %** (mean ± sample std, ddof=1, over seeds {', '.join(map(str, seeds))})", "",
                 "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for name, row in table.items():
            vals = [row["cells"].get(k, {}).get(mode) for k in keys]
            means = [v["mean"] for v in vals if v]
            cells = [f"{v['mean']:.1f} ± {v['std']:.1f}" if v else "-" for v in vals]
            avg = f"{statistics.fmean(means):.1f}" if means else "-"
            lines.append("| " + " | ".join([name] + cells + [avg, f"{row['wall_s']:.0f}"]) + " |")
        out.append("\n".join(lines))
        paired = _paired_lines(table, mode, keys)
        if paired:
            out.append(paired)
    return "\n\n".join(out) + "\n"


def _paired_lines(table: dict[str, Any], mode: str, keys: list[str]) -> str:
    """The paired-difference table of one mode: row - baseline, points, with the 95% interval."""
    rows = [(n, r) for n, r in table.items() if r.get("paired")]
    if not rows:
        return ""
    pooled = sorted({k for _, r in rows for k in r["paired"] if k.startswith("all/")})
    cols = pooled + keys
    head = ["row", "vs"] + [k.replace("toy-", "").replace("all/", "all ").replace("/test_", " ") for k in cols]
    lines = [f"**{mode}: paired difference with the baseline** (points; mean over seeds and items, "
             "[95% bootstrap interval over seeds and items]; * = interval excludes 0)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in rows:
        cells = []
        for k in cols:
            p = r["paired"].get(k, {}).get(mode)
            cells.append("-" if p is None else f"{p['diff']:+.1f} [{p['lo']:+.1f}, {p['hi']:+.1f}]"
                         + ("*" if p["lo"] > 0 or p["hi"] < 0 else ""))
        lines.append("| " + " | ".join([name, r["baseline"]] + cells) + " |")
    return "\n".join(lines)
