"""A run's record on disk: config, readable log, metrics, evaluations, table, plot.

Files in ``output_dir``: ``run_config.yaml`` (every setting, same names as
the flags), ``run.log``, ``metrics.jsonl`` (one line per step),
``evals.jsonl`` (before / periodic / after), ``results.json`` and
``results.md`` (the before/after table), ``training_curves.png``.
TensorBoard and wandb receive the same metrics when listed in ``report_to``
and installed. Published files (``run_config.yaml``, ``results.*``, the plot)
appear atomically (:mod:`selfdistill.atomic`); the ``.jsonl`` logs and
``run.log`` are appended to, and cut back on resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from selfdistill.atomic import write_atomic
from selfdistill.config import TrainConfig
from selfdistill.config_io import to_dict
from selfdistill.evaluate import SplitResult, format_table, results_to_json


class HeldLog:
    """The run's ``say`` before its folder exists: lines are shown at once and written to run.log later.

    Everything before :meth:`attach` (loading, the method's pre-checks) may still fail; a run that fails
    then leaves no folder behind.
    """

    def __init__(self, echo: Callable[[str], None] | None = None, is_main: bool = True) -> None:
        self.echo = echo if echo is not None else print
        self.is_main = is_main
        self.held: list[str] = []
        self.runlog: RunLog | None = None

    def __call__(self, msg: str) -> None:
        if self.runlog is not None:
            self.runlog.say(msg)
        elif self.is_main:
            self.echo(msg)
            self.held.append(msg)

    def attach(self, runlog: "RunLog") -> None:
        """From now on, lines go to ``runlog``; the held ones are written to run.log first."""
        for msg in self.held:
            runlog.say(msg, echo=False)
        self.held.clear()
        self.runlog = runlog


class RunLog:
    """Writes the run record (main process only) and echoes messages."""

    def __init__(self, out: Path, cfg: TrainConfig, is_main: bool = True,
                 echo: Callable[[str], None] | None = None) -> None:
        self.out, self.cfg, self.is_main = out, cfg, is_main
        self.echo = echo if echo is not None else print
        self._tb = self._wandb = None
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "run_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if "tensorboard" in cfg.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.say("report_to tensorboard: tensorboard is not installed, skipped")
        if "wandb" in cfg.report_to:
            try:
                import wandb

                self._wandb = wandb.init(project="selfdistill", config=to_dict(cfg), dir=str(out))
            except ImportError:
                self.say("report_to wandb: wandb is not installed, skipped")

    def say(self, msg: str, echo: bool = True) -> None:
        """A line for the console (unless ``echo`` is false: already shown) and run.log."""
        if not self.is_main:
            return
        if echo:
            self.echo(msg)
        with open(self.out / "run.log", "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    def train_completions(self, step: int, rows: Sequence[dict]) -> None:
        """The sequences step ``step`` trained on (prompt, completion, loss tokens) in ``train_completions.jsonl``."""
        if not self.is_main or not rows:
            return
        with open(self.out / "train_completions.jsonl", "a") as f:
            f.writelines(json.dumps({"step": step, **r}) + "\n" for r in rows)

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        step = int(row["step"])
        nums = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in nums.items()}, step=step)

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop logged rows after ``step`` so the log matches an uninterrupted run."""
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "evals.jsonl", "eval_completions.jsonl", "train_completions.jsonl"):
            p = self.out / name
            if not p.exists():
                continue
            keep = []
            for line in p.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill mid-write
                    continue
                if row["step"] <= step and row.get("kind") != "after":
                    keep.append(line)
            write_atomic(p, "".join(l + "\n" for l in keep))  # a kill here never loses the log

    def eval_event(self, step: int, kind: str, results: Sequence[SplitResult],
                   completions: Sequence[dict] | None = None) -> None:
        """One evaluation: its accuracies in ``evals.jsonl``, its completions and verdicts (if given) in
        ``eval_completions.jsonl``."""
        if not self.is_main:
            return
        with open(self.out / "evals.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, "results": results_to_json(results)}) + "\n")
        if completions:
            with open(self.out / "eval_completions.jsonl", "a") as f:
                f.writelines(json.dumps({"step": step, "kind": kind, **c}) + "\n" for c in completions)
        if self._tb is not None:
            for r in results:
                for mode in ("greedy", "sampled"):
                    if getattr(r, mode) is not None:
                        self._tb.add_scalar(f"eval/{r.task}/{r.split}/{mode}", getattr(r, mode), step)

    def finish(self, before, after, wall_s: float) -> None:
        if not self.is_main:
            return
        summary = {"method": self.cfg.method, "wall_s": wall_s,
                   "before": results_to_json(before) if before else None,
                   "after": results_to_json(after) if after else None}
        write_atomic(self.out / "results.json", json.dumps(summary, indent=2) + "\n")
        if before and after:
            table = format_table(before, after)
            write_atomic(self.out / "results.md", format_table(before, after, markdown=True) + "\n")
            self.say("\nbefore / after (accuracy %):\n" + table)
        elif after:
            self.say("\n" + format_table(after))
        try:
            from selfdistill.plots import plot_training

            png = plot_training(self.out)
            self.say(f"plot: {png}")
        except Exception as e:  # a plot must never fail a finished run
            self.say(f"plot skipped: {e}")
        self.say(f"done in {wall_s:.0f}s; model, config, logs and plot in {self.out}")
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
