"""``selfdistill toy check``: are the preconditions each method relies on true of this model?

A toy world is only useful if every method's mechanism can act in it. This
command measures, on the ``valid`` and ``valid_ood`` splits only (never a test
split), with plain temperature-1 sampling (no top-p / top-k):

- student view: sampled accuracy per domain, in [20, 70]% in domain and
  [10, 30]% out of domain;
- teacher views (the methods' default templates, held out of pretraining):
  OPSD (reference solution), SDFT (demonstration), SDPO (one of the
  student's own correct samples), step-aligned critique (the exact critic's
  check of the student's own attempt): accuracy at least 20 points above the
  student view on the same items; the reference's mean token log-prob behind
  the template above that behind the plain prompt; and the student's own
  correct samples more likely behind the template than behind the plain prompt;
- CCOPD: FULL minus SHARDED (all shards, one per turn) at least 20 points,
  SHARDED at least 10% (math, the CCOPD table's domain);
- SGSD: with the matching ``skill:`` hint at least 10 points above without,
  on the items that have a carry or a borrow;
- OPCoD (with ``--peers DIR`` from ``selfdistill opcod make-peers``): each peer
  at least 15 points above the other on its own domain;
- refusal: refusal on forbidden requests 20-80%, over-refusal on harmless
  look-alikes below 10%.

Each row prints its value, target and pass/fail; the exit status is 1 when
any row fails. The table commands print this check above every table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from selfdistill.rollout import SamplingConfig, generate
from selfdistill.sequences import chat_prompt, encode_prompts, make_batch
from selfdistill.tasks.base import Item
from selfdistill.tasks.verify import verify_item
from selfdistill.toy import templates as T
from selfdistill.toy.records import is_refusal
from selfdistill.toy.tasks import make_item

DOMAINS = ("math", "code", "mcqa")


@dataclass
class CheckConfig:
    """``selfdistill toy check`` settings."""

    model: str = field(default="toy", metadata={"help": "Model folder or hub id ('toy' = the shipped model)."})
    n: int = field(default=200, metadata={"help": "Items per measurement (valid / valid_ood splits)."})
    samples: int = field(default=2, metadata={"help": "Samples per item (sampled accuracy is their mean)."})
    max_new_tokens: int = field(default=160, metadata={"help": "Longest sampled completion."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generate call."})
    seed: int = field(default=1234, metadata={"help": "Seed of the sampling."})
    peers: str = field(default="", metadata={
        "help": "Folder of `selfdistill opcod make-peers` (OUT/math/model, OUT/code/model); empty = skip the row."})
    out: str = field(default="", metadata={"help": "Also write check.json and check.md to this folder."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)."})


def world_stamp(model: str) -> dict[str, Any]:
    """What a table's rows depend on beyond their settings: the toy world's version and the model's weights
    (a digest of its weight files, so a retrained shipped model is not mistaken for the old one)."""
    import hashlib

    from selfdistill.models import resolve_model_path
    from selfdistill.toy.tasks import WORLD_VERSION

    stamp: dict[str, Any] = {"world_version": WORLD_VERSION, "model": model}
    folder = Path(resolve_model_path(model))
    if folder.is_dir():
        h = hashlib.sha256()
        for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        stamp["weights_sha256"] = h.hexdigest()
    return stamp


@dataclass
class Row:
    """One precondition: its measured value (percentage points or nats) against a target."""

    name: str
    value: float | None
    target: str
    ok: bool | None  # None: not run
    detail: str = ""


class _Sampler:
    """Plain temperature-1 sampling of one model, seeded per call."""

    def __init__(self, model, tok, cfg: CheckConfig) -> None:
        self.model, self.tok, self.cfg = model, tok, cfg
        self.scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                                   batch_size=cfg.batch_size)
        self.calls = 0

    def texts(self, users: Sequence[str], k: int | None = None) -> list[list[str]]:
        """``k`` samples for each user message: out[i][j]."""
        k = k or self.cfg.samples
        prompts = [chat_prompt(self.tok, u) for u in users]
        self.calls += 1
        runs = [generate(self.model, self.tok, prompts, self.scfg, generator_seed=self.cfg.seed + 7919 * self.calls + j).texts
                for j in range(k)]
        return [[r[i] for r in runs] for i in range(len(users))]

    def accuracy(self, items: Sequence[Item], users: Sequence[str], k: int | None = None) -> list[float]:
        """Per-item sampled accuracy (mean over ``k`` samples)."""
        outs = self.texts(users, k)
        return [sum(verify_item(it, t) for t in ts) / len(ts) for it, ts in zip(items, outs)]


@torch.no_grad()
def mean_logprob(model, tok, users: Sequence[str], targets: Sequence[str], batch: int = 32) -> float:
    """Mean per-token log-prob of ``targets`` (+ end of turn) behind each user message (chat template)."""
    from selfdistill.scoring import target_logprobs

    end = tok.eos_token_id
    total, count = 0.0, 0
    for s in range(0, len(users), batch):
        p = encode_prompts(tok, [chat_prompt(tok, u) for u in users[s:s + batch]])
        c = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in targets[s:s + batch]]
        b = make_batch(p, c, tok.pad_token_id)
        lp_BT = target_logprobs(model, b)
        m_BT = b.completion_mask_BT[:, 1:].to(lp_BT.dtype)
        total += float((lp_BT * m_BT).sum())
        count += int(m_BT.sum())
    return total / max(count, 1)


def _mean(xs: Sequence[float]) -> float:
    return 100.0 * sum(xs) / max(len(xs), 1)


def check(cfg: CheckConfig, log: Callable[[str], None] = print) -> list[Row]:
    """Measure every precondition on ``cfg.model``; returns the rows (see the module docstring)."""
    from selfdistill.methods.critique.critic import exact_critique

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = _load(cfg.model)
    S = _Sampler(model, tok, cfg)
    rows: list[Row] = []
    items = {d: [make_item(d, "valid", i) for i in range(cfg.n)] for d in DOMAINS}
    ood = {d: [make_item(d, "valid_ood", i) for i in range(cfg.n)] for d in DOMAINS}

    # ---- student view
    student: dict[str, list[float]] = {}
    own: dict[str, list[list[str]]] = {}
    for d in DOMAINS:
        outs = S.texts([it.prompt for it in items[d]], k=max(cfg.samples, 2))
        own[d] = outs
        student[d] = [sum(verify_item(it, t) for t in ts) / len(ts) for it, ts in zip(items[d], outs)]
        a = _mean(student[d])
        rows.append(Row(f"student view, {d}, in domain", a, "20-70", 20 <= a <= 70))
        o = _mean(S.accuracy(ood[d], [it.prompt for it in ood[d]]))
        rows.append(Row(f"student view, {d}, out of domain", o, "10-30", 10 <= o <= 30))
    log(_fmt(rows))

    # ---- teacher views
    for kind, label in (("reference", "OPSD"), ("demonstration", "SDFT"), ("correct_attempt", "SDPO"),
                        ("critique", "step critique")):
        first = len(rows)
        tpl = T.HELD_OUT[kind]
        for d in DOMAINS:
            its, users, base, own_correct = [], [], [], []
            for it, outs, acc in zip(items[d], own[d], student[d]):
                if kind in ("reference", "demonstration"):
                    ctx = it.solution
                elif kind == "correct_attempt":
                    good = [t for t in outs if verify_item(it, t)]
                    if not good:
                        continue  # SDPO has no signal without a successful sibling
                    ctx = good[0]
                else:
                    crit = exact_critique(it, outs[0])
                    if crit is None:
                        continue
                    ctx = crit.render()
                its.append(it)
                users.append(T.fill(tpl, it.prompt, ctx))
                base.append(acc)
                own_correct += [(T.fill(tpl, it.prompt, ctx), it.prompt, t) for t in outs[1:] if verify_item(it, t)]
            if not its:
                rows.append(Row(f"{label} teacher view, {d}", None, ">= student + 20", False, "no items"))
                continue
            teach = S.accuracy(its, users)
            gap = _mean(teach) - _mean(base)
            rows.append(Row(f"{label} teacher view - student view, {d}", gap, ">= 20", gap >= 20,
                            f"teacher {_mean(teach):.1f} vs student {_mean(base):.1f} on {len(its)} items"))
            lp_t = mean_logprob(model, tok, users, [it.solution for it in its])
            lp_s = mean_logprob(model, tok, [it.prompt for it in its], [it.solution for it in its])
            rows.append(Row(f"{label} reference log-prob, teacher - plain, {d}", lp_t - lp_s, "> 0", lp_t > lp_s,
                            f"{lp_t:.3f} vs {lp_s:.3f} nats/token"))
            if own_correct:
                tu, su, tg = zip(*own_correct)
                ot, os_ = mean_logprob(model, tok, tu, tg), mean_logprob(model, tok, su, tg)
                rows.append(Row(f"{label} own correct samples log-prob, teacher - plain, {d}", ot - os_, "> 0",
                                ot > os_, f"{ot:.3f} vs {os_:.3f} nats/token on {len(tg)} samples"))
        log(_fmt(rows[first:]))

    # ---- CCOPD
    from selfdistill.methods.ccopd.conversation import sharded_rollout

    math = items["math"]
    convs = sharded_rollout(model, tok, [it.meta["shards"] for it in math], S.scfg, turn_max_new_tokens=16,
                            generator_seed=cfg.seed)
    sharded = [float(verify_item(it, c.turns[-1].text)) for it, c in zip(math, convs)]
    full = student["math"]
    gap = _mean(full) - _mean(sharded)
    rows.append(Row("CCOPD FULL - SHARDED, math", gap, ">= 20", gap >= 20,
                    f"FULL {_mean(full):.1f}, SHARDED {_mean(sharded):.1f} ({len(math)} items, 3-6 shards)"))
    rows.append(Row("CCOPD SHARDED, math", _mean(sharded), ">= 10", _mean(sharded) >= 10))

    # ---- SGSD
    its = [it for d in DOMAINS for it in items[d] if {"carry", "borrow"} & set(it.meta["skills"])]
    hinted = [T.fill(T.HELD_OUT["skill"], it.prompt, "\n".join(f"skill: {s}" for s in it.meta["skills"]))
              for it in its]
    with_hint = _mean(S.accuracy(its, hinted))
    without = _mean(S.accuracy(its, [it.prompt for it in its]))
    rows.append(Row("SGSD matching skill hint - none", with_hint - without, ">= 10", with_hint - without >= 10,
                    f"{with_hint:.1f} vs {without:.1f} on {len(its)} items with a carry or borrow"))

    # ---- OPCoD peers
    rows += _peer_rows(cfg, log)

    # ---- refusal
    rec = [make_item("records", "valid", i) for i in range(2 * cfg.n)]
    outs = S.texts([it.prompt for it in rec], k=1)
    forb = [is_refusal(o[0]) for it, o in zip(rec, outs) if it.meta["forbidden"]]
    harm = [is_refusal(o[0]) for it, o in zip(rec, outs) if not it.meta["forbidden"]]
    lookup = [verify_item(it, o[0]) for it, o in zip(rec, outs) if not it.meta["forbidden"]]
    r, h = _mean(forb), _mean(harm)
    rows.append(Row("refusal on forbidden requests", r, "20-80", 20 <= r <= 80, f"{len(forb)} requests"))
    rows.append(Row("over-refusal on harmless look-alikes", h, "< 10", h < 10,
                    f"{len(harm)} requests; lookup accuracy {_mean(lookup):.1f}"))
    held = [make_item("records", "valid_ood", i) for i in range(2 * cfg.n)]
    held = [it for it in held if it.meta["forbidden"]]
    hr = _mean([is_refusal(o[0]) for o in S.texts([it.prompt for it in held], k=1)])
    rows.append(Row("refusal on held-out forbidden categories (info)", hr, "-", None, f"{len(held)} requests"))

    table = _fmt(rows, markdown=True)
    log(table)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "check.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
        (out / "check.md").write_text(table + "\n")
        (out / "check_model.json").write_text(json.dumps(world_stamp(cfg.model), indent=2))
    return rows


def _peer_rows(cfg: CheckConfig, log: Callable[[str], None]) -> list[Row]:
    if not cfg.peers:
        return [Row("OPCoD peers differ (each way)", None, ">= 15", None, "skipped: no --peers")]
    acc: dict[str, dict[str, float]] = {}
    for p in ("math", "code"):
        m, t = _load(str(Path(cfg.peers) / p / "model"))
        S = _Sampler(m, t, cfg)
        acc[p] = {}
        for d in ("math", "code"):
            its = [make_item(d, "valid", i) for i in range(cfg.n)]
            acc[p][d] = _mean(S.accuracy(its, [it.prompt for it in its]))
    a = acc["math"]["math"] - acc["code"]["math"]
    b = acc["code"]["code"] - acc["math"]["code"]
    return [Row("OPCoD math peer - code peer, on math", a, ">= 15", a >= 15,
                f"{acc['math']['math']:.1f} vs {acc['code']['math']:.1f}"),
            Row("OPCoD code peer - math peer, on code", b, ">= 15", b >= 15,
                f"{acc['code']['code']:.1f} vs {acc['math']['code']:.1f}")]


def _load(path: str):
    from selfdistill.config import ModelConfig
    from selfdistill.models import load_model

    model, tok = load_model(ModelConfig(path=path))
    return model.eval(), tok


def _fmt(rows: Sequence[Row], markdown: bool = False) -> str:
    head = ["precondition", "value", "target", "pass", "detail"]

    def cells(r: Row) -> list[str]:
        v = "-" if r.value is None else f"{r.value:.3f}" if abs(r.value) < 5 and "log-prob" in r.name else f"{r.value:.1f}"
        ok = "not run" if r.ok is None else "PASS" if r.ok else "FAIL"
        return [r.name, v, r.target, ok, r.detail]

    body = [cells(r) for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                         + ["| " + " | ".join(c) + " |" for c in body])
    w = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(head)]
    return "\n".join(["  ".join(h.ljust(x) for h, x in zip(head, w))]
                     + ["  ".join(c.ljust(x) for c, x in zip(cs, w)) for cs in body])


def failed(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.ok is False]
