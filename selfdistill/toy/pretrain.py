"""Pretrain the embedded toy model: ``selfdistill toy pretrain``.

A small Qwen3-architecture causal LM (grouped-query attention, tied
embeddings, ~2 M parameters) trained from a seed by next-token loss on the
reference solutions of the toy train splits, stopped early on purpose so the
model is only partly competent and self-distillation has room to help.
Deterministic on CPU for a given seed and thread count.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from selfdistill.sequences import chat_prompt, encode_prompts, make_batch
from selfdistill.toy.tasks import toy_tasks
from selfdistill.toy.tokenizer import build_toy_tokenizer

DEFAULT_MODEL_DIR = Path(__file__).parent / "model"


@dataclass
class PretrainConfig:
    """Settings of the toy model's pretraining."""

    seed: int = field(default=0, metadata={"help": "Seed of weights, data order and toy items."})
    steps: int = field(default=1500, metadata={"help": "Length of the learning-rate schedule, in steps."})
    stop_step: int = field(default=1250, metadata={
        "help": "Stop (and save) after this many steps, before the schedule ends (0 = run all steps): "
                "the toy model is stopped early on purpose so it is only partly competent."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per step."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate (cosine decay)."})
    warmup: int = field(default=50, metadata={"help": "Linear warm-up steps."})
    hidden_size: int = field(default=192, metadata={"help": "Model width."})
    layers: int = field(default=4, metadata={"help": "Decoder layers."})
    heads: int = field(default=6, metadata={"help": "Attention heads."})
    kv_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention)."})
    train_size: int = field(default=4000, metadata={"help": "Train items per domain."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (fixed, so results do not depend on the machine)."})
    save_every: int = field(default=0, metadata={"help": "Also save step-N snapshots every N steps (0 = off)."})


def toy_model_config(vocab_size: int, cfg: PretrainConfig, pad_id: int, eos_id: int) -> Qwen3Config:
    """The Qwen3 config of the toy model."""
    head_dim = cfg.hidden_size // cfg.heads
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 3,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, head_dim=head_dim, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
        rope_theta=10000.0, use_cache=True,
    )


def pretrain(out_dir: str | Path, cfg: PretrainConfig, log=print) -> Path:
    """Train the toy model from scratch and save it (model + tokenizer) to ``out_dir``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tok = build_toy_tokenizer()
    model = Qwen3ForCausalLM(toy_model_config(len(tok), cfg, tok.pad_token_id, tok.eos_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"toy model: {n_params / 1e6:.2f} M parameters")
    items = [it for t in toy_tasks(seed=cfg.seed, train_size=cfg.train_size) for it in t.items("train")]
    prompts = encode_prompts(tok, [chat_prompt(tok, it.prompt) for it in items])
    targets = [tok(it.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for it in items]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    order: list[int] = []
    model.train()
    t0 = time.time()
    last = cfg.stop_step if 0 < cfg.stop_step < cfg.steps else cfg.steps
    for step in range(last):
        if len(order) < cfg.batch_size:
            perm = list(range(len(items)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = make_batch([prompts[i] for i in idx], [targets[i] for i in idx], tok.pad_token_id)
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                       position_ids=batch.position_ids_BT).logits[:, :-1]
        tgt, mask = batch.input_ids_BT[:, 1:], batch.completion_mask_BT[:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                reduction="none").view_as(mask)
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == last - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.time() - t0:.0f}s")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < last:
            _save(model, tok, cfg, Path(out_dir) / f"step-{step + 1}")
    return _save(model, tok, cfg, Path(out_dir))


def _save(model, tok, cfg: PretrainConfig, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out
