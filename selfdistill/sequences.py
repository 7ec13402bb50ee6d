"""Prompt formatting and (prompt, completion) batches: one place for padding.

Every method scores sequences laid out the same way: the chat-formatted prompt,
then the completion, then right padding. ``completion_mask`` marks the
completion tokens (the ones a loss is taken on); position ids are explicit so
a sequence's positions never depend on how much padding sits beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch is imported where tensors are made: the prompt helpers here serve `--help`-fast paths
    import torch


def fill_template(template: str, setting: str, **kw: object) -> str:
    """``template`` with its ``{placeholders}`` filled from ``kw``; an unknown one is an error naming ``setting``."""
    try:
        return template.format(**kw)
    except KeyError as e:
        raise ValueError(f"{setting} has unknown placeholder {e}; known: {', '.join(kw)}") from None


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """``user`` rendered through the tokenizer's chat template, ready to generate.

    Student and teacher prompts both go through here, so they always share
    the same template (a known pitfall of one public OPSD release).
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models without a template: a plain, documented fallback.
    return (f"{system}\n\n" if system else "") + f"{user}\n"


def chat_messages(tokenizer, messages: Sequence[dict], system: str | None = None) -> str:
    """A multi-turn conversation (``{"role", "content"}`` dicts, ending with a user turn) rendered
    ready to generate the next assistant turn; one user message gives exactly :func:`chat_prompt`."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("chat_messages: the conversation must end with a user message")
    if len(messages) == 1:
        return chat_prompt(tokenizer, messages[0]["content"], system)
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # No template: the same plain fallback as chat_prompt, one line per turn.
    return (f"{system}\n\n" if system else "") + "".join(f"{m['content']}\n" for m in messages)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of already-formatted prompts (no special tokens added twice); repeats are encoded once."""
    ids = {p: tokenizer(p, add_special_tokens=False)["input_ids"] for p in dict.fromkeys(prompts)}
    return [list(ids[p]) for p in prompts]


@dataclass
class SequenceBatch:
    """Right-padded prompt+completion sequences.

    ``input_ids_BT``: tokens; ``attention_mask_BT``: 1 on real tokens;
    ``completion_mask_BT``: 1 on completion tokens (targets of the loss);
    ``position_ids_BT``: 0..len-1 per sequence.
    """

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    completion_mask_BT: torch.Tensor
    position_ids_BT: torch.Tensor

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.input_ids_BT, self.attention_mask_BT,
                                                       self.completion_mask_BT, self.position_ids_BT)))

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask_BT.sum())


def make_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
               pad_id: int, max_len: int | None = None) -> SequenceBatch:
    """Lay prompts and completions out as one right-padded batch.

    If ``max_len`` is given, longer sequences lose their completion's tail
    (the prompt is never cut: a prompt longer than ``max_len`` is an error).
    """
    import torch

    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    rows = []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        p, c = list(p), list(c)
        if max_len is not None:
            if len(p) >= max_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens, not shorter than max_len={max_len}")
            c = c[: max_len - len(p)]
        rows.append((p, c))
    T = max(len(p) + len(c) for p, c in rows) if rows else 0
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    comp = torch.zeros((B, T), dtype=torch.long)
    for b, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[b, :n] = torch.tensor(p + c, dtype=torch.long)
        attn[b, :n] = 1
        comp[b, len(p):n] = 1
    pos = torch.arange(T).unsqueeze(0).expand(B, T).contiguous()
    return SequenceBatch(ids, attn, comp, pos)


def completion_values(batch: SequenceBatch, values: Sequence[Sequence[float]]) -> torch.Tensor:
    """Per-completion-token values (e.g. a sampler's log-probs) at their tokens' columns of ``batch``, 0 elsewhere.

    Row b's values belong to its completion tokens in order (column t holds token t's value); a row may
    have more values than completion tokens when :func:`make_batch` cut the completion (the rest is dropped),
    never fewer.
    """
    import torch

    if len(values) != batch.input_ids_BT.shape[0]:
        raise ValueError(f"{len(values)} rows of values for a batch of {batch.input_ids_BT.shape[0]} sequences")
    out = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
    comp = batch.completion_mask_BT.bool().cpu()
    for b, row in enumerate(values):
        n = int(comp[b].sum())
        if len(row) < n:
            raise ValueError(f"row {b}: {len(row)} values for {n} completion tokens")
        out[b, comp[b]] = torch.tensor(list(row[:n]), dtype=torch.float32)
    return out


def forward_hidden(model, batch: SequenceBatch, share_prefixes: bool = True) -> torch.Tensor:
    """Final hidden states (B, T, H) of a causal LM, without computing logits.

    Losses then project chunk by chunk through the LM head, so no
    batch x length x vocabulary tensor is ever held.

    Two exact shortcuts for Llama-family decoders (see :data:`FAST_TYPES`) on
    batches laid out by :func:`make_batch`:

    - right padding needs no attention mask (a real token only ever looks back
      at real tokens), so attention takes the plain causal kernel;
    - when several rows share a prompt (``samples_per_prompt`` > 1, or the
      same teacher context) and that saves at least 10% of the tokens, each
      distinct prompt is computed once and every completion attends to it
      (:func:`_forward_shared_prefix`: one packed row per prompt with a tree
      mask, or a K/V cache shared by the rows). Gradients flow through the
      shared prompt's activations to the weights as in the plain forward.
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    fast = _fast_layout(model, base, batch)
    if fast and share_prefixes:
        hidden = _forward_shared_prefix(base, batch)
        if hidden is not None:
            return hidden
    out = base(input_ids=batch.input_ids_BT, attention_mask=None if fast else batch.attention_mask_BT,
               position_ids=batch.position_ids_BT, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


#: Model types whose decoders take the shortcuts of :func:`forward_hidden` (plain causal self-attention).
FAST_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def _fast_layout(model, base, batch: SequenceBatch) -> bool:
    """True for a plain causal decoder on a right-padded batch (so the mask can be dropped)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in FAST_TYPES or getattr(base, "gradient_checkpointing", False):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])) or getattr(
            cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return False  # sliding windows: the packed layouts' masks would not apply them
    attn = batch.attention_mask_BT
    if attn.numel() == 0:
        return False
    return bool((attn[:, 0] == 1).all() and (attn[:, 1:] <= attn[:, :-1]).all())


#: Largest tree attention mask (rows x length x length entries) before the two-stage form is used instead.
TREE_MASK_MAX = 1 << 25


def _forward_shared_prefix(base, batch: SequenceBatch) -> torch.Tensor | None:
    """The decoder's hidden states with each distinct prompt computed once; None if it would not pay.

    Rows must be prompt, completion, right padding with positions 0..len-1
    (what :func:`make_batch` builds). Rows sharing a prompt form a group. Two
    exact layouts:

    - *tree* (when its mask is small): one row per group, the prompt followed
      by every member's completion, each completion attending to the prompt
      and to itself only (a 4D mask), positions restarting after the prompt;
      no token is computed twice and there is no padding inside a group;
    - *two-stage* (long sequences): the distinct prompts run once with a K/V
      cache, the cache is gathered per row (differentiably) and every row's
      completion runs against it.

    The hidden states are put back in the (B, T, H) layout (zeros on padding).
    """
    import torch

    ids, attn, comp, pos = (batch.input_ids_BT, batch.attention_mask_BT.bool(), batch.completion_mask_BT.bool(),
                            batch.position_ids_BT)
    B, T = ids.shape
    device = ids.device
    ar = torch.arange(T, device=device)
    plen = (attn & ~comp).sum(-1)
    length = attn.sum(-1)
    if not bool(((ar[None] >= plen[:, None]) & attn).eq(comp).all()) or not bool(
            pos.eq(ar[None]).logical_or(~attn).all()) or int(plen.min()) < 1:
        return None
    plen_l, len_l = plen.tolist(), length.tolist()
    ids_l = ids.tolist()
    keys: dict[tuple[int, ...], int] = {}
    group = [keys.setdefault(tuple(ids_l[b][: plen_l[b]]), len(keys)) for b in range(B)]
    prompts = list(keys)
    U = len(prompts)
    saved = sum(plen_l) - sum(len(p) for p in prompts)
    if U == B or saved < 0.1 * sum(len_l) or max(l - p for l, p in zip(len_l, plen_l)) < 1:
        return None
    # Tree layout: row u = prompt u, then its members' completions in batch order.
    row_len = [len(p) for p in prompts]
    start = [0] * B  # column of row b's first completion token in its tree row
    for b in range(B):
        start[b] = row_len[group[b]]
        row_len[group[b]] += len_l[b] - plen_l[b]
    Lt = max(row_len)
    impl = getattr(base.config, "_attn_implementation", "sdpa")
    if U * Lt * Lt <= TREE_MASK_MAX and impl in ("sdpa", "eager"):
        return _tree_forward(base, batch, prompts, group, start, Lt, plen, length)
    return _two_stage_forward(base, batch, prompts, group, plen, length)


def _tree_forward(base, batch: SequenceBatch, prompts, group, start, Lt: int, plen, length) -> torch.Tensor:
    import torch

    ids = batch.input_ids_BT
    B, T = ids.shape
    U, device = len(prompts), ids.device
    t_ids = torch.zeros((U, Lt), dtype=torch.long, device=device)
    t_pos = torch.zeros((U, Lt), dtype=torch.long, device=device)
    seg = torch.full((U, Lt), -1, dtype=torch.long, device=device)  # -1 pad, 0 prompt, b + 1 row b's completion
    for u, p in enumerate(prompts):
        t_ids[u, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        t_pos[u, :len(p)] = torch.arange(len(p), device=device)
        seg[u, :len(p)] = 0
    plen_l, len_l = plen.tolist(), length.tolist()
    src = torch.full((B, T), U * Lt, dtype=torch.long, device=device)  # default: the zero row
    for b in range(B):
        u, s, P, n = group[b], start[b], plen_l[b], len_l[b]
        t_ids[u, s:s + n - P] = ids[b, P:n]
        t_pos[u, s:s + n - P] = torch.arange(P, n, device=device)
        seg[u, s:s + n - P] = b + 1
        src[b, :P] = u * Lt + torch.arange(P, device=device)
        src[b, P:n] = u * Lt + s + torch.arange(n - P, device=device)
    ar = torch.arange(Lt, device=device)
    sq, sk = seg[:, :, None], seg[:, None, :]
    allowed = (ar[:, None] >= ar[None, :])[None] & (sk >= 0) & ((sk == 0) | (sk == sq))
    allowed |= torch.eye(Lt, dtype=torch.bool, device=device)[None]  # padding queries see themselves (no NaN)
    dtype = next(base.parameters()).dtype
    mask = torch.zeros((U, 1, Lt, Lt), dtype=dtype, device=device).masked_fill_(
        ~allowed[:, None], torch.finfo(dtype).min)
    h = base(input_ids=t_ids, attention_mask=mask, position_ids=t_pos, use_cache=False).last_hidden_state
    H = h.shape[-1]
    flat = torch.cat([h.reshape(U * Lt, H), h.new_zeros((1, H))])
    return flat[src.reshape(-1)].view(B, T, H)


def _two_stage_forward(base, batch: SequenceBatch, prompts, group, plen, length) -> torch.Tensor:
    import torch

    ids, comp = batch.input_ids_BT, batch.completion_mask_BT.bool()
    B, T = ids.shape
    U, device = len(prompts), ids.device
    ar = torch.arange(T, device=device)
    Pm = max(len(p) for p in prompts)
    Cm = int((length - plen).max())
    from transformers import DynamicCache

    p_ids = torch.zeros((U, Pm), dtype=torch.long)
    p_valid = torch.zeros((U, Pm), dtype=torch.bool)
    for u, p in enumerate(prompts):
        p_ids[u, Pm - len(p):] = torch.tensor(p, dtype=torch.long)
        p_valid[u, Pm - len(p):] = True
    p_ids, p_valid = p_ids.to(device), p_valid.to(device)
    p_pos = (p_valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=base.config)
    h1 = base(input_ids=p_ids, attention_mask=p_valid.long(), position_ids=p_pos, use_cache=True,
              **{_cache_kw(base): cache}).last_hidden_state  # (U, Pm, H)
    rows = torch.tensor(group, device=device)
    cache.batch_select_indices(rows)
    c_idx = (plen[:, None] + torch.arange(Cm, device=device)[None]).clamp(max=T - 1)
    c_valid = torch.arange(Cm, device=device)[None] < (length - plen)[:, None]
    c_ids = ids.gather(1, c_idx).masked_fill(~c_valid, 0)
    c_pos = plen[:, None] + torch.arange(Cm, device=device)[None]
    full_mask = torch.cat([p_valid[rows], c_valid], dim=1).long()
    h2 = base(input_ids=c_ids, attention_mask=full_mask, position_ids=c_pos, use_cache=True,
              **{_cache_kw(base): cache}).last_hidden_state  # (B, Cm, H)
    # Back to (B, T, H): prompt position t of row b is stage-1 row group[b], column Pm - plen_b + t;
    # completion position plen_b + j is stage-2 row b, column j; padding reads a zero row.
    H = h1.shape[-1]
    flat = torch.cat([h1.reshape(U * Pm, H), h2.reshape(B * Cm, H), h1.new_zeros((1, H))])
    src = torch.full((B, T), U * Pm + B * Cm, dtype=torch.long, device=device)
    src = torch.where(ar[None] < plen[:, None], rows[:, None] * Pm + (Pm - plen)[:, None] + ar[None], src)
    src = torch.where(comp, U * Pm + torch.arange(B, device=device)[:, None] * Cm + (ar[None] - plen[:, None]), src)
    return flat[src.reshape(-1)].view(B, T, H)


def _cache_kw(base) -> str:
    """The decoder's name for the K/V cache argument (``cache`` from transformers 5.x, else ``past_key_values``)."""
    import inspect

    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def shift_targets(batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and their mask aligned with positions 0..T-2.

    Position t predicts token t+1; the mask is the completion mask of t+1.
    """
    return batch.input_ids_BT[:, 1:], batch.completion_mask_BT[:, 1:]
