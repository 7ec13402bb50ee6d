"""A lean KV-cache sampler for Llama-family decoders (Llama, Qwen2, Qwen3, Mistral without sliding windows).

``transformers``' ``generate`` spends most of a small model's decode step in
Python: mask construction, cache bookkeeping, logits processors, stopping
criteria, output wrappers. This module runs the same decoder with the same
weights and the same sampling rule, token by token, with

- one preallocated K/V buffer per layer (written in place, no ``torch.cat``);
- each distinct prompt prefilled once, its cache copied to its duplicates
  (``samples_per_prompt`` rollouts of a prompt share one prefill);
- finished rows dropped from the batch (the cache is compacted when a
  quarter of the active rows have ended), so short completions stop costing;
- the LM head applied to the last position only.

Every sub-module that holds weights or that others hook is *called* as a
module (embeddings, norms, ``q/k/v/o_proj``, ``q_norm``/``k_norm``, the MLP,
the LM head), so forward hooks on them, SPD's K/V projection included, and
PEFT/LoRA wrappers behave exactly as under ``generate``. A model with hooks on
a module this loop does not call (a decoder layer, an attention block, the
model itself: e.g. residual-stream steering) is not supported:
:func:`unsupported_reason` says why and :func:`selfdistill.rollout.generate`
falls back to ``generate``.

Sampling is the rule of ``generate(do_sample=True)``: logits / temperature,
then top-k, then top-p (nucleus, at least one token kept), then one
multinomial draw (or, given per-row seeds, the inverse CDF at the row's own
uniform); temperature 0 is greedy. Positions follow ``generate``'s
convention for left-padded prompts (0 at the first real token).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def _parts(model: nn.Module):
    """(causal LM, decoder, layers) or None for a model this loop cannot run."""
    lm = model
    dec = getattr(lm, "model", None)
    layers = getattr(dec, "layers", None)
    if dec is None or layers is None or not hasattr(lm, "lm_head"):
        return None
    return lm, dec, layers


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def unsupported_reason(model: nn.Module) -> str | None:
    """None when :func:`sample` can run ``model`` exactly; otherwise a one-line reason."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        return f"model type {mtype!r} is not one of {SUPPORTED_TYPES}"
    parts = _parts(model)
    if parts is None:
        return "not a <Model>ForCausalLM with .model.layers and .lm_head"
    lm, dec, layers = parts
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention layers"
    if mtype == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention (mistral sliding_window is set)"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) is not None:
        return "logit soft-capping / scaling"
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if not isinstance(getattr(dec, name, None), nn.Module):
            return f"decoder has no {name} module"
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return "attention block without q/k/v/o projections"
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return "decoder layer without input/post-attention norms and an MLP"
    # Modules this loop does not call: a hook there would be silently skipped.
    skipped = [lm, dec, *layers, *(layer.self_attn for layer in layers)]
    if any(m._forward_hooks or m._forward_pre_hooks for m in skipped):
        return "forward hooks on the model, a decoder layer or an attention block"
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return "global module forward hooks"
    return None


class _Decoder:
    """The decoder stack over a preallocated K/V buffer."""

    def __init__(self, model: nn.Module, batch: int, max_len: int) -> None:
        self.lm, self.dec, self.layers = _parts(model)  # type: ignore[misc]
        cfg = model.config
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        attn0 = self.layers[0].self_attn
        self.head_dim = getattr(attn0, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.gqa = self.kv_heads != cfg.num_attention_heads

    def select(self, rows: torch.Tensor, length: int) -> None:
        """Keep (or repeat) cache rows ``rows`` (first ``length`` positions)."""
        self.k = [k[rows, :, :] for k in self.k]
        self.v = [v[rows, :, :] for v in self.v]

    def forward(self, ids_BQ: torch.Tensor, pos_BQ: torch.Tensor, start: int, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        """Logits of the last position (B, V) for tokens ``ids`` written at cache columns start..start+Q."""
        B, Q = ids_BQ.shape
        end = start + Q
        x = self.dec.embed_tokens(ids_BQ)
        cos, sin = self.dec.rotary_emb(x, pos_BQ)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        hd = self.head_dim
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, Q, -1, hd)
            k = attn.k_proj(h).view(B, Q, -1, hd)
            v = attn.v_proj(h).view(B, Q, -1, hd)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            kk, vv = self.k[i][:, :, :end], self.v[i][:, :, :end]
            if Q == 1:  # decode: grouped heads as one batched matmul each way, additive mask
                g = q.shape[1] // self.kv_heads
                w = torch.matmul(q.reshape(B, self.kv_heads, g, hd), kk.transpose(-1, -2)).mul_(attn.scaling)
                if mask is not None:
                    w = w.add_(mask)
                o = torch.matmul(w.softmax(-1), vv).view(B, -1, 1, hd)
            else:
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=causal and mask is None,
                                                   scale=attn.scaling, enable_gqa=self.gqa)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, Q, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm.lm_head(self.dec.norm(x[:, -1:]))[:, 0]


def _pick(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float,
          u_B: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row, by ``generate``'s rule (temperature, top-k, top-p, multinomial; greedy at 0).

    ``u_B``: one uniform in (0, 1] per row, then the draw is the inverse CDF at it (a row's token depends on
    its own uniform only, not on the other rows of the batch); else ``torch.multinomial`` on the global RNG.
    """
    logits = logits_BV.float()
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = logits.sort(dim=-1, descending=False)
        cum = sorted_l.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    probs = logits.softmax(-1)
    if u_B is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return inverse_cdf(probs, u_B)


def inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability reaches ``u * total`` (u in (0, 1]): a token of
    probability zero is never drawn."""
    cdf = probs_BV.float().cumsum(-1)
    target = u_B.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    return (cdf < target).sum(-1).clamp(max=probs_BV.shape[-1] - 1)


def row_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """(rows, steps) uniforms in (0, 1]: row r's draws come from its own generator seeded by ``seeds[r]``, so a
    completion depends on (its seed, its prompt, the weights) alone, whatever else shares the batch."""
    return torch.stack([1.0 - torch.rand(steps, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]) if len(seeds) else torch.zeros((0, steps))


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           compact_frac: float = 0.25, row_seeds: Sequence[int] | None = None) -> tuple[list[list[int]], list[bool]]:
    """Completions (cut after the first EOS, kept) and whether each ended with EOS, one per prompt.

    ``model`` must pass :func:`unsupported_reason`; it is used as is (call it in eval mode). ``row_seeds``: one
    seed per prompt; row r's t-th token is drawn with the t-th of its own uniforms (:func:`row_uniforms`).
    """
    n = len(prompt_ids)
    if n == 0:
        return [], []
    device = next(model.parameters()).device
    # One prefill per distinct prompt.
    uniq: dict[tuple[int, ...], int] = {}
    row_of = [uniq.setdefault(tuple(p), len(uniq)) for p in prompt_ids]
    prompts = list(uniq)
    U, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros((U, P), dtype=torch.long)
    valid = torch.zeros((U, P), dtype=torch.bool)
    for u, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("empty prompt: nothing to condition on")
        ids[u, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[u, P - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    lens = valid.sum(-1)
    dec = _Decoder(model, U, P + max_new_tokens)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    padded = bool((~valid).any())
    mask = None
    if padded:  # causal and key-is-real; a padded query row still sees itself (no NaN)
        causal = torch.ones((P, P), dtype=torch.bool, device=device).tril()
        mask = (causal[None] & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)[None]
        mask = mask[:, None]
    logits = dec.forward(ids, pos, 0, mask, causal=True)
    # Expand to one row per requested completion.
    rows = torch.tensor(row_of, device=device)
    if U != n or row_of != list(range(n)):
        dec.select(rows, P)
        logits, lens, valid = logits[rows], lens[rows], valid[rows]
    # Additive mask of the decode steps: 0 on real keys, -inf on prompt padding (and on columns not yet written).
    key_bias = torch.full((n, P + max_new_tokens), float("-inf"), dtype=logits.dtype, device=device)
    key_bias[:, :P].masked_fill_(valid, 0.0)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    out = torch.zeros((n, max_new_tokens), dtype=torch.long, device=device)
    length = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)  # original row of each cache row
    alive = torch.ones(n, dtype=torch.bool, device=device)  # cache row has not ended yet
    next_pos = lens.clone()
    draws = row_uniforms(row_seeds, max_new_tokens).to(device) if row_seeds is not None and temperature > 0 else None
    for t in range(max_new_tokens):
        tok = _pick(logits, temperature, top_k, top_p, None if draws is None else draws[active, t])
        out[active, t] = tok
        if t == max_new_tokens - 1:
            break
        if eos.numel():
            ended = torch.isin(tok, eos) & alive
            if bool(ended.any()):
                length[active[ended]] = t + 1
                alive &= ~ended
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                # Ended rows keep decoding (their tokens are cut) until enough of them are dropped at once.
                if len(active) - n_alive >= compact_frac * len(active):
                    keep = alive.nonzero().squeeze(-1)
                    dec.select(keep, P + t)
                    active, tok, next_pos, key_bias, alive = (active[keep], tok[keep], next_pos[keep],
                                                              key_bias[keep], alive[keep])
        col = P + t
        key_bias[:, col] = 0.0
        logits = dec.forward(tok[:, None], next_pos[:, None], col, key_bias[:, None, None, :col + 1], causal=False)
        next_pos = next_pos + 1
    out_l, length_l = out.tolist(), length.tolist()
    completions = [row[:k] for row, k in zip(out_l, length_l)]
    eos_set = set(eos_ids)
    finished = [bool(row) and row[-1] in eos_set for row in completions]
    return completions, finished
