"""The toy masked-diffusion LM: ``selfdistill toy pretrain-diffusion``.

A ModernBERT-architecture ``ForMaskedLM`` (bidirectional, RoPE, global attention in every layer; loaded by
``AutoModelForMaskedLM``) with the toy tokenizer plus a mask token, trained from a seed with LLaDA's
supervised masked-diffusion loss (:func:`selfdistill.diffusion.masked_diffusion_loss`) on the toy world:
by default plain math problems and their solutions (``data``; a first run on the causal model's whole
mixture, 1,100 of 2,400 steps, still wrote no correct answer: the mixture holds ~13% plain math, and a
masked-diffusion LM learns more slowly per token than an autoregressive one). In every example the last
trained assistant turn is the response (padded with the end-of-turn token to ``gen_length``, so the model
learns where to stop), everything before it the prompt.
Deterministic for a seed and thread count; resumable like the causal toy model (atomic checkpoint every
``checkpoint_every`` steps, the same command continues).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from selfdistill.atomic import publish_dir
from selfdistill.diffusion import masked_diffusion_loss, response_batch
from selfdistill.toy.mixture import ITEM_DOMAINS, POOL, example
from selfdistill.toy.pretrain import encode_example
from selfdistill.toy.tasks import make_item
from selfdistill.toy.tokenizer import build_toy_tokenizer

MASK = "<|mask|>"
#: The shipped toy diffusion model (``--model.path toy-diffusion``): ``selfdistill toy pretrain-diffusion`` with
#: the defaults, saved here.
DEFAULT_DIFFUSION_DIR = Path(__file__).parent / "diffusion_lm"


@dataclass
class DiffusionPretrainConfig:
    """Settings of the toy masked-diffusion model's pretraining."""

    seed: int = field(default=0, metadata={"help": "Seed of weights, data order, masks and toy items."})
    data: Literal["math", "plain", "mixture"] = field(default="math", metadata={
        "help": "math: plain toy math problems with their solutions (in the world's styles), what d-OPSD's "
                "table trains on; plain: plain problems of math, code and mcqa; mixture: the causal toy "
                "model's whole pretraining mixture (teacher views, feedback, shards, ...)."})
    steps: int = field(default=2000, metadata={"help": "Length of the learning-rate schedule, in steps."})
    stop_step: int = field(default=0, metadata={"help": "Stop (and save) after this many steps (0 = all)."})
    tokens_per_step: int = field(default=8192, metadata={"help": "Padded tokens per step (prompt + response)."})
    gen_length: int = field(default=96, metadata={
        "help": "Response length: responses are padded with end-of-turn to it; longer ones are dropped."})
    max_prompt: int = field(default=160, metadata={"help": "Longest prompt in tokens; longer examples dropped."})
    lr: float = field(default=5e-4, metadata={"help": "Peak learning rate (cosine decay to 10%)."})
    warmup: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    hidden_size: int = field(default=256, metadata={"help": "Model width."})
    layers: int = field(default=5, metadata={"help": "Encoder layers."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate: int = field(default=768, metadata={"help": "MLP width."})
    threads: int = field(default=2, metadata={"help": "torch CPU threads."})
    checkpoint_every: int = field(default=50, metadata={"help": "Resumable checkpoint every N steps."})


def diffusion_tokenizer():
    """The toy tokenizer with a mask token."""
    tok = build_toy_tokenizer()
    tok.add_special_tokens({"mask_token": MASK})
    return tok


def model_config(tok, cfg: DiffusionPretrainConfig):
    from transformers import ModernBertConfig

    end = tok.eos_token_id
    return ModernBertConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_prompt + cfg.gen_length, global_attn_every_n_layers=1,
        pad_token_id=tok.pad_token_id, eos_token_id=end, bos_token_id=end, cls_token_id=end, sep_token_id=end,
        tie_word_embeddings=True)


def split_example(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]] | None:
    """(prompt, response): the last run of trained tokens is the response, everything before it the prompt."""
    end = max((i for i, m in enumerate(mask) if m), default=None)
    if end is None:
        return None
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:start], ids[start:end + 1]


def stream_example(cfg: DiffusionPretrainConfig, index: int) -> tuple[list[dict[str, str]], list[bool]]:
    """The ``index``-th example of ``cfg.data`` (messages, loss per assistant turn): a pure function of the seed.

    ``math`` / ``plain`` are the mixture's ``plain`` part (a train problem and its solution, in the item's
    style) restricted to its domains; ``mixture`` is the causal model's stream as it is."""
    if cfg.data == "mixture":
        _, msgs, trained = example(cfg.seed, index)
        return msgs, trained
    rng = random.Random(f"diffusion-{cfg.data}/{cfg.seed}/{index}")
    domain = "math" if cfg.data == "math" else rng.choice(ITEM_DOMAINS)
    it = make_item(domain, "train", rng.randrange(POOL), cfg.seed)
    return [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": it.solution}], [True]


def chunk_batches(tok, cfg: DiffusionPretrainConfig, chunk: int, size: int = 2048) -> list[list[tuple]]:
    """Chunk ``chunk`` of the example stream as (prompt, response) pairs grouped by prompt length."""
    exs = []
    for i in range(chunk * size, (chunk + 1) * size):
        msgs, trained = stream_example(cfg, i)
        pair = split_example(*encode_example(tok, msgs, trained))
        if pair and pair[0] and len(pair[0]) <= cfg.max_prompt and len(pair[1]) <= cfg.gen_length:
            exs.append(pair)
    exs.sort(key=lambda e: len(e[0]))
    batches, cur = [], []
    for e in exs:
        if cur and (len(cur) + 1) * (len(e[0]) + cfg.gen_length) > cfg.tokens_per_step:
            batches.append(cur)
            cur = []
        cur.append(e)
    if cur:
        batches.append(cur)
    random.Random(f"diffusion-batches/{cfg.seed}/{chunk}").shuffle(batches)
    return batches


def pretrain_diffusion(out_dir: str | Path, cfg: DiffusionPretrainConfig, log=print) -> Path:
    """Train the toy diffusion model from scratch (or resume ``out_dir/checkpoint``); save it to ``out_dir``."""
    from transformers import AutoTokenizer, ModernBertForMaskedLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = diffusion_tokenizer()
        tok.save_pretrained(tok_dir)
    model = ModernBertForMaskedLM(model_config(tok, cfg))
    log(f"toy diffusion model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"vocabulary {len(tok)}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    lr_at = lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    step, chunk, pos = 0, 0, 0
    ck = out / "checkpoint"
    if (ck / "state.pt").exists():
        state = torch.load(ck / "state.pt", weights_only=False)
        if state["config"] != asdict(cfg) | {"stop_step": state["config"]["stop_step"]}:
            raise ValueError(f"{ck} was written with other settings; use another --out or delete it")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, chunk, pos = state["step"], state["chunk"], state["pos"]
        log(f"resumed from {ck} at step {step}")
    last = cfg.stop_step if 0 < cfg.stop_step < cfg.steps else cfg.steps
    batches = chunk_batches(tok, cfg, chunk)
    model.train()
    t0, loss_sum, n_sum = time.time(), 0.0, 0
    while step < last:
        if pos >= len(batches):
            chunk, pos = chunk + 1, 0
            batches = chunk_batches(tok, cfg, chunk)
        batch = batches[pos]
        pos += 1
        ids, attn, resp = response_batch([p for p, _ in batch], [r for _, r in batch], cfg.gen_length,
                                         tok.eos_token_id, tok.pad_token_id)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the masks: a function of (seed, step)
        t = torch.rand(len(batch), generator=g)
        noise = torch.rand(ids.shape, generator=g)
        loss = masked_diffusion_loss(model, ids, attn, resp, tok.mask_token_id, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        loss_sum, n_sum = loss_sum + loss.item(), n_sum + 1
        if step % 25 == 0 or step == last:
            log(f"step {step:5d}  loss {loss_sum / n_sum:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.time() - t0:.0f}s")
            loss_sum, n_sum = 0.0, 0
        if step % cfg.checkpoint_every == 0 and step < last:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "config": asdict(cfg), "step": step, "chunk": chunk, "pos": pos}
            publish_dir(ck, lambda tmp: torch.save(state, tmp / "state.pt"))
    _save(model, tok, cfg, out, step)
    shutil.rmtree(ck, ignore_errors=True)
    return out


def _save(model, tok, cfg: DiffusionPretrainConfig, out: Path, step: int) -> None:
    from selfdistill.models import quiet_transformers

    quiet_transformers()
    tmp = out.with_name(out.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "pretrain_config.json").write_text(json.dumps(asdict(cfg) | {"trained_steps": step}, indent=2) + "\n")
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
