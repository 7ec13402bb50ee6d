"""Where each feedback context puts its pressure: the per-token advantage log p_T - log p_S.

``selfdistill critique analyze`` samples the student's traces on toy math
items, checks them with the exact critic, builds the three teacher contexts
(binary reward, reference solution, step-aligned critique) for each trace,
scores the trace's tokens under the student's plain prompt and under each
context (same weights), and reports the mean advantage ``log p_T(y_t) -
log p_S(y_t)`` per context, split by where the token sits: in a correct
step, in a wrong step, in a correct or wrong answer line, or elsewhere
(newlines, end of sequence). Writes ``advantage.json`` and ``advantage.png``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from selfdistill.config import ModelConfig
from selfdistill.methods.critique.critic import Critique, exact_critique
from selfdistill.method_configs import CritiqueConfig
from selfdistill.rollout import SamplingConfig

CONTEXTS = ("reward", "reference", "step")
LABELS = ("correct_step", "wrong_step", "correct_answer", "wrong_answer", "other")


@dataclass
class AnalyzeConfig:
    """``selfdistill critique analyze``: per-token advantage of the three feedback contexts."""

    model: ModelConfig = field(default_factory=ModelConfig)
    out: str = field(default="critique_analysis", metadata={"help": "Folder for advantage.json and advantage.png."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the toy world's items."})
    split: str = field(default="valid", metadata={"help": "Toy math split the traces are sampled on."})
    items: int = field(default=64, metadata={"help": "Toy math items."})
    samples: int = field(default=2, metadata={"help": "Student traces per item."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    score_batch_size: int = field(default=32, metadata={"help": "Sequences per scoring forward."})
    rollout: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)


def token_char_spans(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token in ``decode(ids, skip_special_tokens=True)`` (special tokens: empty)."""
    spans, prev = [], 0
    for k in range(len(ids)):
        cur = len(tokenizer.decode(list(ids[: k + 1]), skip_special_tokens=True))
        spans.append((prev, max(prev, cur)))
        prev = max(prev, cur)
    return spans


def token_labels(tokenizer, ids: Sequence[int], text: str, critique: Critique) -> list[str]:
    """The :data:`LABELS` entry of each completion token (by the first non-newline character it covers)."""
    line_label: list[tuple[tuple[int, int], str]] = []
    for c in critique.checks:
        if c.span is None or c.kind == "text":
            continue
        if c.kind == "answer":
            line_label.append((c.span, "correct_answer" if c.ok else "wrong_answer"))
        else:
            line_label.append((c.span, "correct_step" if c.ok else "wrong_step"))
    out = []
    for s, e in token_char_spans(tokenizer, ids):
        pos = next((p for p in range(s, e) if p < len(text) and text[p] != "\n"), None)
        label = "other"
        if pos is not None:
            label = next((lab for (a, b), lab in line_label if a <= pos < b), "other")
        out.append(label)
    return out


def _score(model, prompts_ids: list[list[int]], completions: list[list[int]], pad: int, batch: int,
           device) -> list[list[float]]:
    """log p(completion token) for each row, completion positions only."""
    from selfdistill.scoring import target_logprobs
    from selfdistill.sequences import make_batch

    out: list[list[float]] = []
    for s in range(0, len(completions), batch):
        b = make_batch(prompts_ids[s:s + batch], completions[s:s + batch], pad).to(device)
        with torch.no_grad():
            logp = target_logprobs(model, b).cpu()
        mask = b.completion_mask_BT[:, 1:].bool().cpu()
        out += [logp[i][mask[i]].tolist() for i in range(logp.shape[0])]
    return out


def teacher_messages(item, attempt: str, correct: bool, critique: Critique, cfg: CritiqueConfig) -> dict[str, str]:
    """The three teacher user messages of one trace (the method's templates)."""
    return {
        "reward": cfg.reward_template.format(problem=item.prompt, attempt=attempt,
                                             verdict="correct" if correct else "incorrect"),
        "reference": cfg.reference_template.format(problem=item.prompt, solution=item.solution),
        "step": cfg.step_template.format(problem=item.prompt, attempt=attempt, critique=critique.render()),
    }


def analyze(cfg: AnalyzeConfig, log: Callable[[str], None] = print) -> Path:
    """Run the analysis (see the module doc); returns the path of advantage.json."""
    from selfdistill.models import load_model
    from selfdistill.rollout import generate
    from selfdistill.sequences import chat_prompt, encode_prompts
    from selfdistill.tasks.verify import verify_item
    from selfdistill.toy.tasks import ToyTask

    model, tok = load_model(cfg.model)
    model.eval()
    device = next(model.parameters()).device
    system = cfg.model.system_prompt or None
    items = ToyTask("math", seed=cfg.data_seed, test_size=max(cfg.items, 1)).items(cfg.split)[: cfg.items]
    its = [it for it in items for _ in range(cfg.samples)]
    torch.manual_seed(cfg.seed)
    ro = generate(model, tok, [chat_prompt(tok, it.prompt, system) for it in its], cfg.rollout,
                  desc="critique rollouts")
    crits = [exact_critique(it, t, chain=cfg.critique.chain) for it, t in zip(its, ro.texts)]
    correct = [bool(verify_item(it, t)) for it, t in zip(its, ro.texts)]
    labels = [token_labels(tok, ids, t, c) for ids, t, c in zip(ro.completion_ids, ro.texts, crits)]
    pad = tok.pad_token_id
    logp_s = _score(model, ro.prompt_ids, ro.completion_ids, pad, cfg.score_batch_size, device)
    per_ctx: dict[str, dict[str, list[float]]] = {}
    for ctx_name in CONTEXTS:
        users = [teacher_messages(it, t, ok, c, cfg.critique)[ctx_name]
                 for it, t, ok, c in zip(its, ro.texts, correct, crits)]
        t_ids = encode_prompts(tok, [chat_prompt(tok, u, system) for u in users])
        logp_t = _score(model, t_ids, ro.completion_ids, pad, cfg.score_batch_size, device)
        acc: dict[str, list[float]] = {lab: [] for lab in LABELS}
        for ls, lt, lab in zip(logp_s, logp_t, labels):
            for a, b, l in zip(ls, lt, lab):
                acc[l].append(b - a)
        per_ctx[ctx_name] = acc
        log(f"scored context {ctx_name}")

    def summary(v: list[float]) -> dict[str, float | int | None]:
        if not v:
            return {"mean": None, "sem": None, "n": 0}
        m = sum(v) / len(v)
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        return {"mean": m, "sem": sd / math.sqrt(len(v)), "n": len(v)}

    table = {c: {lab: summary(v) for lab, v in acc.items()} for c, acc in per_ctx.items()}
    n_wrong = sum(any(c.kind == "step" and not c.ok for c in cr.checks) for cr in crits)
    result = {"model": cfg.model.path, "split": cfg.split, "traces": len(its), "accuracy": sum(correct) / len(its),
              "traces_with_wrong_step": n_wrong, "advantage": table,
              "definition": "advantage = log p_T(y_t) - log p_S(y_t) on the student's own sampled tokens; p_S: "
                            "plain prompt, p_T: same weights behind the feedback context"}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "advantage.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot_advantage(table, out / "advantage.png")
    log(format_table(result))
    return path


def format_table(result: dict) -> str:
    """Markdown: contexts x token labels, mean advantage (n)."""
    head = "| context | " + " | ".join(LABELS) + " |"
    lines = [f"traces: {result['traces']}, accuracy {result['accuracy']:.0%}, with a wrong step: "
             f"{result['traces_with_wrong_step']}", "", head, "|" + "---|" * (len(LABELS) + 1)]
    for c, row in result["advantage"].items():
        cells = [f"{row[l]['mean']:+.3f} (n={row[l]['n']})" if row[l]["n"] else "-" for l in LABELS]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_advantage(table: dict, path: Path) -> Path:
    """Grouped bars: per context, mean advantage on correct-step vs wrong-step tokens (and answer lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("correct_step", "wrong_step", "correct_answer", "wrong_answer")
    contexts = list(table)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(shown)
    for j, lab in enumerate(shown):
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(contexts))]
        ys = [table[c][lab]["mean"] or 0.0 for c in contexts]
        es = [table[c][lab]["sem"] or 0.0 for c in contexts]
        ax.bar(xs, ys, width, yerr=es, label=lab.replace("_", " "), capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(contexts)), contexts)
    ax.set_ylabel("mean log p_T - log p_S")
    ax.set_title("Per-token advantage by feedback context")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
