"""SPD's teacher view: K/V activations projected onto the capability subspace.

Paper says: K/V activations are projected into the subspace during
self-generation ("projection hooks"); the formula and mixing are not public.

We do, for an activation ``h`` at a K or V site::

    h' = mu + P (h - mu) + beta (I - P)(h - mu),      P = U U^T

``beta = 0`` is the hard projection, ``beta = 1`` the identity, in between
the off-subspace part is shrunk. ``mu`` is the activation mean (0 when the
subspace was fit without centring). With per-head subspaces ``U`` is
block-diagonal, so ``P`` acts on each KV head separately. Computed as
``mu + beta h_c + (1 - beta)(h_c U) U^T`` (never a ``d x d`` matrix), in
float32 or wider, cast back to the activation dtype.

Where: at the K/V projection output (see :mod:`selfdistill.arch`), i.e.
before rotary embedding and before Qwen3 / Gemma 3's ``k_norm``. So the
*pre-RoPE* keys are projected (RoPE is a position-dependent rotation, so a
fixed subspace is only meaningful before it), and on Qwen3 the key norm
rescales the projected key per head. The KV cache is filled downstream of the
hook, so during ``generate`` it stores the projected (then rotated) values.

For generation the map can also be *folded* into the projection's weights
(``fold=True``): a site is the output of a linear map ``h W^T + b``, so its
edit ``(h W^T + b) A + c`` is the linear map with weight ``A W`` and bias
``A b + c`` (``A`` symmetric). Generation then costs exactly what it costs
without SPD; the weights are restored bit for bit on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from selfdistill.arch import Kind, KeySite, KVEdit, KVSite, SiteKey, edit_kv, sites_by_key
from selfdistill.methods.spd.subspace import Subspace, SubspaceSet, layer_energy, top_layers

LayerSpec = Union[Literal["all"], Sequence[int], tuple[Literal["top"], int]]


def project(h_Xd: torch.Tensor, U_dr: torch.Tensor, beta: float, mu_d: torch.Tensor | None = None) -> torch.Tensor:
    """``mu + P(h - mu) + beta (I - P)(h - mu)`` with ``P = U U^T``; ``U`` has orthonormal columns."""
    if beta == 1.0:
        return h_Xd
    dtype = torch.promote_types(h_Xd.dtype, torch.float32)
    U_dr = U_dr.to(h_Xd.device, dtype)
    hc_Xd = h_Xd.to(dtype)
    if mu_d is not None:
        mu_d = mu_d.to(h_Xd.device, dtype)
        hc_Xd = hc_Xd - mu_d
    out_Xd = (1.0 - beta) * ((hc_Xd @ U_dr) @ U_dr.T)
    if beta != 0.0:
        out_Xd = out_Xd + beta * hc_Xd
    if mu_d is not None:
        out_Xd = out_Xd + mu_d
    return out_Xd.to(h_Xd.dtype)


#: Sites up to this width (or up to 4 x the rank) use one dense ``d x d`` map; wider ones the rank-r form,
#: whose cost grows as ``2 d r`` instead of ``d^2`` (it matters in the prefill, where rows are many).
DENSE_MAX_DIM = 64


def dense_map(U_dr: torch.Tensor, beta: float, mu_d: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`project` as ``h' = h A + c``: ``(A, c)`` in float64 on ``U``'s device.

    ``A = beta I + (1 - beta) U U^T`` (symmetric) and ``c = mu - mu A`` (0 without centring), so
    ``h A + c = mu + A (h - mu)``.
    """
    U = U_dr.detach().double()
    A = (1.0 - beta) * (U @ U.T)
    A.diagonal().add_(beta)
    return A, _offset(U, beta, mu_d)


def _offset(U: torch.Tensor, beta: float, mu_d: torch.Tensor | None) -> torch.Tensor:
    """``c = mu - mu A`` without forming ``A`` (float64 ``U``)."""
    if mu_d is None:
        return torch.zeros(U.shape[0], dtype=torch.float64, device=U.device)
    mu = mu_d.detach().double().to(U.device)
    return mu - (beta * mu + (1.0 - beta) * ((mu @ U) @ U.T))


def affine_form(U_dr: torch.Tensor, beta: float, mu_d: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`project` as ``h' = h A + c`` (dense, :func:`dense_map`), or ``h' = beta h + (h U) W + c``
    (``W = (1 - beta) U^T``): returns ``(A or U, None or W, c)``, float64.
    """
    U = U_dr.detach().double()
    if U.shape[0] <= max(DENSE_MAX_DIM, 4 * U.shape[1]):
        A, c = dense_map(U, beta, mu_d)
        return A, None, c
    return U, (1.0 - beta) * U.T, _offset(U, beta, mu_d)


def projector(sub: Subspace, beta: float) -> KVEdit:
    """The edit :func:`project` with one site's subspace, as a precomputed affine map.

    Same map as :func:`project` (``mu + P(h - mu) + beta (I - P)(h - mu)``),
    computed in float32 or wider and cast back, but folded once per device and
    dtype into ``h A + c`` (one fused multiply-add, for narrow sites: see
    :data:`DENSE_MAX_DIM`) or ``beta h + (h U) W + c`` (two thin matmuls), so
    the hook adds one to three kernels per call, not about ten.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
    d = sub.dim

    def fn(h_Xd: torch.Tensor) -> torch.Tensor:
        if h_Xd.shape[-1] != d:
            raise ValueError(f"subspace of width {d} applied to an activation of width {h_Xd.shape[-1]}")
        if beta == 1.0:
            return h_Xd
        dtype = h_Xd.dtype if h_Xd.dtype in (torch.float32, torch.float64) else torch.promote_types(
            h_Xd.dtype, torch.float32)
        key = (h_Xd.device, dtype)
        form = cache.get(key)
        if form is None:  # as F.linear weights: A (symmetric), U^T, W^T
            M, W, c = affine_form(sub.U_dr, beta, sub.mu_d)
            M_t = M if W is None else M.T
            form = cache[key] = (M_t.contiguous().to(h_Xd.device, dtype), None if W is None else
                                 W.T.contiguous().to(h_Xd.device, dtype), c.to(h_Xd.device, dtype))
        M_t, W_t, c = form
        h = h_Xd if h_Xd.dtype == dtype else h_Xd.to(dtype)
        if W_t is None:
            out = F.linear(h, M_t, c)  # h A + c (A symmetric, so A^T = A)
        else:
            out = F.linear(F.linear(h, M_t), W_t, c)  # (h U) W + c
            if beta != 0.0:
                out.add_(h, alpha=beta)
        return out if out.dtype == h_Xd.dtype else out.to(h_Xd.dtype)

    return fn


def select_layers(subspaces: Mapping[SiteKey, Subspace], layers: LayerSpec) -> list[int]:
    """Resolve ``'all'``, an explicit list, or ``('top', n)`` (top-n layers by gradient energy)."""
    available = sorted({layer for layer, _ in subspaces})
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', a list of ints or ('top', n), got {layers!r}")
        return available
    if isinstance(layers, tuple) and len(layers) == 2 and layers[0] == "top":
        n = int(layers[1])
        if n < 1:
            raise ValueError(f"layers=('top', n) needs n >= 1, got {n}")
        return top_layers(layer_energy(subspaces), n)
    chosen = sorted({int(x) for x in layers})
    missing = [x for x in chosen if x not in available]
    if missing:
        raise KeyError(f"no subspace for layer {missing[0]}; subspaces cover layers {available}")
    return chosen


def _plain_linear(mod: nn.Module) -> bool:
    """``nn.Linear`` itself, or a subclass known to compute ``x W^T + b`` with nothing else (Falcon's)."""
    cls = type(mod)
    return cls is nn.Linear or (cls.__name__ == "FalconLinear" and cls.__bases__ == (nn.Linear,))


def foldable(site: KVSite) -> bool:
    """True when writing ``site``'s module's weight changes what it computes, and nothing else is in the way.

    A plain ``nn.Linear`` or Falcon's ``FalconLinear`` (the same map, its bias added after the matmul; not a
    LoRA/quantised wrapper, not GPT-2's Conv1D) with an ordinary floating-point weight that is materialised
    (not offloaded to ``meta``) and not recomputed by a pre-hook (weight norm, accelerate's offloading). A
    site that is a module's output columns folds into those weight rows, whether a slice or interleaved.
    """
    mod = site.module
    if site.layout != "flat" or not _plain_linear(mod) or mod._forward_pre_hooks:
        return False
    w = mod.weight
    return type(w.data) is torch.Tensor and w.is_floating_point() and not w.is_meta


@contextmanager
def fold_kv(model: nn.Module, subspaces: Mapping[SiteKey, Subspace], beta: float,
            key_site: KeySite = "auto") -> Iterator[None]:
    """Within the block, each site's projection is folded into its module's weight and bias (in place).

    For no-grad use (generation, evaluation): a backward pass inside the block
    would give gradients of the folded weights. The edited rows (and bias
    entries) are restored bit for bit on exit, also on exception; only they are
    backed up, so the extra memory is one K/V projection's rows per site. A
    module without a bias gets one for the block when the map has an offset
    (centring). Folding rounds ``A W`` to the weight's dtype (bf16/fp16
    models: not bitwise the hook form, which applies ``A`` in fp32 to the
    rounded output). Sites must be :func:`foldable`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    by_key = sites_by_key(model, key_site)
    by_module: dict[int, list[tuple[KVSite, Subspace]]] = {}
    for key, sub in subspaces.items():
        site = by_key[key]
        if not foldable(site):
            raise TypeError(f"{site.module_name} ({type(site.module).__name__}) cannot be folded: use the hook form")
        if sub.dim != site.width:
            where = f"[{site.start}:{site.stop}]" + (f" of every {site.period} columns" if site.period else "")
            raise ValueError(f"subspace of width {sub.dim} for {site.module_name}{where} (width {site.width})")
        by_module.setdefault(id(site.module), []).append((site, sub))
    # per module: (module, [(rows, weight rows, bias rows or None)], bias added for the block); rows are a
    # slice, or an index tensor for an interleaved site (GPT-NeoX, Bloom, Falcon's query_key_value)
    saved: list[tuple[nn.Linear, list[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor | None]], bool]] = []
    try:
        with torch.no_grad():
            for edits in by_module.values():
                mod = edits[0][0].module
                W, dev = mod.weight, mod.weight.device
                new_b = None
                if mod.bias is None and any(s.mu_d is not None for _, s in edits):
                    new_b = torch.zeros(W.shape[0], dtype=W.dtype, device=dev)
                backup: list[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
                saved.append((mod, backup, new_b is not None))
                # Nesting counts: the vLLM backend must not sample from unfolded copies while any fold is active.
                mod._selfdistill_kv_folded = getattr(mod, "_selfdistill_kv_folded", 0) + 1
                for site, sub in edits:
                    sl = site.rows(dev)
                    backup.append((sl, W[sl].clone(), None if mod.bias is None else mod.bias[sl].clone()))
                    A, c = dense_map(sub.U_dr.to(dev), beta, sub.mu_d)
                    W[sl] = (A @ W[sl].to(torch.float64)).to(W.dtype)
                    if mod.bias is not None:
                        mod.bias[sl] = (A @ mod.bias[sl].to(torch.float64) + c).to(mod.bias.dtype)
                    elif new_b is not None:
                        new_b[sl] = c.to(W.dtype)
                if new_b is not None:
                    mod.bias = nn.Parameter(new_b, requires_grad=False)
        yield
    finally:
        with torch.no_grad():
            for mod, backup, added in reversed(saved):
                for sl, W0, b0 in reversed(backup):
                    mod.weight[sl] = W0
                    if b0 is not None:
                        mod.bias[sl] = b0
                if added:
                    mod.bias = None
                n = getattr(mod, "_selfdistill_kv_folded", 0) - 1
                if n > 0:
                    mod._selfdistill_kv_folded = n
                else:
                    mod.__dict__.pop("_selfdistill_kv_folded", None)


@contextmanager
def project_kv(model: nn.Module, subspaces: SubspaceSet | Mapping[SiteKey, Subspace], beta: float = 0.0,
               layers: LayerSpec = "all", kinds: Sequence[Kind] = ("k", "v"), fold: bool = False,
               key_site: KeySite | None = None) -> Iterator[list[SiteKey]]:
    """Within the block, the chosen layers' K and/or V activations are projected.

    ``fold=True`` (no-grad use only: generation, evaluation) folds the map into
    the weights of every :func:`foldable` site (no per-call cost) and hooks the
    others; ``False`` hooks every site. Yields the list of edited sites. Hooks
    are removed and weights restored on exit, also on exception. K sites are
    where the subspaces were fit (``SubspaceSet.key_site``), unless
    ``key_site`` says otherwise (default for a plain mapping: ``auto``).
    """
    subs = subspaces.subspaces if isinstance(subspaces, SubspaceSet) else dict(subspaces)
    if key_site is None:
        key_site = subspaces.key_site if isinstance(subspaces, SubspaceSet) else "auto"
    bad_kinds = [k for k in kinds if k not in ("k", "v")]
    if bad_kinds:
        raise ValueError(f"kinds must be 'k' and/or 'v', got {bad_kinds[0]!r}")
    keys = [(layer, kind) for layer in select_layers(subs, layers) for kind in kinds]
    missing = [k for k in keys if k not in subs]
    if missing:
        raise KeyError(f"no subspace for site {missing[0]}")
    by_key = sites_by_key(model, key_site)
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise KeyError(f"{type(model).__name__} has no K/V site {unknown[0]}; "
                       f"layers are 0..{max(l for l, _ in by_key)}, kinds 'k'/'v'")
    folded = [k for k in keys if fold and beta != 1.0 and foldable(by_key[k])]
    hooked = [k for k in keys if k not in folded]
    with fold_kv(model, {k: subs[k] for k in folded}, beta, key_site), \
            edit_kv(model, {k: projector(subs[k], beta) for k in hooked}, key_site):
        yield keys
