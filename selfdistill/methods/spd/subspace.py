"""SPD's capability subspace: K/V gradients on correctness-defining tokens, and their top directions.

Paper says: a low-rank subspace is extracted "from the model's own gradients
on correctness-defining tokens". Which gradients, rank and layers are not public.

We do: for every K/V site (see :mod:`selfdistill.arch`), the gradient of the
summed next-token NLL of the marked target tokens with respect to the site's
activation, one ``d``-vector per sequence position. Over many batches we
accumulate the uncentred Gram matrix ``G = sum_n g_n g_n^T`` (``d x d``, with
``d = num_kv_heads * head_dim``, small) and take its eigendecomposition: the
subspace is spanned by the top eigenvectors, i.e. the top right singular
vectors of the stacked gradient matrix. The Gram route is memory-bounded,
batch-order independent up to float64 rounding, and deterministic (fixed sign
convention). Gradients are not centred: a direction every gradient shares is
the strongest signal, not an offset to remove. Separately we keep the mean of
the *activations*, which the projection may centre on (``center=True``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selfdistill.arch import KeySite, SiteKey, kv_sites
from selfdistill.objectives import token_logprobs_from_hidden
from selfdistill.scoring import lm_head
from selfdistill.sequences import SequenceBatch, forward_hidden

Positions = Literal["all", "completion", "selected"]
_META_KEY = "selfdistill.spd"
_FORMAT = 1


# --------------------------------------------------------------------------- gradients


@dataclass
class KVGrads:
    """One batch's per-site gradients and activations at the selected positions.

    ``grads[key]`` and ``acts[key]`` are ``(N, d)`` float32, rows aligned: row
    ``n`` is one (sequence, position) pair of the selection.
    """

    grads: dict[SiteKey, torch.Tensor]
    acts: dict[SiteKey, torch.Tensor]
    num_heads: dict[SiteKey, int]
    loss: float  # the summed NLL that was differentiated
    num_targets: int
    model_class: str = ""
    key_site: str = "auto"  # where the K sites were read (arch.kv_sites): auto = after a key norm


def _selection_mask(attention_mask_BT: torch.Tensor, loss_mask_BT: torch.Tensor,
                    positions: Positions, position_mask_BT: torch.Tensor | None) -> torch.Tensor:
    real_BT = attention_mask_BT.bool()
    if positions == "all":
        return real_BT
    if positions == "completion":
        return real_BT & loss_mask_BT.bool()
    if positions == "selected":
        if position_mask_BT is None:
            raise ValueError("positions='selected' needs position_mask_BT")
        return real_BT & position_mask_BT.bool()
    raise ValueError(f"positions must be 'all', 'completion' or 'selected', got {positions!r}")


def kv_gradients(model: nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                 loss_mask_BT: torch.Tensor, *, position_ids_BT: torch.Tensor | None = None,
                 sites: Iterable[SiteKey] | None = None, positions: Positions = "all",
                 position_mask_BT: torch.Tensor | None = None, chunk_size: int = 1024,
                 key_site: KeySite = "auto") -> KVGrads:
    """Gradients of the target tokens' summed NLL w.r.t. each K/V site activation.

    ``loss_mask_BT`` marks TARGET tokens: token ``t`` (``t >= 1``) counts with
    loss ``-log p(x_t | x_<t)``, read from the logits at position ``t-1`` (a
    mark at ``t = 0`` is ignored: nothing predicts it). The gradient at
    position ``s`` is then nonzero only if some target lies after ``s``.

    Rows kept (``positions``): ``'all'`` every non-padding position, prompt
    and completion (default: the projection acts on all of them during
    generation); ``'completion'`` positions where ``loss_mask_BT`` is 1;
    ``'selected'`` positions where ``position_mask_BT`` is 1. Padding may be on
    either side: position ids default to ``cumsum(attention_mask) - 1``, as
    ``generate`` does. Runs in eval mode (no dropout, no gradient
    checkpointing) and restores every module's mode; uses ``autograd.grad``,
    so no parameter's ``.grad`` is touched, and works with frozen weights.

    Memory: no batch x length x vocabulary tensor is held. The loss is read
    from the final hidden states of the target tokens only, through the
    chunked LM-head path (``chunk_size`` rows of logits at a time), with the
    model's head bias, logit scale or soft-cap (Phi, Cohere, Gemma 2).
    """
    by_key = {s.key: s for s in kv_sites(model, key_site)}
    keys = sorted(by_key) if sites is None else sorted(set(sites))
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise KeyError(f"{type(model).__name__} has no K/V site {missing[0]}")
    if not (input_ids_BT.shape == attention_mask_BT.shape == loss_mask_BT.shape):
        raise ValueError(f"input_ids {tuple(input_ids_BT.shape)}, attention_mask "
                         f"{tuple(attention_mask_BT.shape)} and loss_mask {tuple(loss_mask_BT.shape)} differ")
    target_BT1 = loss_mask_BT[:, 1:].bool() & attention_mask_BT[:, 1:].bool()
    if not target_BT1.any():
        raise ValueError("loss_mask_BT marks no target token after position 0: nothing to differentiate")
    select_BT = _selection_mask(attention_mask_BT, loss_mask_BT, positions, position_mask_BT)
    if position_ids_BT is None:
        position_ids_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)

    modules = {id(by_key[k].module): by_key[k].module for k in keys}
    outputs: dict[int, torch.Tensor] = {}
    heads_first: dict[int, bool] = {}  # per-head key norms: is the output (B, heads, T, head_dim)?
    site_of = {id(by_key[k].module): by_key[k] for k in keys}

    def capture(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not out.requires_grad:  # frozen weights: make the activation itself differentiable
            out = out.detach().requires_grad_(True)
        outputs[id(module)] = out
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        heads_first[id(module)] = site_of[id(module)].heads_first(inp)
        return out

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(capture) for m in modules.values()]
    try:
        model.eval()
        with torch.enable_grad():
            seqs = SequenceBatch(input_ids_BT, attention_mask_BT, loss_mask_BT, position_ids_BT)
            hidden_MH = forward_hidden(model, seqs, share_prefixes=False)[:, :-1][target_BT1]
            loss = _target_nll(model, hidden_MH, input_ids_BT[:, 1:][target_BT1], chunk_size)
            mod_ids = list(outputs)
            grads = torch.autograd.grad(loss, [outputs[i] for i in mod_ids], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.train(mode)

    grad_by_mod = dict(zip(mod_ids, grads))
    out_grads, out_acts, heads = {}, {}, {}
    for key in keys:
        site = by_key[key]
        act_BTW = outputs[id(site.module)].detach()
        grad_BTW = grad_by_mod[id(site.module)]
        if grad_BTW is None:  # site not on the loss's path (e.g. a KV-shared layer)
            grad_BTW = torch.zeros_like(act_BTW)
        first = heads_first.get(id(site.module), False)
        out_grads[key] = site.read(grad_BTW, first)[select_BT].float()
        out_acts[key] = site.read(act_BTW, first)[select_BT].float()
        heads[key] = site.num_heads
    return KVGrads(out_grads, out_acts, heads, float(loss.detach()), int(target_BT1.sum()),
                   type(model).__name__, key_site)


def _target_nll(model: nn.Module, hidden_MH: torch.Tensor, targets_M: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Summed NLL of the target tokens from their final hidden states, ``chunk_size`` rows of logits at a time,
    through the objective library's chunked path and the model's head (bias, scale, soft-cap: see
    :func:`~selfdistill.scoring.lm_head`); the head is detached, since only the activations' gradients are
    wanted."""
    logp_M = token_logprobs_from_hidden(hidden_MH, lm_head(model).detach(), targets_M, chunk_size=chunk_size)
    return -logp_M.sum()


# --------------------------------------------------------------------------- subspaces


@dataclass
class Subspace:
    """One site's capability subspace.

    ``U_dr``: orthonormal columns spanning it; with ``per_head`` fitting it is
    block-diagonal (head ``h``'s ``head_ranks[h]`` columns are zero outside
    head ``h``'s coordinates), so ``U U^T`` projects each KV head separately.
    ``mu_d``: activation mean to centre on, or None. ``singular_values_Hk``:
    the full spectrum of the stacked gradients per block, descending (``H=1``
    without per-head), for plots. ``grad_energy``: mean squared gradient norm
    per position, ``trace(G) / N``, for ranking layers.
    """

    U_dr: torch.Tensor
    mu_d: torch.Tensor | None
    singular_values_Hk: torch.Tensor
    head_ranks: tuple[int, ...]
    grad_energy: float = 0.0
    num_positions: int = 0

    @property
    def dim(self) -> int:
        return self.U_dr.shape[0]

    @property
    def rank(self) -> int:
        return self.U_dr.shape[1]


def _pick_rank(eigvals_k: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """Smallest rank reaching ``energy`` of the total (squared-singular-value) energy, capped by ``rank``."""
    k = eigvals_k.numel()
    if rank is None and energy is None:
        raise ValueError("give rank or energy (or both: energy, capped at rank)")
    if rank is not None and not 0 <= rank <= k:
        raise ValueError(f"rank must be in [0, {k}] (the block width), got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    r = k if rank is None else rank
    total = float(eigvals_k.sum())
    if energy is not None:
        if total <= 0.0:
            return 0
        frac_k = eigvals_k.cumsum(0) / total
        r = min(r, int((frac_k < energy - 1e-12).sum()) + 1)
    return min(r, k)


def _fix_signs(V_kr: torch.Tensor) -> torch.Tensor:
    """Each column's largest-|.| component made positive (first one on ties)."""
    if V_kr.shape[1] == 0:
        return V_kr
    idx_r = V_kr.abs().argmax(dim=0)
    signs_r = torch.sign(V_kr[idx_r, torch.arange(V_kr.shape[1])])
    return V_kr * torch.where(signs_r == 0, torch.ones_like(signs_r), signs_r)


def fit_subspace_from_gram(gram_dd: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                           per_head: int | None = None, mean_d: torch.Tensor | None = None,
                           num_positions: int = 0) -> Subspace:
    """Subspace from an accumulated gradient Gram matrix ``G = sum g g^T``.

    ``per_head=H`` splits ``d`` into ``H`` equal head blocks and fits each
    block's own top directions (``rank`` and ``energy`` then apply per head);
    ``None`` fits one basis over all of ``d``. Eigendecomposition in float64.
    """
    d = gram_dd.shape[0]
    H = per_head or 1
    if d % H:
        raise ValueError(f"per_head={H} does not divide the site width {d}")
    k = d // H
    G_dd = gram_dd.detach().to("cpu", torch.float64)
    G_dd = (G_dd + G_dd.T) / 2
    U_dr_blocks, spectra, ranks = [], [], []
    for h in range(H):
        eigvals_k, eigvecs_kk = torch.linalg.eigh(G_dd[h * k:(h + 1) * k, h * k:(h + 1) * k])
        eigvals_k, eigvecs_kk = eigvals_k.flip(0).clamp(min=0.0), eigvecs_kk.flip(1)
        r = _pick_rank(eigvals_k, rank, energy)
        block_dr = torch.zeros(d, r, dtype=torch.float64)
        block_dr[h * k:(h + 1) * k] = _fix_signs(eigvecs_kk[:, :r])
        U_dr_blocks.append(block_dr)
        spectra.append(eigvals_k.sqrt())
        ranks.append(r)
    n = max(num_positions, 1)
    return Subspace(
        U_dr=torch.cat(U_dr_blocks, dim=1).float(),
        mu_d=None if mean_d is None else mean_d.detach().to("cpu", torch.float32),
        singular_values_Hk=torch.stack(spectra).float(),
        head_ranks=tuple(ranks),
        grad_energy=float(G_dd.trace()) / n,
        num_positions=num_positions,
    )


def fit_subspace(grads_Nd: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                 per_head: int | None = None, mean_d: torch.Tensor | None = None) -> Subspace:
    """Subspace of a gradient matrix held in memory (rows are gradient vectors)."""
    g_Nd = grads_Nd.detach().to(torch.float64)
    return fit_subspace_from_gram(g_Nd.T @ g_Nd, rank=rank, energy=energy, per_head=per_head,
                                  mean_d=mean_d, num_positions=grads_Nd.shape[0])


@dataclass
class SubspaceSet:
    """All sites' subspaces plus how they were fit; what is saved and loaded."""

    subspaces: dict[SiteKey, Subspace]
    rank: int | None = None
    energy: float | None = None
    per_head: bool = False
    center: bool = False
    model_class: str = ""
    extra: dict = field(default_factory=dict)  # caller's notes (data, seed, ...), JSON-serialisable
    #: Where the K sites were when fit (arch.kv_sites); files from before key-norm sites load as "proj".
    key_site: str = "auto"


class SubspaceAccumulator:
    """Accumulates per-site gradient Gram matrices and activation sums over batches.

    Memory is ``d x d`` (float64) per site, whatever the number of batches.
    """

    def __init__(self) -> None:
        self.gram: dict[SiteKey, torch.Tensor] = {}
        self.act_sum: dict[SiteKey, torch.Tensor] = {}
        self.act_gram: dict[SiteKey, torch.Tensor] = {}  # sum a a^T: activation energy (diagnostics)
        self.count: dict[SiteKey, int] = {}
        self.num_heads: dict[SiteKey, int] = {}
        self.model_class = ""
        self.key_site = "auto"

    def add(self, kv: KVGrads) -> None:
        for key, g_Nd in kv.grads.items():
            g_Nd = g_Nd.detach().double()
            a_Nd = kv.acts[key].detach().double()
            if key not in self.gram:
                d = g_Nd.shape[1]
                self.gram[key] = torch.zeros(d, d, dtype=torch.float64, device=g_Nd.device)
                self.act_sum[key] = torch.zeros(d, dtype=torch.float64, device=g_Nd.device)
                self.act_gram[key] = torch.zeros(d, d, dtype=torch.float64, device=g_Nd.device)
                self.count[key] = 0
            self.gram[key] += g_Nd.T @ g_Nd
            self.act_sum[key] += a_Nd.sum(0)
            self.act_gram[key] += a_Nd.T @ a_Nd
            self.count[key] += g_Nd.shape[0]
            self.num_heads[key] = kv.num_heads[key]
        self.model_class = kv.model_class or self.model_class
        self.key_site = kv.key_site

    def layer_energy(self) -> dict[SiteKey, float]:
        """Mean squared gradient norm per position, per site."""
        return {k: float(G.trace()) / max(self.count[k], 1) for k, G in sorted(self.gram.items())}

    def fit(self, *, rank: int | None = None, energy: float | None = None, per_head: bool = False,
            center: bool = False, extra: dict | None = None) -> SubspaceSet:
        """Every site's subspace; ``center`` stores the activation mean as ``mu``."""
        if not self.gram:
            raise ValueError("no gradients accumulated: call add() first")
        subspaces = {}
        for key in sorted(self.gram):
            n = self.count[key]
            mean_d = (self.act_sum[key] / max(n, 1)).float() if center else None
            subspaces[key] = fit_subspace_from_gram(
                self.gram[key], rank=rank, energy=energy,
                per_head=self.num_heads[key] if per_head else None, mean_d=mean_d, num_positions=n)
        return SubspaceSet(subspaces, rank, energy, per_head, center, self.model_class, dict(extra or {}),
                           self.key_site)


def layer_energy(source: SubspaceAccumulator | SubspaceSet | Mapping[SiteKey, Subspace]) -> dict[SiteKey, float]:
    """Gradient energy per site (mean squared gradient norm per position)."""
    if isinstance(source, SubspaceAccumulator):
        return source.layer_energy()
    subs = source.subspaces if isinstance(source, SubspaceSet) else source
    return {k: s.grad_energy for k, s in sorted(subs.items())}


def top_layers(energy_by_site: Mapping[SiteKey, float], n: int) -> list[int]:
    """The ``n`` layers with the most gradient energy (K and V summed), ascending; ties to the lower layer."""
    by_layer: dict[int, float] = {}
    for (layer, _), e in energy_by_site.items():
        by_layer[layer] = by_layer.get(layer, 0.0) + e
    ranked = sorted(by_layer, key=lambda layer: (-by_layer[layer], layer))
    return sorted(ranked[:n])


# --------------------------------------------------------------------------- save / load


def save_subspaces(path: str | Path, sset: SubspaceSet) -> None:
    """One safetensors file: per site ``L{layer}.{kind}.U|mu|sv``, settings as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    sites_meta = {}
    for (layer, kind), sub in sorted(sset.subspaces.items()):
        name = f"L{layer}.{kind}"
        tensors[f"{name}.U"] = sub.U_dr.contiguous()
        tensors[f"{name}.sv"] = sub.singular_values_Hk.contiguous()
        if sub.mu_d is not None:
            tensors[f"{name}.mu"] = sub.mu_d.contiguous()
        sites_meta[name] = {"layer": layer, "kind": kind, "head_ranks": list(sub.head_ranks),
                            "grad_energy": sub.grad_energy, "num_positions": sub.num_positions}
    meta = {"format": _FORMAT, "rank": sset.rank, "energy": sset.energy, "per_head": sset.per_head,
            "center": sset.center, "model_class": sset.model_class,
            "layers": sorted({layer for layer, _ in sset.subspaces}), "sites": sites_meta,
            "extra": sset.extra, "key_site": sset.key_site}
    from selfdistill.atomic import atomic_file

    with atomic_file(Path(path)) as tmp:  # whole or absent, even after a kill mid-write
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})


def load_subspaces(path: str | Path) -> SubspaceSet:
    """Inverse of :func:`save_subspaces`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{path}: not an SPD subspace file (no '{_META_KEY}' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: subspace file format {meta.get('format')}, this version reads {_FORMAT}")
    tensors = load_file(str(path))
    subspaces = {}
    for name, s in meta["sites"].items():
        subspaces[(int(s["layer"]), s["kind"])] = Subspace(
            U_dr=tensors[f"{name}.U"], mu_d=tensors.get(f"{name}.mu"),
            singular_values_Hk=tensors[f"{name}.sv"], head_ranks=tuple(s["head_ranks"]),
            grad_energy=float(s["grad_energy"]), num_positions=int(s["num_positions"]))
    return SubspaceSet(subspaces, meta["rank"], meta["energy"], bool(meta["per_head"]),
                       bool(meta["center"]), meta["model_class"], meta.get("extra", {}), meta.get("key_site", "proj"))
