"""The one architecture adapter: where a causal LM produces its keys and values.

Methods that edit or read K/V activations (SPD's projection, its gradient
extraction) talk only to :func:`kv_sites` and :func:`edit_kv`; every
architecture difference lives here.

A *site* is the output of the module that produces one layer's keys (or
values), **before** anything else touches them:

- separate projections (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3, OPT, ...):
  the whole output of ``k_proj`` / ``v_proj``;
- fused projections: a contiguous slice of one module's output, GPT-2's
  ``c_attn`` (Conv1D, q|k|v of ``hidden`` each) and Phi-3's ``qkv_proj``
  (q of ``heads*head_dim``, then k and v of ``kv_heads*head_dim`` each).

So a site is always ``(..., num_kv_heads * head_dim)``, laid out head-major,
and it is seen *before* rotary embedding and *before* any per-head key norm
(Qwen3 and Gemma 3 apply ``k_norm`` after ``k_proj``: the K site is the raw
``k_proj`` output, the norm then acts on the edited keys). Grouped-query
attention needs nothing special: a site holds the KV heads, not the query heads.

Not handled: per-head interleaved fused layouts (GPT-NeoX / Falcon
``query_key_value``), which are not contiguous slices; they raise a clear error.
Layers that reuse another layer's cache (Gemma 3n KV sharing) still get sites,
but an edit there has no effect because the projection is never called.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping

import torch
from torch import nn

Kind = Literal["k", "v"]
SiteKey = tuple[int, Kind]
KVEdit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KVSite:
    """Where one layer's keys or values come out: ``module``'s output ``[..., start:stop]``."""

    layer: int
    kind: Kind
    module_name: str
    module: nn.Module
    start: int
    stop: int
    num_heads: int  # KV heads (not query heads)
    head_dim: int

    @property
    def key(self) -> SiteKey:
        return (self.layer, self.kind)

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def whole_output(self) -> bool:
        """True when the site is the module's entire output (separate projections)."""
        return self.start == 0 and _out_features(self.module) == self.stop


def _out_features(module: nn.Module) -> int:
    """Output width of a Linear / Conv1D (GPT-2) / PEFT-wrapped projection."""
    for name in ("out_features", "nf"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):
        return _out_features(base)
    raise TypeError(f"cannot read the output width of {type(module).__name__}")


def _first_attr(objs: tuple[object, ...], names: tuple[str, ...]) -> int | None:
    for obj in objs:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _text_config(model: nn.Module) -> object:
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _decoder_root(model: nn.Module) -> nn.Module:
    """The language decoder (skips vision/audio towers of multimodal models)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            root = get_decoder()
            if isinstance(root, nn.Module):
                return root
        except Exception:  # exotic wrappers: fall back to the whole model
            pass
    return model


def _sites_of(attn: nn.Module, layer: int, prefix: str, config: object) -> list[KVSite]:
    """K and V sites of one attention module, or [] if it has no recognised projection."""
    children = dict(attn.named_children())
    head_dim = _first_attr((attn, config), ("head_dim",))
    num_q_heads = _first_attr((attn, config), ("num_heads", "num_attention_heads", "n_head"))
    if head_dim is None and num_q_heads is not None:
        hidden = _first_attr((config,), ("hidden_size", "n_embd"))
        head_dim = hidden // num_q_heads if hidden else None
    if head_dim is None:
        raise ValueError(f"{type(attn).__name__} at {prefix}: cannot determine head_dim")

    def site(kind: Kind, child: str, start: int, stop: int) -> KVSite:
        width = stop - start
        if width % head_dim:
            raise ValueError(f"{prefix}.{child}: {kind} width {width} is not a multiple of head_dim {head_dim}")
        return KVSite(layer, kind, f"{prefix}.{child}", children[child], start, stop, width // head_dim, head_dim)

    if "k_proj" in children and "v_proj" in children:
        return [site("k", "k_proj", 0, _out_features(children["k_proj"])),
                site("v", "v_proj", 0, _out_features(children["v_proj"]))]
    if "c_attn" in children:  # GPT-2: q | k | v, each of width hidden (no GQA)
        width = _out_features(children["c_attn"])
        if "q_attn" in children or getattr(attn, "is_cross_attention", False) or width % 3:
            return []  # cross-attention: keys come from the encoder
        w = width // 3
        return [site("k", "c_attn", w, 2 * w), site("v", "c_attn", 2 * w, 3 * w)]
    if "qkv_proj" in children:  # Phi-3: q (heads*hd) | k (kv*hd) | v (kv*hd)
        width = _out_features(children["qkv_proj"])
        if num_q_heads is None:
            raise ValueError(f"{prefix}.qkv_proj: cannot determine the number of query heads")
        q = num_q_heads * head_dim
        if (width - q) % 2:
            raise ValueError(f"{prefix}.qkv_proj: width {width} does not split as q|k|v with q={q}")
        kv = (width - q) // 2
        return [site("k", "qkv_proj", q, q + kv), site("v", "qkv_proj", q + kv, q + 2 * kv)]
    return []


def kv_sites(model: nn.Module) -> list[KVSite]:
    """Every K and V site of a Hugging Face causal LM, sorted by (layer, kind).

    Attention modules are found by walking the decoder's modules for one with
    ``k_proj``+``v_proj``, ``c_attn`` or ``qkv_proj`` children; the layer index
    is the module's ``layer_idx`` when it has one, else its order.
    """
    names = {id(m): n for n, m in model.named_modules()}
    config = _text_config(model)
    found: list[tuple[nn.Module, str]] = []
    for _, module in _decoder_root(model).named_modules():
        child_names = {n for n, _ in module.named_children()}
        if {"k_proj", "v_proj"} <= child_names or child_names & {"c_attn", "qkv_proj"}:
            found.append((module, names.get(id(module), type(module).__name__)))
    sites: list[KVSite] = []
    for order, (attn, prefix) in enumerate(found):
        layer = getattr(attn, "layer_idx", None)
        sites += _sites_of(attn, layer if isinstance(layer, int) else order, prefix, config)
    if not sites:
        raise ValueError(
            f"{type(model).__name__}: no K/V projections found (looked for attention modules with "
            "k_proj+v_proj, c_attn or qkv_proj children); add this architecture to selfdistill/arch.py")
    keys = [s.key for s in sites]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{type(model).__name__}: two attention modules claim the same layer index")
    return sorted(sites, key=lambda s: (s.layer, s.kind))


def sites_by_key(model: nn.Module) -> dict[SiteKey, KVSite]:
    """:func:`kv_sites` keyed by ``(layer, kind)``."""
    return {s.key: s for s in kv_sites(model)}


def _apply_edits(out: torch.Tensor, edits: list[tuple[KVSite, KVEdit]]) -> torch.Tensor:
    """``out`` with each site's slice replaced by ``fn(slice)`` (out-of-place, autograd-safe)."""
    if len(edits) == 1 and edits[0][0].whole_output:
        site, fn = edits[0]
        return _checked(fn(out), out, site)
    pieces, cursor = [], 0
    for site, fn in sorted(edits, key=lambda e: e[0].start):
        pieces.append(out[..., cursor:site.start])
        pieces.append(_checked(fn(out[..., site.start:site.stop]), out[..., site.start:site.stop], site))
        cursor = site.stop
    pieces.append(out[..., cursor:])
    return torch.cat(pieces, dim=-1)


def _checked(new: torch.Tensor, old: torch.Tensor, site: KVSite) -> torch.Tensor:
    if new.shape != old.shape:
        raise ValueError(f"edit of site {site.key} ({site.module_name}) changed shape "
                         f"{tuple(old.shape)} -> {tuple(new.shape)}")
    return new.to(old.dtype)


@contextmanager
def edit_kv(model: nn.Module, fn_by_site: Mapping[SiteKey, KVEdit]) -> Iterator[None]:
    """Within the block, each site's activation ``h (..., d)`` is replaced by ``fn(h)``.

    One forward hook per projection module (a fused module's K and V edits
    share it). Works for plain forwards, training and ``generate``: with a KV
    cache, the cache is filled with edited activations (after RoPE / k_norm of
    the edited ones). Hooks are removed on exit, also on exception.
    """
    by_key = sites_by_key(model)
    unknown = [k for k in fn_by_site if k not in by_key]
    if unknown:
        raise KeyError(f"{type(model).__name__} has no K/V site {unknown[0]}; "
                       f"layers are 0..{max(l for l, _ in by_key)}, kinds 'k'/'v'")
    by_module: dict[int, list[tuple[KVSite, KVEdit]]] = {}
    for key, fn in fn_by_site.items():
        by_module.setdefault(id(by_key[key].module), []).append((by_key[key], fn))

    handles = []
    try:
        for edits in by_module.values():
            if len(edits) == 1 and edits[0][0].whole_output:  # the common case, resolved once, not per call
                site, fn = edits[0]

                def hook(_mod: nn.Module, _args: object, out: object, site=site, fn=fn) -> torch.Tensor:
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(f"{site.module_name} returned {type(out).__name__}, not a tensor")
                    new = fn(out)
                    if new.shape != out.shape or new.dtype != out.dtype:
                        return _checked(new, out, site)
                    return new
            else:
                def hook(_mod: nn.Module, _args: object, out: object, edits=edits) -> torch.Tensor:
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(f"{edits[0][0].module_name} returned {type(out).__name__}, not a tensor")
                    return _apply_edits(out, edits)

            handles.append(edits[0][0].module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
