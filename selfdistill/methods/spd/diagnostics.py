"""SPD diagnostics: what the capability subspace holds, and what projecting onto it does to the data.

- :func:`energy_shares`: per site, the share of the probe's gradient energy
  and of its (centred) activation energy inside the subspace, against a
  uniformly random subspace of the same rank (whose expected share is
  ``rank / d`` for both). A subspace that holds most of the gradient energy
  but little more activation energy than a random one says the projection
  removes directions the model uses but the answer tokens do not need.
- :func:`principal_angles_deg`: angles between two subspaces of a site, e.g.
  the one fit on answer tokens and the one fit on style tokens
  (:func:`select_style_tokens`: the toy world's preamble and closing lines).
- :func:`projection_shift`: for each ``beta``, the projected policy's
  accuracy, its samples' style histogram, and how far it moved from the
  plain policy (KL(projected || plain) estimated on its own samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from selfdistill.methods.spd.selectors import token_char_ends
from selfdistill.methods.spd.subspace import SubspaceAccumulator, SubspaceSet
from selfdistill.tasks.base import ANSWER_MARKER, Item
from selfdistill.toy.tasks import PREAMBLES


@dataclass
class SiteShare:
    """Energy inside one site's subspace (shares in [0, 1])."""

    layer: int
    kind: str
    rank: int
    dim: int
    grad_share: float
    act_share: float

    @property
    def random_share(self) -> float:
        """Expected share of any fixed energy inside a uniformly random ``rank``-dim subspace."""
        return self.rank / self.dim


def energy_shares(acc: SubspaceAccumulator, sset: SubspaceSet) -> list[SiteShare]:
    """Gradient and centred-activation energy inside each site's subspace (from the accumulated statistics)."""
    out = []
    for key, sub in sorted(sset.subspaces.items()):
        if key not in acc.gram:
            continue
        n = max(acc.count[key], 1)
        U = sub.U_dr.double().to(acc.gram[key].device)
        G = acc.gram[key]
        mu = acc.act_sum[key] / n
        C = acc.act_gram[key] / n - torch.outer(mu, mu)
        out.append(SiteShare(key[0], key[1], sub.rank, sub.dim, _share(U, G), _share(U, C)))
    return out


def _share(U: torch.Tensor, M: torch.Tensor) -> float:
    """Share of the energy ``trace(M)`` inside span(U): ``trace(U^T M U) / trace(M)``."""
    return float(torch.trace(U.T @ M @ U) / torch.trace(M).clamp(min=1e-30))


def principal_angles_deg(U_a: torch.Tensor, U_b: torch.Tensor) -> list[float]:
    """Principal angles (degrees, ascending) between the column spans of two orthonormal bases."""
    s = torch.linalg.svdvals(U_a.double().T @ U_b.double()).clamp(-1.0, 1.0)
    return sorted(math.degrees(math.acos(float(x))) for x in s)


def style_char_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of a completion's style lines: a known preamble, or a closing ``So ...`` line."""
    spans, pos = [], 0
    for line in text.split("\n"):
        s = line.strip()
        if s and (s in PREAMBLES[1:] or (s.startswith("So ") and ANSWER_MARKER not in s)):
            spans.append((pos, pos + len(line)))
        pos += len(line) + 1
    return spans


def select_style_tokens(tokenizer, completion_ids: Sequence[int], text: str) -> list[int]:
    """0/1 per completion token: 1 on tokens of style lines (the answer-token selector's counterpart)."""
    spans = style_char_spans(text)
    ends = token_char_ends(tokenizer, completion_ids)
    out, prev = [], 0
    for e in ends:
        out.append(int(any(e > a and prev < b for a, b in spans) and e > prev))
        prev = e
    return out


@torch.no_grad()
def projection_shift(model, tokenizer, items: Sequence[Item], sset: SubspaceSet, betas: Sequence[float], *,
                     kinds: Sequence[str] = ("k", "v"), max_new_tokens: int = 96, batch_size: int = 64,
                     seed: int = 1234, system: str | None = None) -> list[dict[str, Any]]:
    """Per beta: accuracy, style histogram and KL(projected || plain) of the projected policy's samples.

    Samples are plain temperature-1 draws (no top-p / top-k) under the projection (hook form, so the
    same code serves every architecture); the KL is the mean over sampled tokens of
    ``log p_proj(x) - log p_plain(x)``, both scored on the same tokens.
    """
    from selfdistill.rollout import SamplingConfig, generate
    from selfdistill.scoring import target_logprobs
    from selfdistill.sequences import chat_prompt, make_batch
    from selfdistill.methods.spd.projection import project_kv
    from selfdistill.tasks.verify import verify_item
    from selfdistill.toy.tasks import style_of

    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, batch_size=batch_size)
    prompts = [chat_prompt(tokenizer, it.prompt, system) for it in items]
    rows = []
    for beta in betas:
        with project_kv(model, sset, beta=beta, kinds=tuple(kinds)):
            ro = generate(model, tokenizer, prompts, scfg, generator_seed=seed, desc="SPD diagnostics")
        acc = sum(verify_item(it, t) for it, t in zip(items, ro.texts)) / max(len(items), 1)
        styles = [style_of(t) for t in ro.texts]
        kl_sum, n_tok = 0.0, 0
        for s in range(0, len(items), batch_size):
            b = make_batch(ro.prompt_ids[s:s + batch_size], ro.completion_ids[s:s + batch_size],
                           tokenizer.pad_token_id)
            m = b.completion_mask_BT[:, 1:].double()
            with project_kv(model, sset, beta=beta, kinds=tuple(kinds)):
                lp_proj = target_logprobs(model, b).double()
            lp_plain = target_logprobs(model, b).double()
            kl_sum += float(((lp_proj - lp_plain) * m).sum())
            n_tok += int(m.sum())
        rows.append({"beta": beta, "accuracy": acc, "kl_proj_plain": kl_sum / max(n_tok, 1),
                     "spaced": sum(st["spaced"] for st in styles) / max(len(styles), 1),
                     "preamble": sum(st["preamble"] > 0 for st in styles) / max(len(styles), 1),
                     "closing": sum(st["closing"] for st in styles) / max(len(styles), 1),
                     "mean_len": sum(len(c) for c in ro.completion_ids) / max(len(items), 1)})
    return rows
