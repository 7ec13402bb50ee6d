"""Prompt formatting and (prompt, completion) batches: one place for padding.

Every method scores sequences laid out the same way: the chat-formatted prompt,
then the completion, then right padding. ``completion_mask`` marks the
completion tokens (the ones a loss is taken on); position ids are explicit so
a sequence's positions never depend on how much padding sits beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


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


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of already-formatted prompts (no special tokens added twice)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


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


def forward_hidden(model, batch: SequenceBatch) -> torch.Tensor:
    """Final hidden states (B, T, H) of a causal LM, without computing logits.

    Losses then project chunk by chunk through the LM head, so no
    batch x length x vocabulary tensor is ever held.
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    out = base(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
               position_ids=batch.position_ids_BT, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def shift_targets(batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and their mask aligned with positions 0..T-2.

    Position t predicts token t+1; the mask is the completion mask of t+1.
    """
    return batch.input_ids_BT[:, 1:], batch.completion_mask_BT[:, 1:]
