"""Masked-diffusion language models: the sampler and the training loss (LLaDA-style), in one place.

A masked-diffusion LM (a bidirectional transformer with a mask token, e.g. any ``*ForMaskedLM``) writes a
fixed-length response by filling masks. The sampler (:func:`sample`) follows LLaDA's: the response is
``gen_length`` masks after the prompt, filled block by block from left to right (``block_length``), each
block in ``steps / (gen_length / block_length)`` steps; at each step the model predicts every position
(argmax, or argmax of logits/T plus Gumbel noise at temperature T > 0) and the ``k`` still-masked positions
of the current block with the highest confidence (the predicted token's probability, or a random number:
``remasking``) are committed. ``k`` splits the block's masks evenly over its steps (the first steps take
the remainder). With ``record`` the state before every step is kept: the trajectory d-OPSD trains on.

The loss (:func:`masked_diffusion_loss`) is LLaDA's supervised objective: per row a masking ratio
t ~ U(0, 1], each response token masked with probability p = (1 - eps) t + eps, cross-entropy on the masked
tokens weighted 1/p, each row normalised by its response length, then averaged over rows. Responses are
padded to their fixed length with EOS, so the model learns where to stop.

Why by hand: transformers has no diffusion sampler (``generate`` is autoregressive), and the official
LLaDA code is a script, not a library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

Remasking = Literal["low_confidence", "random"]


@dataclass
class DiffusionSampling:
    """How a masked-diffusion model fills its response."""

    gen_length: int = field(default=64, metadata={"help": "Response length in tokens (masks to fill)."})
    block_length: int = field(default=16, metadata={"help": "Blocks are filled left to right, this long."})
    steps: int = field(default=32, metadata={"help": "Denoising steps over the whole response (a multiple of "
                                                     "the number of blocks)."})
    temperature: float = field(default=0.0, metadata={"help": "0: argmax; > 0: Gumbel-max at this temperature."})
    remasking: Remasking = field(default="low_confidence", metadata={
        "help": "Which predicted tokens are committed first: low_confidence (the most probable) or random."})

    def __post_init__(self) -> None:
        if self.gen_length < 1 or self.block_length < 1:
            raise ValueError(f"diffusion gen_length and block_length must be >= 1, got {self.gen_length}, "
                             f"{self.block_length}")
        if self.gen_length % self.block_length:
            raise ValueError(f"diffusion gen_length {self.gen_length} is not a multiple of block_length "
                             f"{self.block_length}")
        blocks = self.gen_length // self.block_length
        if self.steps < blocks or self.steps % blocks:
            raise ValueError(f"diffusion steps {self.steps} must be a positive multiple of the {blocks} blocks")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"diffusion temperature must be a finite number >= 0, got {self.temperature}")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"diffusion remasking must be low_confidence or random, got {self.remasking!r}")

    @property
    def blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.blocks

    def transfers(self) -> list[int]:
        """Tokens committed at each step of a block (sums to ``block_length``)."""
        base, extra = divmod(self.block_length, self.steps_per_block)
        return [base + (1 if i < extra else 0) for i in range(self.steps_per_block)]


@dataclass
class DiffusionRollouts:
    """Sampled responses (same order as the prompts), and optionally the trajectory."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # cut after the first EOS (kept)
    texts: list[str]
    finished: list[bool]  # an EOS was written
    final_BT: torch.Tensor  # (rows, prompt width + gen_length): left-padded prompt + the whole response
    prompt_width: int  # where the response starts in ``final_BT`` and in every state
    attention_BT: torch.Tensor  # 1 on real tokens (prompt padding is 0)
    states: list[torch.Tensor] = field(default_factory=list)  # per step: the state the model saw, (rows, T)
    step_block: list[int] = field(default_factory=list)  # per step: the block being filled


def mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token (a masked-diffusion model needs one)."""
    mid = getattr(tokenizer, "mask_token_id", None)
    if mid is None:
        raise ValueError("this tokenizer has no mask token: a masked-diffusion model needs one (mask_token)")
    return int(mid)


def is_masked_diffusion(model) -> bool:
    """A bidirectional mask-filling model (``*ForMaskedLM``), sampled by :func:`sample`."""
    m = getattr(model, "module", model)
    m = m.get_base_model() if hasattr(m, "get_base_model") else m
    return type(m).__name__.endswith("ForMaskedLM")


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pos_BP: torch.Tensor) -> torch.Tensor:
    """The model's logits at positions ``pos_BP`` of each row only, (B, P, V).

    A bidirectional model needs every position's hidden state, but a step reads the logits of a few (a
    block's masks, the trained positions): the output layer runs on those positions alone (a pre-hook on the
    output embeddings gathers its input), so no B x T x V tensor is made for a real vocabulary. A model whose
    output layer is not called on the (B, T, H) hidden states is run whole and its logits gathered.
    """
    m = getattr(model, "module", model)
    m = m.get_base_model() if hasattr(m, "get_base_model") else m
    get_head = getattr(m, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    rows = torch.arange(pos_BP.shape[0], device=pos_BP.device)[:, None]
    fired: list[bool] = []

    def gather(_module, args):
        h = args[0]
        if fired or h.dim() != 3 or tuple(h.shape[:2]) != tuple(input_ids.shape):
            return None
        fired.append(True)
        return (h[rows, pos_BP], *args[1:])

    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        if handle is not None:
            handle.remove()
    if fired and tuple(logits.shape[:2]) == tuple(pos_BP.shape):
        return logits
    if fired:  # the model reshaped the head's output: run it whole
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[rows, pos_BP]


def _uniforms(seeds: Sequence[int] | None, rows: int, shape: tuple[int, ...], generator_step: int) -> torch.Tensor:
    """(rows, *shape) uniforms in (0, 1): row r's from its own generator (seed, step), else the global RNG."""
    if seeds is None:
        return torch.rand((rows, *shape)).clamp_(1e-12, 1 - 1e-7)
    return torch.stack([torch.rand(shape, generator=torch.Generator().manual_seed(
        (int(s) * 1_000_003 + generator_step) % 2**63))  # row seeds are 63-bit (rollout.row_seed)
        for s in seeds]).clamp_(1e-12, 1 - 1e-7)


def _choose(logits_BTV: torch.Tensor, cfg: DiffusionSampling, seeds: Sequence[int] | None,
            step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response position: the predicted token and its confidence (LLaDA's rule). The noise covers the
    response only, so it does not depend on how wide the batch's prompts are."""
    logits = logits_BTV.double()
    B, T, V = logits.shape
    if cfg.temperature > 0:
        g = -torch.log(-torch.log(_uniforms(seeds, B, (T, V), 2 * step).double()))
        x0 = (logits / cfg.temperature + g.to(logits.device)).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    if cfg.remasking == "low_confidence":
        conf = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
    else:
        conf = _uniforms(seeds, B, (T,), 2 * step + 1).double().to(logits.device)
    return x0, conf


@torch.no_grad()
def sample(model, prompt_ids: Sequence[Sequence[int]], cfg: DiffusionSampling, mask_id: int,
           eos_ids: Sequence[int], pad_id: int, record: bool = False,
           row_seeds: Sequence[int] | None = None, tokenizer=None) -> DiffusionRollouts:
    """Fill ``cfg.gen_length`` masks after each prompt (left-padded), block by block; see the module docstring.

    ``row_seeds`` (one per prompt): row r's noise comes from its own generators, so a response does not depend
    on the rest of the batch. ``tokenizer`` (optional) decodes ``texts``.
    """
    n = len(prompt_ids)
    if row_seeds is not None and len(row_seeds) != n:
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {n} prompts")
    device = next(model.parameters()).device
    P = max((len(p) for p in prompt_ids), default=0)
    L = cfg.gen_length
    x = torch.full((n, P + L), mask_id, dtype=torch.long)
    attn = torch.ones((n, P + L), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        if not p:
            raise ValueError("empty prompt: nothing to condition on")
        x[b, :P - len(p)] = pad_id
        attn[b, :P - len(p)] = 0
        x[b, P - len(p):P] = torch.tensor(list(p), dtype=torch.long)
    x, attn = x.to(device), attn.to(device)
    resp_pos = torch.arange(P, P + L, device=device).expand(n, L)
    states: list[torch.Tensor] = []
    blocks: list[int] = []
    was_training = model.training
    model.eval()
    try:
        step = 0
        for blk in range(cfg.blocks):
            lo, hi = P + blk * cfg.block_length, P + (blk + 1) * cfg.block_length
            for k in cfg.transfers():
                masked = x == mask_id
                if record:
                    states.append(x.cpu().clone())
                    blocks.append(blk)
                logits = logits_at(model, x, attn, resp_pos)  # the response's positions only
                x0, conf = _choose(logits, cfg, row_seeds, step)
                eligible = masked[:, P:].clone()
                eligible[:, :lo - P] = False
                eligible[:, hi - P:] = False
                conf = torch.where(eligible, conf, torch.full_like(conf, -math.inf))
                top = conf.topk(k, dim=-1).indices  # k <= masks left in the block, by the schedule
                commit = torch.zeros_like(eligible).scatter_(1, top, True) & eligible
                x[:, P:] = torch.where(commit, x0, x[:, P:])
                step += 1
    finally:
        model.train(was_training)
    x = x.cpu()
    eos = set(eos_ids)
    completions, finished = [], []
    for row in x[:, P:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        completions.append(row[:cut + 1] if cut is not None else row)
        finished.append(cut is not None)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True) if tokenizer is not None else []
    return DiffusionRollouts([list(p) for p in prompt_ids], completions, texts, finished, x, P, attn.cpu(),
                             states, blocks)


def response_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], gen_length: int,
                   eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, response mask) of left-padded prompts + responses padded with EOS to
    ``gen_length`` (cut to it when longer): the layout :func:`sample` writes and the loss trains."""
    n, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids = torch.full((n, P + gen_length), eos_id, dtype=torch.long)
    attn = torch.ones((n, P + gen_length), dtype=torch.long)
    resp = torch.zeros((n, P + gen_length), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[b, :P - len(p)] = pad_id
        attn[b, :P - len(p)] = 0
        ids[b, P - len(p):P] = torch.tensor(list(p), dtype=torch.long)
        r = list(r)[:gen_length]
        if r:
            ids[b, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        resp[b, P:] = True
    return ids, attn, resp


def masked_diffusion_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                          mask_id: int, t_B: torch.Tensor, noise_BT: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """LLaDA's supervised loss (module docstring) for given ratios ``t_B`` and uniforms ``noise_BT`` (pass
    them from a seeded generator: the loss is then a pure function of its inputs)."""
    p_B = (1 - eps) * t_B + eps
    masked = response_mask & (noise_BT < p_B[:, None])
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    # the logits of each row's response positions only (padded to the longest with position 0, unused)
    n_resp = response_mask.sum(-1)
    pos_BP = torch.zeros((input_ids.shape[0], int(n_resp.max().item()) if n_resp.numel() else 0), dtype=torch.long,
                         device=input_ids.device)
    keep_BP = torch.arange(pos_BP.shape[1], device=input_ids.device)[None] < n_resp[:, None]
    pos_BP[keep_BP] = response_mask.nonzero()[:, 1]
    logits = logits_at(model, noisy, attention_mask, pos_BP)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
    hit_BP = keep_BP & masked[rows, pos_BP]
    ce = torch.nn.functional.cross_entropy(logits[hit_BP].float(), input_ids[rows, pos_BP][hit_BP], reduction="none")
    p_tok = p_B[:, None].expand_as(masked)[masked]
    lengths = response_mask.sum(-1).clamp_min(1).float()[:, None].expand_as(masked)[masked]
    return (ce / p_tok / lengths).sum() / input_ids.shape[0]
