"""The refusal direction: a difference of mean residual-stream inputs, chosen among every block and
post-instruction position by what ablating and adding it does (Arditi et al.'s selection, as SafeSteer's
code uses it).

1. *Refusal tokens* come from the model's own refusals: the first tokens of its greedy completions that
   :func:`~selfdistill.tasks.refusal.is_refusal` judges refusals, kept when they open refusals at least
   twice as often (by share) as they open its answers to harmless prompts. The *refusal score* of a prompt is
   ``log P(refusal tokens) - log P(other)`` at its last position.
2. Candidates: for every block ``l`` and post-instruction position ``p`` (the chat template's tokens after
   the user's text), ``r = mean_harmful - mean_harmless`` of the hidden state entering block ``l``.
3. Selection on held-apart prompts: drop the last ``drop_last_layers`` of blocks; drop a candidate whose
   ablation moves the harmless next-token distribution by KL > ``max_kl``, or whose addition (``coeff`` x
   at block ``l``) does not raise the harmless refusal score above 0; keep the one whose ablation lowers the
   harmful refusal score most. The official code uses coeff 1; here coefficients are tried in order
   (``safesteer.coeff``, default 1, 2, 4) and the first at which a candidate passes is kept, because a small
   model's raw mean difference may be too weak at 1 (the toy model's is: no candidate passes there).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from selfdistill.config_io import ConfigError
from selfdistill.residual import ablate_direction, add_direction, block_inputs
from selfdistill.sequences import chat_prompt, encode_prompts

_PLACEHOLDER = "SELFDISTILLQUESTION"


@dataclass
class Candidate:
    """One (block, position) candidate and its selection scores."""

    layer: int
    position: int  # counted from the end of the prompt (-1 = last)
    ablation_refusal: float  # mean harmful refusal score with the direction ablated (lower = better)
    steering_refusal: float  # mean harmless refusal score with the direction added
    ablation_kl: float  # mean KL(plain || ablated) of the harmless next-token distribution
    norm: float
    kept: bool = False
    reason: str = ""


@dataclass
class Direction:
    """The chosen direction, where it is added, and how it was found."""

    layer: int
    position: int
    vector: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"direction": self.vector.float().contiguous()}, str(folder / "direction.safetensors"))
        (folder / "direction.json").write_text(json.dumps({"layer": self.layer, "position": self.position,
                                                           **self.info}, indent=2) + "\n")


def load_direction(folder: str | Path) -> Direction:
    """A direction saved by :meth:`Direction.save` (a folder with direction.safetensors + direction.json)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "direction.safetensors").is_file() or not (folder / "direction.json").is_file():
        raise ConfigError(f"safesteer.direction: {folder} has no direction.safetensors + direction.json "
                          "(make one with `selfdistill safesteer direction`)")
    info = json.loads((folder / "direction.json").read_text())
    vec = load_file(str(folder / "direction.safetensors"))["direction"]
    return Direction(int(info.pop("layer")), int(info.pop("position")), vec, info)


def post_instruction_tokens(tokenizer, system: str | None = None) -> int:
    """How many tokens the chat template puts after the user's text (at least 1)."""
    text = chat_prompt(tokenizer, _PLACEHOLDER, system)
    suffix = text[text.rindex(_PLACEHOLDER) + len(_PLACEHOLDER):]
    return max(1, len(tokenizer(suffix, add_special_tokens=False).input_ids))


def _batches(tokenizer, prompts: Sequence[str], size: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded (ids, mask) batches of formatted prompts."""
    ids = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for s in range(0, len(ids), size):
        chunk = ids[s:s + size]
        T = max(len(x) for x in chunk)
        input_ids = torch.tensor([[pad] * (T - len(x)) + list(x) for x in chunk], device=device)
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in chunk], device=device)
        out.append((input_ids, mask))
    return out


@torch.no_grad()
def last_logprobs(model, batches) -> torch.Tensor:
    """Next-token log-probs at the last prompt position, (N, V) fp32."""
    rows = []
    for ids, mask in batches:
        pos = mask.long().cumsum(-1) - 1
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos.clamp_min(0), use_cache=False).logits
        rows.append(torch.log_softmax(logits[:, -1].float(), -1))
    return torch.cat(rows)


def refusal_score(logp_NV: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """``log P(refusal tokens) - log P(other)`` per row."""
    lp = logp_NV[:, list(refusal_ids)].logsumexp(-1).clamp(max=-1e-6)
    return lp - torch.log1p(-lp.exp())


def find_refusal_tokens(model, tokenizer, harmful: Sequence[str], harmless: Sequence[str],
                        system: str | None = None, max_new_tokens: int = 24) -> tuple[list[int], dict[str, Any]]:
    """The tokens that open the model's own refusals (greedy, on ``harmful``), and what was counted."""
    from selfdistill.rollout import SamplingConfig, generate
    from selfdistill.tasks.refusal import is_refusal

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0)
    ro_h = generate(model, tokenizer, [chat_prompt(tokenizer, p, system) for p in harmful], cfg,
                    desc="harmful prompts")
    ro_ok = generate(model, tokenizer, [chat_prompt(tokenizer, p, system) for p in harmless], cfg,
                     desc="harmless prompts")
    refusing = Counter(c[0] for c, t in zip(ro_h.completion_ids, ro_h.texts) if c and is_refusal(t))
    opening = Counter(c[0] for c, t in zip(ro_ok.completion_ids, ro_ok.texts) if c and not is_refusal(t))
    n_ref, n_ok = sum(refusing.values()), max(1, sum(opening.values()))
    if n_ref == 0:
        raise ConfigError(f"safesteer: the model refuses none of {len(harmful)} harmful prompts (greedy), so "
                          "its refusal tokens cannot be read from its own refusals; a refusal direction needs a "
                          "model that refuses some of them")
    ids = [t for t, c in refusing.most_common() if c >= 2 and c / n_ref >= 2 * opening.get(t, 0) / n_ok][:8]
    ids = ids or [refusing.most_common(1)[0][0]]
    info = {"refusal_tokens": ids, "refusal_token_text": [tokenizer.decode([t]) for t in ids],
            "harmful_refused_greedy": n_ref / len(harmful), "n_harmful_greedy": len(harmful)}
    return ids, info


@torch.no_grad()
def mean_block_inputs(model, batches, n_pos: int) -> torch.Tensor:
    """Mean over prompts of the hidden state entering each block at the last ``n_pos`` positions, (L, P, H)."""
    positions = torch.arange(-n_pos, 0)
    total, n = None, 0
    for ids, mask in batches:
        pos_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
        h = block_inputs(model, positions, input_ids=ids, attention_mask=mask, position_ids=pos_ids)
        total = h.sum(0) if total is None else total + h.sum(0)
        n += ids.shape[0]
    return total / max(n, 1)


def select_direction(model, tokenizer, harmful: Sequence[str], harmless: Sequence[str], cfg,
                     system: str | None = None, log: Callable[[str], None] = print, batch_size: int = 32,
                     refusal_ids: Sequence[int] | None = None) -> Direction:
    """Find the refusal direction of ``model`` (``cfg``: a :class:`~selfdistill.method_configs.SafeSteerConfig`).

    ``harmful`` / ``harmless``: the user messages; the last ``n_select`` of each are held apart for selection
    (at most a quarter), the rest (up to ``n_direction``) give the means. ``refusal_ids``: the refusal
    tokens, when known (default: read from the model's own refusals).
    """
    was = model.training
    model.eval()
    try:
        return _select(model, tokenizer, list(harmful), list(harmless), cfg, system, log, batch_size, refusal_ids)
    finally:
        model.train(was)


def _select(model, tokenizer, harmful, harmless, cfg, system, log, batch_size, refusal_ids) -> Direction:
    if min(len(harmful), len(harmless)) < 8:
        raise ConfigError(f"safesteer: the refusal direction needs at least 8 harmful and 8 harmless prompts, got "
                          f"{len(harmful)} and {len(harmless)}")
    device = next(model.parameters()).device
    n_sel = min(cfg.n_select, len(harmful) // 4, len(harmless) // 4)
    h_dir, h_sel = harmful[:-n_sel][:cfg.n_direction], harmful[-n_sel:]
    ok_dir, ok_sel = harmless[:-n_sel][:cfg.n_direction], harmless[-n_sel:]
    if refusal_ids is not None:
        ref_ids = list(refusal_ids)
        info: dict[str, Any] = {"refusal_tokens": ref_ids,
                                "refusal_token_text": [tokenizer.decode([t]) for t in ref_ids]}
    else:
        ref_ids, info = find_refusal_tokens(model, tokenizer, h_dir, ok_dir, system)
    log(f"safesteer: refusal tokens {info['refusal_token_text']}" + (
        f" (the model refuses {100 * info['harmful_refused_greedy']:.0f}% of {len(h_dir)} harmful prompts, greedy)"
        if "harmful_refused_greedy" in info else ""))

    def batches(prompts):
        return _batches(tokenizer, [chat_prompt(tokenizer, p, system) for p in prompts], batch_size, device)

    if cfg.filter_prompts:
        sh, so = (refusal_score(last_logprobs(model, batches(x)), ref_ids) for x in (h_dir, ok_dir))
        fh = [p for p, s in zip(h_dir, sh.tolist()) if s > 0]
        fo = [p for p, s in zip(ok_dir, so.tolist()) if s < 0]
        if len(fh) >= 8 and len(fo) >= 8:
            h_dir, ok_dir = fh, fo
        info["filtered"] = {"harmful_kept": len(fh), "harmless_kept": len(fo), "applied": len(fh) >= 8 and len(fo) >= 8}
    n_pos = post_instruction_tokens(tokenizer, system)
    diff = mean_block_inputs(model, batches(h_dir), n_pos) - mean_block_inputs(model, batches(ok_dir), n_pos)
    n_layers = diff.shape[0]
    max_layer = max(1, math.floor(n_layers * (1 - cfg.drop_last_layers)))
    b_h, b_ok = batches(h_sel), batches(ok_sel)
    base_ok = last_logprobs(model, b_ok)
    base_h_score = float(refusal_score(last_logprobs(model, b_h), ref_ids).mean())
    base_ok_score = float(refusal_score(base_ok, ref_ids).mean())
    ablation = {}
    for layer in range(max_layer):
        for p in range(n_pos):
            with ablate_direction(model, diff[layer, p]):
                abl_h = float(refusal_score(last_logprobs(model, b_h), ref_ids).mean())
                abl_ok = last_logprobs(model, b_ok)
            ablation[layer, p] = (abl_h, float((base_ok.exp() * (base_ok - abl_ok)).sum(-1).mean()))
    tried = []
    for coeff in cfg.coeff:  # the first coefficient at which some candidate passes both filters
        cands: list[Candidate] = []
        for (layer, p), (abl_h, kl) in ablation.items():
            r = diff[layer, p]
            if kl > cfg.max_kl:
                steer, reason = float("nan"), "ablation KL %.3f > %.3g" % (kl, cfg.max_kl)
            else:
                with add_direction(model, layer, r, coeff):
                    steer = float(refusal_score(last_logprobs(model, b_ok), ref_ids).mean())
                reason = "" if steer > 0 else "steering does not induce refusal"
            cands.append(Candidate(layer, p - n_pos, abl_h, steer, kl, float(r.norm()), not reason, reason))
        passing = [c for c in cands if c.kept]
        tried.append({"coeff": coeff, "passing": len(passing)})
        log(f"safesteer: coeff {coeff:g}: {len(passing)} of {len(cands)} candidates pass (KL <= {cfg.max_kl:g}, "
            "steering induces refusal on harmless prompts)")
        if passing:
            break
    if not passing:
        raise ConfigError(f"safesteer: no refusal-direction candidate passed the filters at coeff {cfg.coeff} "
                          "(ablation KL and induced refusal on harmless prompts); try larger safesteer.coeff values "
                          "or safesteer.max_kl")
    chosen = min(passing, key=lambda c: c.ablation_refusal)
    vector = diff[chosen.layer, n_pos + chosen.position].clone()
    log(f"safesteer: direction at block {chosen.layer}, position {chosen.position}: harmful refusal score "
        f"{base_h_score:.2f} -> {chosen.ablation_refusal:.2f} ablated; harmless {base_ok_score:.2f} -> "
        f"{chosen.steering_refusal:.2f} steered; ablation KL {chosen.ablation_kl:.3f}; |r| {chosen.norm:.2f}")
    info.update({"coeff": coeff, "coeff_tried": tried, "n_layers": n_layers,
                 "post_instruction_tokens": n_pos, "candidate_layers": max_layer,
                 "n_direction": [len(h_dir), len(ok_dir)], "n_select": [len(h_sel), len(ok_sel)],
                 "baseline_refusal_score": {"harmful": base_h_score, "harmless": base_ok_score},
                 "candidates": [asdict(c) for c in cands]})
    return Direction(chosen.layer, chosen.position, vector, info)


def plot_direction(direction: Direction, path: str | Path) -> None:
    """Each candidate's ablation and steering refusal scores by block, one line per position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cands = direction.info.get("candidates", [])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    positions = sorted({c["position"] for c in cands})
    colors = plt.cm.viridis([i / max(1, len(positions) - 1) for i in range(len(positions))])
    for pos, color in zip(positions, colors):
        rows = sorted((c for c in cands if c["position"] == pos), key=lambda c: c["layer"])
        layers = [c["layer"] for c in rows]
        axes[0].plot(layers, [c["ablation_refusal"] for c in rows], marker="o", color=color, label=f"pos {pos}")
        axes[1].plot(layers, [c["steering_refusal"] for c in rows], marker="o", color=color, label=f"pos {pos}")
    base = direction.info.get("baseline_refusal_score", {})
    for ax, key, title in ((axes[0], "harmful", "harmful, direction ablated (lower = better)"),
                           (axes[1], "harmless", f"harmless, {direction.info.get('coeff', 1.0):g} x direction added "
                                                 "(> 0 needed)")):
        if key in base:
            ax.axhline(base[key], color="gray", ls="--", lw=1, label="no edit")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("refusal score")
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"refusal direction candidates (chosen: block {direction.layer}, position {direction.position})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
