"""Accuracy per task and split: greedy, and sampled pass@1 averaged over k samples.

Used by ``selfdistill eval``, by the trainer before/after a run and
periodically, and by the results-table scripts: one evaluator for all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

from selfdistill.rollout import SamplingConfig, generate
from selfdistill.sequences import chat_prompt
from selfdistill.tasks.base import Task


@dataclass
class EvalConfig:
    """What evaluation measures."""

    splits: list[str] = field(default_factory=lambda: ["test_id", "test_ood"],
                              metadata={"help": "Splits to evaluate."})
    greedy: bool = field(default=True, metadata={"help": "Report greedy (temperature 0) accuracy."})
    samples: int = field(default=1, metadata={"help": "k: sampled pass@1 averaged over k samples (0 = off)."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the sampled evaluation."})
    max_items: int = field(default=100, metadata={"help": "At most this many items per split (0 = all)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Longest evaluated completion."})
    batch_size: int = field(default=128, metadata={"help": "Prompts per generate call."})
    seed: int = field(default=1234, metadata={"help": "Seed of the sampled evaluation."})
    every: int = field(default=0, metadata={"help": "Evaluate every N training steps (0 = only before/after)."})

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"eval.samples must be >= 0, got {self.samples}")
        if not self.greedy and self.samples == 0:
            raise ValueError("eval.greedy is false and eval.samples is 0: nothing to measure")
        for name in ("every", "max_items"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.batch_size and eval.max_new_tokens must be >= 1")


@dataclass
class SplitResult:
    """Accuracies of one (task, split)."""

    task: str
    split: str
    n: int
    greedy: float | None
    sampled: float | None
    #: Per item, in order (for paired comparisons between runs): ids, greedy 0/1, sampled mean over k.
    ids: list[str] | None = None
    greedy_items: list[float] | None = None
    sampled_items: list[float] | None = None


def evaluate(model, tokenizer, tasks: Sequence[Task], cfg: EvalConfig, system: str | None = None,
             log=None, completions: list[dict] | None = None) -> list[SplitResult]:
    """Evaluate ``model`` on every (task, split); one batched generate per mode.

    With ``completions`` (a list), one row per generated completion is appended to it: task, split, item
    id, mode (greedy / sampled), sample index, prompt, reference answer, completion and verdict.
    """
    jobs = []
    for task in tasks:
        for split in cfg.splits:
            items = task.items(split)
            if cfg.max_items:
                items = items[: cfg.max_items]
            jobs.append((task, split, items))
    prompts = [chat_prompt(tokenizer, it.prompt, system) for _, _, items in jobs for it in items]
    flat = [(task, it) for task, _, items in jobs for it in items]

    split_of = [split for _, split, items in jobs for _ in items]

    def correct(texts: list[str], mode: str = "greedy", sample: int = 0) -> list[float]:
        verdicts = [float(task.verify(it, t)) for (task, it), t in zip(flat, texts)]
        if completions is not None:
            completions.extend({"task": task.name, "split": sp, "id": it.id, "mode": mode, "sample": sample,
                                "prompt": it.prompt, "answer": it.answer, "completion": t, "correct": bool(v)}
                               for (task, it), sp, t, v in zip(flat, split_of, texts, verdicts))
        return verdicts

    greedy = sampled = None
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts) * (int(cfg.greedy) + cfg.samples), desc="evaluate", unit="completion",
               dynamic_ncols=True, leave=False)
    if cfg.greedy:
        scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=cfg.batch_size)
        greedy = correct(generate(model, tokenizer, prompts, scfg, progress=bar.update).texts)
    if cfg.samples:
        # Plain temperature sampling: no top-p / top-k truncation (what "sampled" means in every table).
        scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
                              batch_size=cfg.batch_size)
        runs = [correct(generate(model, tokenizer, prompts, scfg, generator_seed=cfg.seed + k,
                                 progress=bar.update).texts, "sampled", k)
                for k in range(cfg.samples)]
        sampled = [sum(r[i] for r in runs) / len(runs) for i in range(len(flat))]
    bar.close()
    out, pos = [], 0
    for task, split, items in jobs:
        g = greedy[pos : pos + len(items)] if greedy is not None else None
        s = sampled[pos : pos + len(items)] if sampled is not None else None
        n = max(len(items), 1)
        out.append(SplitResult(task.name, split, len(items), sum(g) / n if g is not None else None,
                               sum(s) / n if s is not None else None, [it.id for it in items], g, s))
        pos += len(items)
    return out


def results_to_json(results: Sequence[SplitResult]) -> list[dict]:
    return [r.__dict__.copy() for r in results]


def split_result(row: dict) -> SplitResult:
    """A :class:`SplitResult` from its JSON form (older files lack the per-item lists)."""
    return SplitResult(**{k: v for k, v in row.items() if k in SplitResult.__dataclass_fields__})


def format_table(before: Sequence[SplitResult], after: Sequence[SplitResult] | None = None,
                 markdown: bool = False) -> str:
    """A plain (or Markdown) table of accuracies, before and after when both are given."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:5.1f}"

    head = ["task", "split", "n", "greedy", "sampled"]
    if after is not None:
        head = ["task", "split", "n", "greedy before", "greedy after", "sampled before", "sampled after"]
    rows = []
    for j, b in enumerate(before):
        if after is None:
            rows.append([b.task, b.split, str(b.n), pct(b.greedy), pct(b.sampled)])
        else:
            a = after[j]
            rows.append([b.task, b.split, str(b.n), pct(b.greedy), pct(a.greedy), pct(b.sampled), pct(a.sampled)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def save_results(path, results: Sequence[SplitResult]) -> None:
    with open(path, "w") as f:
        json.dump(results_to_json(results), f, indent=2)
