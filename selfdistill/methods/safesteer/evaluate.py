"""What a safety table reports: refusal on forbidden requests (in-distribution and held-out categories),
over-refusal on harmless look-alikes, and the capability kept (task accuracy), optionally with the
steering vector added at inference (the "steering only" baseline).

One pass of the core evaluator (:func:`selfdistill.evaluate.evaluate`) over the refusal task and the
capability tasks; the refusal numbers are read from its completions, so per-item outcomes are kept for
paired comparisons between rows.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

from selfdistill.evaluate import EvalConfig, evaluate
from selfdistill.tasks.refusal import is_refusal, refusal_rates


def safety_eval(model, tokenizer, refusal, capability: Sequence, cfg: EvalConfig, system: str | None = None,
                direction=None, coeff: float = 1.0, capability_splits: Sequence[str] = ("test_id",)
                ) -> dict[str, Any]:
    """Refusal metrics on ``refusal``'s ``cfg.splits`` and greedy accuracy on each capability task's
    ``capability_splits``.

    ``direction``: a :class:`~.direction.Direction` added (``coeff`` x) at its block during generation.
    Returns ``{"refusal": {split: rates}, "capability": {task/split: acc}, "items": {key: [0/1 per item]}}``.
    """
    from selfdistill.residual import add_direction

    rows: list[dict] = []
    view = (add_direction(model, direction.layer, direction.vector, coeff) if direction is not None
            else contextlib.nullcontext())
    from dataclasses import replace

    with view:
        results = evaluate(model, tokenizer, [refusal], cfg, system, completions=rows)
        if capability:
            results += evaluate(model, tokenizer, capability, replace(cfg, splits=list(capability_splits)), system)
    out: dict[str, Any] = {"refusal": {}, "capability": {}, "items": {}}
    by_id = {}
    for split in cfg.splits:
        items = refusal.items(split)[: cfg.max_items or None]
        by_id.update({it.id: it for it in items})
        texts = {r["id"]: r["completion"] for r in rows if r["task"] == refusal.name and r["split"] == split
                 and r["mode"] == "greedy"}
        its = [it for it in items if it.id in texts]
        out["refusal"][split] = refusal_rates(its, [texts[it.id] for it in its])
        for kind, keep in (("forbidden", True), ("harmless", False)):
            sel = [it for it in its if bool(it.meta.get("forbidden")) == keep]
            out["items"][f"refused/{split}/{kind}"] = [float(is_refusal(texts[it.id])) for it in sel]
    for r in results:
        if r.task != refusal.name:
            out["capability"][f"{r.task}/{r.split}"] = 100.0 * r.greedy if r.greedy is not None else None
            out["items"][f"correct/{r.task}/{r.split}"] = list(r.greedy_items or [])
    return out


def format_safety(res: dict[str, Any]) -> str:
    """A small markdown table of one model's numbers."""
    lines = ["| measure | value | n |", "|---|---|---|"]
    for split, rates in res["refusal"].items():
        for key in ("refusal_in", "refusal_held_out", "over_refusal"):
            if rates.get(f"n_{key}"):
                lines.append(f"| {key.replace('_', ' ')} ({split}) | {rates[key]:.1f} | {rates[f'n_{key}']} |")
    for key, acc in res["capability"].items():
        lines.append(f"| accuracy {key} | {acc:.1f} | |")
    return "\n".join(lines)
