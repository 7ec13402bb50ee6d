"""Accuracy in the FULL, SHARDED and CONCAT settings (``selfdistill ccopd eval``).

FULL and CONCAT are single-turn, so they go through the package's one
evaluator (:func:`selfdistill.evaluate.evaluate`) on tasks whose prompts are
rewritten (:class:`SettingTask`). SHARDED is multi-turn: greedy and sampled
pass@1 as in the evaluator, each conversation sampled by
:func:`~selfdistill.methods.ccopd.conversation.sharded_rollout` (greedy: every turn
greedy). Results are ordinary :class:`~selfdistill.evaluate.SplitResult` rows
whose task is named ``TASK@SETTING`` (so every table tool reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from selfdistill.methods.ccopd.conversation import SETTINGS, sharded_rollout
from selfdistill.methods.ccopd.shard import Sharder, join_shards
from selfdistill.evaluate import EvalConfig, SplitResult, evaluate
from selfdistill.method_configs import CCOPDConfig
from selfdistill.rollout import SamplingConfig
from selfdistill.tasks.base import Item, Task


@dataclass
class SettingTask:
    """``task`` seen in one setting: same items and verifier, prompt rewritten for ``concat``."""

    task: Any
    setting: str
    sharder: Sharder
    join: str = "newline"

    @property
    def name(self) -> str:
        return f"{self.task.name}@{self.setting}"

    @property
    def domain(self) -> str:
        return self.task.domain

    def items(self, split: str) -> list[Item]:
        items = self.task.items(split)
        if self.setting == "concat":
            return [replace(it, prompt=join_shards(self.sharder(it), self.join)) for it in items]
        return items

    def verify(self, item: Item, completion: str) -> bool:
        return self.task.verify(item, completion)


def _evaluate_sharded(model, tokenizer, tasks: Sequence[Task], cfg: EvalConfig, sharder: Sharder,
                      ccfg: CCOPDConfig, system: str | None) -> list[SplitResult]:
    jobs = []
    for task in tasks:
        for split in cfg.splits:
            items = task.items(split)
            jobs.append((task, split, items[: cfg.max_items] if cfg.max_items else items))
    flat = [(task, it) for task, _, items in jobs for it in items]
    shard_lists = [sharder(it) for _, it in flat]

    def accuracy(texts: list[str]) -> list[float]:
        correct = [float(task.verify(it, t)) for (task, it), t in zip(flat, texts)]
        out, pos = [], 0
        for _, _, items in jobs:
            out.append(sum(correct[pos:pos + len(items)]) / max(len(items), 1))
            pos += len(items)
        return out

    def run(temperature: float, seed: int | None) -> list[float]:
        scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature, batch_size=cfg.batch_size)
        convs = sharded_rollout(model, tokenizer, shard_lists, scfg, ccfg.turn_max_new_tokens, system,
                                generator_seed=seed)
        return accuracy([c.final.text for c in convs])

    greedy = run(0.0, None) if cfg.greedy else None
    sampled = None
    if cfg.samples:
        runs = [run(cfg.temperature, cfg.seed + k) for k in range(cfg.samples)]
        sampled = [sum(r[j] for r in runs) / len(runs) for j in range(len(jobs))]
    return [SplitResult(f"{task.name}@sharded", split, len(items), greedy[j] if greedy else None,
                        sampled[j] if sampled else None) for j, (task, split, items) in enumerate(jobs)]


def evaluate_settings(model, tokenizer, tasks: Sequence[Task], cfg: EvalConfig, ccfg: CCOPDConfig | None = None,
                      settings: Sequence[str] = SETTINGS, system: str | None = None,
                      sharder: Sharder | None = None) -> list[SplitResult]:
    """Every (task, split) in every setting; task names ``TASK@SETTING``, settings in the order given."""
    ccfg = ccfg or CCOPDConfig()
    sharder = sharder or Sharder(ccfg)
    out: list[SplitResult] = []
    for setting in settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; expected some of {', '.join(SETTINGS)}")
        if setting == "sharded":
            out += _evaluate_sharded(model, tokenizer, tasks, cfg, sharder, ccfg, system)
        else:
            out += evaluate(model, tokenizer, [SettingTask(t, setting, sharder, ccfg.concat_join) for t in tasks],
                            cfg, system)
    return out
