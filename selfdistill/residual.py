"""The residual stream of a causal LM: the hidden state entering each decoder block, read and edited.

SafeSteer's refusal direction is a difference of mean residual-stream inputs
(Arditi et al.'s refusal-direction method); its teacher adds ``c * r`` to one
block's input at every position, and the direction is selected by *ablating*
it (projecting it out of every block's input, of each attention and MLP
output, and of the final norm's input). All of it goes through the blocks
found here, so any decoder with a ``layers`` list (Llama, Qwen, Mistral,
Gemma, SmolLM, GPT-2's ``h``...) works without per-architecture code.

Edits are forward (pre-)hooks installed for the duration of a ``with`` block
and removed on exit, also on exceptions: a *view* in the same sense as SPD's
K/V projection (:func:`selfdistill.arch.edit_kv`). With a KV cache
(``generate``), the cached keys and values are computed from the edited stream.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from selfdistill.arch import _decoder_root

Edit = Callable[[torch.Tensor], torch.Tensor]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's blocks, in order (``model.layers`` / ``transformer.h`` / ...)."""
    root = _decoder_root(model)
    for owner in (root, getattr(root, "model", None), getattr(root, "transformer", None)):
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers):
                return layers
    raise ValueError(f"{type(model).__name__}: no decoder block list found (looked for layers / h / blocks); "
                     "add this architecture to selfdistill/residual.py")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm after the last block (``norm`` / ``ln_f``), if the decoder has one."""
    root = _decoder_root(model)
    for owner in (root, getattr(root, "model", None), getattr(root, "transformer", None)):
        for name in ("norm", "ln_f", "final_layernorm"):
            mod = getattr(owner, name, None) if owner is not None else None
            if isinstance(mod, nn.Module):
                return mod
    return None


def _pre_hook(fn: Edit) -> Callable:
    """A forward pre-hook (with kwargs) replacing the block's hidden-state input by ``fn(h)``."""

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args and isinstance(args[0], torch.Tensor):
            h = args[0]
            return (_same(fn(h), h),) + tuple(args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            h = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": _same(fn(h), h)}
        raise TypeError(f"{type(_mod).__name__}: no hidden-state tensor among the block's inputs")

    return hook


def _out_hook(fn: Edit) -> Callable:
    """A forward hook replacing a module's output (a tensor, or a tuple whose first item is one) by ``fn``."""

    def hook(_mod: nn.Module, _args: tuple, out: object) -> object:
        if isinstance(out, torch.Tensor):
            return _same(fn(out), out)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (_same(fn(out[0]), out[0]),) + out[1:]
        return out

    return hook


def _same(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    if new.shape != old.shape:
        raise ValueError(f"a residual edit changed shape {tuple(old.shape)} -> {tuple(new.shape)}")
    return new.to(old.dtype)


@contextmanager
def edit_residual(model: nn.Module, fn_by_layer: Mapping[int, Edit]) -> Iterator[None]:
    """Within the block, the hidden state entering decoder block ``l`` is replaced by ``fn_by_layer[l](h)``."""
    layers = decoder_layers(model)
    bad = [layer for layer in fn_by_layer if not 0 <= layer < len(layers)]
    if bad:
        raise KeyError(f"{type(model).__name__} has blocks 0..{len(layers) - 1}, not {bad[0]}")
    handles = []
    try:
        for layer, fn in fn_by_layer.items():
            handles.append(layers[layer].register_forward_pre_hook(_pre_hook(fn), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add_direction(model: nn.Module, layer: int, vector: torch.Tensor, coeff: float = 1.0) -> Iterator[None]:
    """Steering: ``coeff * vector`` added to block ``layer``'s input at every position."""
    def add(h: torch.Tensor) -> torch.Tensor:
        return h + coeff * vector.to(device=h.device, dtype=h.dtype)

    with edit_residual(model, {layer: add}):
        yield


@contextmanager
def ablate_direction(model: nn.Module, vector: torch.Tensor) -> Iterator[None]:
    """Directional ablation: the unit direction of ``vector`` projected out of every block's input, every
    attention and MLP output and the final norm's input, so no later computation reads it."""
    unit = vector.float() / vector.float().norm().clamp_min(1e-12)

    def remove(h: torch.Tensor) -> torch.Tensor:
        u = unit.to(device=h.device, dtype=h.dtype)
        return h - (h @ u).unsqueeze(-1) * u

    layers = decoder_layers(model)
    handles = []
    try:
        with edit_residual(model, {i: remove for i in range(len(layers))}):
            for block in layers:
                for name in ("self_attn", "attn", "mlp"):
                    sub = getattr(block, name, None)
                    if isinstance(sub, nn.Module):
                        handles.append(sub.register_forward_hook(_out_hook(remove)))
            norm = final_norm(model)
            if norm is not None:
                handles.append(norm.register_forward_pre_hook(_pre_hook(remove), with_kwargs=True))
            yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_inputs(model: nn.Module, positions: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    """The hidden state entering every block at the given positions, (batch, layers, len(positions), hidden),
    fp32, from one forward of ``model(**inputs)``.

    ``positions`` index the sequence dimension, e.g. ``[-3, -2, -1]`` for the last three tokens of
    left-padded rows.
    """
    layers = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Edit:
        def fn(h: torch.Tensor) -> torch.Tensor:
            seen[layer] = h[:, positions, :].float()
            return h
        return fn

    with edit_residual(model, {i: keep(i) for i in range(len(layers))}):
        model(**inputs, use_cache=False)
    return torch.stack([seen[i] for i in range(len(layers))], dim=1)
