"""The one architecture adapter: where a causal LM produces its keys and values.

Methods that edit or read K/V activations (SPD's projection, its gradient
extraction) talk only to :func:`kv_sites` and :func:`edit_kv`; every
architecture difference lives here.

A *site* is where one layer's keys (or values) are what attention will
compare, read and edited as ``(..., num_kv_heads * head_dim)``, head-major,
always *before* rotary embedding:

- separate projections (Llama, Mistral, Qwen2, Gemma 1/2, OPT, ...): the
  whole output of ``k_proj`` / ``v_proj``;
- fused projections: a contiguous slice of one module's output, GPT-2's
  ``c_attn`` (Conv1D, q|k|v of ``hidden`` each), Phi-3's ``qkv_proj``
  (q of ``heads*head_dim``, then k and v of ``kv_heads*head_dim`` each) and
  Falcon-7B's multi-query ``query_key_value`` (q, then one k and one v head);
- interleaved fused projections: the same columns of every per-head group of
  one module's output (``period``), GPT-NeoX / Pythia and Bloom's
  ``query_key_value`` (viewed as ``(heads, 3, head_dim)``: q, k, v per head),
  Falcon's without multi-query (the same) and Falcon's new decoder
  architecture (``(kv_heads, q_per_kv + 2, head_dim)``: a KV head's queries,
  then its k and v). These are linear maps' outputs too: a site's columns are
  weight rows, so they fold like slices. Keys are the projection output
  (rotary comes after the split; none of these has a key norm);
- key norms (Qwen3, Gemma 3, OLMo 2, ...: a ``k_norm`` after ``k_proj``): the
  K site is the **output of ``k_norm``** (``key_site="auto"``). Before the
  norm the loss is invariant to rescaling a head's key, so every key gradient
  there is orthogonal to its own key and a gradient subspace of raw keys
  misses what attention compares. ``key_site="proj"`` keeps the raw
  ``k_proj`` output (the v1 behaviour, an ablation). A per-head norm's output
  is ``(..., heads, head_dim)``; the site flattens it (``layout="heads"``).
  Such a site is not a linear map's output, so it is edited by a hook, never
  folded into weights. Values have no norm: V sites are unchanged.

Grouped-query attention needs nothing special: a site holds the KV heads,
not the query heads.

Not handled: a ``query_key_value`` of another family (ChatGLM, Persimmon, ...),
whose layout is not known here, raises a clear error.
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
KeySite = Literal["auto", "proj"]


@dataclass(frozen=True)
class KVSite:
    """Where one layer's keys or values come out: ``module``'s output ``[..., start:stop]``, or those columns
    of each of its ``num_heads`` groups of ``period`` columns (interleaved fused layouts)."""

    layer: int
    kind: Kind
    module_name: str
    module: nn.Module
    start: int
    stop: int
    num_heads: int  # KV heads (not query heads)
    head_dim: int
    #: "flat": the module's output is (..., width) and the site is [..., start:stop];
    #: "heads": a per-head norm's output (..., num_heads, head_dim), the whole of it (flattened to read).
    #: "norm": a norm over the whole key vector (OLMo 2), output (..., width).
    layout: Literal["flat", "heads", "norm"] = "flat"
    #: 0: the site is one slice of the output. > 0 (interleaved, "flat" only): the output is
    #: (..., num_heads, period), one group per KV head, and the site is [..., start:stop] of every group
    #: (stop - start = head_dim), read head-major.
    period: int = 0

    @property
    def key(self) -> SiteKey:
        return (self.layer, self.kind)

    @property
    def width(self) -> int:
        return (self.stop - self.start) * (self.num_heads if self.period else 1)

    @property
    def whole_output(self) -> bool:
        """True when the site is the module's entire output (separate projections, key norms)."""
        return self.layout != "flat" or (not self.period and self.start == 0
                                         and _out_features(self.module) == self.stop)

    def groups(self, out_width: int) -> tuple[int, int]:
        """``(groups, period)``: the module's output of ``out_width`` seen as groups whose columns
        ``[start:stop]`` are the site (one group for a slice)."""
        return (self.num_heads, self.period) if self.period else (1, out_width)

    def rows(self, device: torch.device | None = None) -> slice | torch.Tensor:
        """The site's output columns, i.e. its rows of the module's weight, in the order :meth:`read` gives
        them: a slice, or an index tensor for an interleaved site."""
        if not self.period:
            return slice(self.start, self.stop)
        heads = torch.arange(self.num_heads, device=device).unsqueeze(1) * self.period
        return (heads + torch.arange(self.start, self.stop, device=device)).flatten()

    def heads_first(self, inp: torch.Tensor | None) -> bool:
        """For a per-head norm: True when its input is ``(B, heads, T, head_dim)`` (Gemma 3 transposes before
        the norm, Qwen3 after). Told by the input's strides: it is a view of the projection's ``(B, T, width)``
        output, so the heads axis is the one with stride ``head_dim``."""
        if self.layout != "heads" or inp is None or inp.dim() != 4:
            return False
        return inp.stride(1) == self.head_dim and inp.stride(2) != self.head_dim

    def read(self, out: torch.Tensor, heads_first: bool = False) -> torch.Tensor:
        """The site's activation ``(..., width)`` in its module's output ``out``."""
        if self.layout == "heads":
            return (out.transpose(1, 2) if heads_first else out).flatten(-2)
        if self.period:
            return out.unflatten(-1, (self.num_heads, self.period))[..., self.start:self.stop].flatten(-2)
        return out[..., self.start:self.stop]

    def write(self, out: torch.Tensor, new: torch.Tensor, heads_first: bool = False) -> torch.Tensor:
        """``out`` with the site replaced by ``new`` ``(..., width)`` (a whole-output site: ``new`` reshaped)."""
        if self.layout == "heads":
            shaped = new.unflatten(-1, (self.num_heads, self.head_dim))
            return (shaped.transpose(1, 2) if heads_first else shaped).to(out.dtype)
        raise ValueError("write() is for whole-output sites; slices go through _apply_edits")


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


def _key_norm_site(attn: nn.Module, k: KVSite, prefix: str) -> KVSite:
    """The K site moved to the output of the attention's ``k_norm`` (same width and heads)."""
    norm = dict(attn.named_children())["k_norm"]
    weight = getattr(norm, "weight", None)
    n = weight.numel() if isinstance(weight, torch.Tensor) else k.head_dim
    if n == k.head_dim:  # per-head norm (Qwen3, Gemma 3): output (..., heads, head_dim)
        layout = "heads"
    elif n == k.width:  # norm over the whole key vector (OLMo 2): output (..., width)
        layout = "norm"
    else:
        raise ValueError(f"{prefix}.k_norm: weight of {n} matches neither head_dim {k.head_dim} "
                         f"nor the key width {k.width}")
    return KVSite(k.layer, "k", f"{prefix}.k_norm", norm, 0, k.width, k.num_heads, k.head_dim, layout)


#: Attention classes whose ``query_key_value`` layout is known (a subclass counts: Falcon's flash attention).
_QKV_FAMILIES = ("GPTNeoXAttention", "BloomAttention", "FalconAttention")


def _qkv_family(attn: nn.Module) -> str | None:
    """Which of :data:`_QKV_FAMILIES` ``attn`` is; None for another ``query_key_value`` (ChatGLM, Persimmon...)."""
    names = {cls.__name__ for cls in type(attn).__mro__}
    return next((family for family in _QKV_FAMILIES if family in names), None)


def _query_key_value_sites(attn: nn.Module, layer: int, prefix: str, num_q_heads: int | None,
                           head_dim: int) -> list[KVSite]:
    """K and V sites of a fused ``query_key_value``, split as the family's own attention splits it.

    GPT-NeoX, Bloom and Falcon without multi-query view the output as ``(heads, 3, head_dim)``; Falcon's new
    decoder architecture as ``(kv_heads, q_per_kv + 2, head_dim)`` (the KV head's k and v last in its group);
    Falcon's multi-query as q heads, then one k head, then one v head (a plain slice).
    """
    name, module = f"{prefix}.query_key_value", dict(attn.named_children())["query_key_value"]
    family = _qkv_family(attn)
    if family is None or num_q_heads is None:
        raise ValueError(f"{name} of {type(attn).__name__}: its q/k/v layout is not known "
                         f"(known: {', '.join(_QKV_FAMILIES)}); add this architecture to selfdistill/arch.py")
    hd = head_dim

    def site(kind: Kind, start: int, heads: int, period: int = 0) -> KVSite:
        return KVSite(layer, kind, name, module, start, start + (hd if period else heads * hd), heads, hd,
                      period=period)

    if family == "FalconAttention" and getattr(attn, "new_decoder_architecture", False):
        kv = getattr(attn, "num_kv_heads", None)
        if not isinstance(kv, int) or kv < 1 or num_q_heads % kv:
            raise ValueError(f"{name}: num_kv_heads {kv} does not divide the {num_q_heads} query heads")
        per, period = num_q_heads // kv, (num_q_heads // kv + 2) * hd
        expected, sites = kv * period, [site("k", per * hd, kv, period), site("v", (per + 1) * hd, kv, period)]
    elif family == "FalconAttention" and getattr(attn, "multi_query", False):
        q = num_q_heads * hd
        expected, sites = q + 2 * hd, [site("k", q, 1), site("v", q + hd, 1)]
    else:
        period = 3 * hd
        expected, sites = num_q_heads * period, [site("k", hd, num_q_heads, period),
                                                 site("v", 2 * hd, num_q_heads, period)]
    width = _out_features(module)
    if width != expected:
        raise ValueError(f"{name}: width {width}, but {type(attn).__name__} with {num_q_heads} heads of "
                         f"{hd} splits {expected} columns")
    return sites


def _sites_of(attn: nn.Module, layer: int, prefix: str, config: object, key_site: KeySite = "auto") -> list[KVSite]:
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
        k = site("k", "k_proj", 0, _out_features(children["k_proj"]))
        if key_site == "auto" and isinstance(children.get("k_norm"), nn.Module):
            k = _key_norm_site(attn, k, prefix)
        return [k, site("v", "v_proj", 0, _out_features(children["v_proj"]))]
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
    if "query_key_value" in children:  # GPT-NeoX, Bloom, Falcon: per-head interleaved (or Falcon's q|k|v)
        return _query_key_value_sites(attn, layer, prefix, num_q_heads, head_dim)
    return []


def kv_sites(model: nn.Module, key_site: KeySite = "auto") -> list[KVSite]:
    """Every K and V site of a Hugging Face causal LM, sorted by (layer, kind).

    ``key_site``: ``auto`` puts K sites after a key norm where the
    architecture has one; ``proj`` keeps them at the raw projection output.

    Attention modules are found by walking the decoder's modules for one with
    ``k_proj``+``v_proj``, ``c_attn``, ``qkv_proj`` or ``query_key_value`` children; the layer index
    is the module's ``layer_idx`` when it has one, else its order.
    """
    names = {id(m): n for n, m in model.named_modules()}
    config = _text_config(model)
    found: list[tuple[nn.Module, str]] = []
    for _, module in _decoder_root(model).named_modules():
        child_names = {n for n, _ in module.named_children()}
        if {"k_proj", "v_proj"} <= child_names or child_names & {"c_attn", "qkv_proj", "query_key_value"}:
            found.append((module, names.get(id(module), type(module).__name__)))
    sites: list[KVSite] = []
    for order, (attn, prefix) in enumerate(found):
        layer = getattr(attn, "layer_idx", None)
        sites += _sites_of(attn, layer if isinstance(layer, int) else order, prefix, config, key_site)
    if not sites:
        raise ValueError(
            f"{type(model).__name__}: no K/V projections found (looked for attention modules with "
            "k_proj+v_proj, c_attn, qkv_proj or query_key_value children); add this architecture to "
            "selfdistill/arch.py")
    keys = [s.key for s in sites]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{type(model).__name__}: two attention modules claim the same layer index")
    return sorted(sites, key=lambda s: (s.layer, s.kind))


def sites_by_key(model: nn.Module, key_site: KeySite = "auto") -> dict[SiteKey, KVSite]:
    """:func:`kv_sites` keyed by ``(layer, kind)``."""
    return {s.key: s for s in kv_sites(model, key_site)}


def _apply_edits(out: torch.Tensor, edits: list[tuple[KVSite, KVEdit]], inp: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``out`` with each site's columns replaced by ``fn(site)`` (out-of-place, autograd-safe).

    Slices and interleaved sites alike: the output is seen as ``(..., groups, period)`` (one group for
    slices) and rebuilt by concatenating, in every group, the untouched columns and each edited site's.
    """
    if len(edits) == 1 and edits[0][0].whole_output:
        site, fn = edits[0]
        if site.layout == "heads":
            first = site.heads_first(inp)
            old = site.read(out, first)
            return site.write(out, _checked(fn(old), old, site), first)
        return _checked(fn(out), out, site)
    groups, period = edits[0][0].groups(out.shape[-1])
    if any(site.groups(out.shape[-1]) != (groups, period) for site, _ in edits):
        raise ValueError(f"{edits[0][0].module_name}: its sites group the output differently")
    grouped = out.unflatten(-1, (groups, period))
    pieces, cursor = [], 0
    for site, fn in sorted(edits, key=lambda e: e[0].start):
        old = site.read(out)
        pieces.append(grouped[..., cursor:site.start])
        pieces.append(_checked(fn(old), old, site).unflatten(-1, (groups, site.stop - site.start)))
        cursor = site.stop
    pieces.append(grouped[..., cursor:])
    return torch.cat(pieces, dim=-1).flatten(-2)


def _checked(new: torch.Tensor, old: torch.Tensor, site: KVSite) -> torch.Tensor:
    if new.shape != old.shape:
        raise ValueError(f"edit of site {site.key} ({site.module_name}) changed shape "
                         f"{tuple(old.shape)} -> {tuple(new.shape)}")
    return new.to(old.dtype)


@contextmanager
def edit_kv(model: nn.Module, fn_by_site: Mapping[SiteKey, KVEdit], key_site: KeySite = "auto") -> Iterator[None]:
    """Within the block, each site's activation ``h (..., d)`` is replaced by ``fn(h)``.

    One forward hook per projection module (a fused module's K and V edits
    share it). Works for plain forwards, training and ``generate``: with a KV
    cache, the cache is filled with edited activations (after RoPE of the
    edited ones). Hooks are removed on exit, also on exception.
    """
    by_key = sites_by_key(model, key_site)
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
            if len(edits) == 1 and edits[0][0].whole_output and edits[0][0].layout == "flat":
                # the common case, resolved once, not per call
                site, fn = edits[0]

                def hook(_mod: nn.Module, _args: object, out: object, site=site, fn=fn) -> torch.Tensor:
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(f"{site.module_name} returned {type(out).__name__}, not a tensor")
                    new = fn(out)
                    if new.shape != out.shape or new.dtype != out.dtype:
                        return _checked(new, out, site)
                    return new
            else:
                def hook(_mod: nn.Module, args: tuple, out: object, edits=edits) -> torch.Tensor:
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(f"{edits[0][0].module_name} returned {type(out).__name__}, not a tensor")
                    inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
                    return _apply_edits(out, edits, inp)

            handles.append(edits[0][0].module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
