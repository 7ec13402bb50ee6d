"""Safety tokens: the vocabulary subset where steering moves the model most (SafeSteer's voting).

The steered model continues harmless prompts for a few tokens (``token_samples`` samples each, temperature
1); each continuation is teacher-forced through the steered and the plain model, and at every generated
position ``delta = log p_steered - log p_plain`` over the vocabulary. Special tokens and tokens whose mean
steered probability over those positions is below ``min_prob`` are banned; each position votes for its top
``vote_top`` tokens by delta; the ``num_tokens`` most voted are kept (ties: larger mean delta first). The set
is chosen once, before training, and frozen for the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from selfdistill.config_io import ConfigError
from selfdistill.residual import add_direction
from selfdistill.sequences import chat_prompt, forward_hidden, make_batch
from selfdistill.scoring import lm_head


@dataclass
class SafetyTokens:
    """The chosen ids, with their text, votes and mean log-ratio."""

    ids: list[int]
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"ids": self.ids, **self.info}, indent=2) + "\n")


def load_tokens(path: str | Path) -> SafetyTokens:
    p = Path(path)
    p = p / "tokens.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"safesteer.tokens: {path} is not a tokens.json "
                          "(make one with `selfdistill safesteer tokens`)")
    data = json.loads(p.read_text())
    ids = [int(i) for i in data.pop("ids")]
    if not ids:
        raise ConfigError(f"safesteer.tokens: {p} lists no token ids")
    return SafetyTokens(ids, data)


def vote(delta_NV: torch.Tensor, banned_V: torch.Tensor, vote_top: int, keep: int) -> tuple[list[int], list[int]]:
    """Each row votes for its ``vote_top`` largest-delta non-banned tokens; the ``keep`` most voted ids and
    their vote counts (ties broken by the larger mean delta, then the smaller id)."""
    d = delta_NV.float().masked_fill(banned_V[None, :], float("-inf"))
    allowed = int((~banned_V).sum())
    if allowed == 0:
        raise ValueError("every token is banned")
    top = d.topk(min(vote_top, allowed), dim=-1).indices
    votes = torch.zeros(d.shape[1], dtype=torch.long, device=d.device)
    votes.scatter_add_(0, top.reshape(-1), torch.ones(top.numel(), dtype=torch.long, device=d.device))
    mean = torch.where(banned_V, torch.full_like(d[0], float("-inf")), delta_NV.float().mean(0))
    order = sorted(range(d.shape[1]), key=lambda v: (-int(votes[v]), -float(mean[v]), v))
    chosen = [v for v in order if not banned_V[v] and votes[v] > 0][:keep]
    return chosen, [int(votes[v]) for v in chosen]


@torch.no_grad()
def choose_tokens(model, tokenizer, harmless: Sequence[str], layer: int, vector: torch.Tensor, coeff: float, cfg,
                  system: str | None = None, log: Callable[[str], None] = print, seed: int = 0) -> SafetyTokens:
    """The safety tokens of ``model`` steered by ``coeff * vector`` at block ``layer`` (``cfg``: SafeSteerConfig)."""
    from selfdistill.rollout import SamplingConfig, generate

    prompts = [chat_prompt(tokenizer, p, system) for p in harmless[:cfg.token_prompts]
               for _ in range(cfg.token_samples)]
    if not prompts:
        raise ConfigError("safesteer: no harmless prompts to choose safety tokens from")
    scfg = SamplingConfig(max_new_tokens=cfg.token_new, temperature=1.0, top_p=1.0, top_k=0)
    was = model.training
    model.eval()
    try:
        with add_direction(model, layer, vector, coeff):
            ro = generate(model, tokenizer, prompts, scfg, generator_seed=seed, desc="steered samples")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = make_batch(ro.prompt_ids, ro.completion_ids, pad)
        device = next(model.parameters()).device
        batch = batch.to(device)
        mask = batch.completion_mask_BT[:, 1:].bool()  # positions predicting a generated token (EOS included)
        head = lm_head(model).to(torch.float32)
        with add_direction(model, layer, vector, coeff):
            hs = forward_hidden(model, batch)[:, :-1][mask]
        hp = forward_hidden(model, batch)[:, :-1][mask]
    finally:
        model.train(was)
    ls, lp = torch.log_softmax(head.logits(hs), -1), torch.log_softmax(head.logits(hp), -1)
    delta = ls - lp
    banned = ls.exp().mean(0) < cfg.min_prob
    special = [i for i in (tokenizer.all_special_ids or []) if i < banned.shape[0]]
    banned[special] = True
    ids, votes = vote(delta, banned, cfg.vote_top, cfg.num_tokens)
    text = [tokenizer.decode([i]) for i in ids]
    log(f"safesteer: {len(ids)} safety tokens from {delta.shape[0]} positions of {len(ro.texts)} steered samples: "
        + " ".join(repr(t) for t in text[:20]) + (" ..." if len(ids) > 20 else ""))
    info = {"text": text, "votes": votes, "mean_delta": [float(delta[:, i].mean()) for i in ids],
            "positions": int(delta.shape[0]), "samples": len(ro.texts), "banned": int(banned.sum()),
            "steered_samples": ro.texts[:16], "layer": layer, "coeff": coeff}
    return SafetyTokens(ids, info)
