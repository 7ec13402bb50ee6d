"""Pretrain the embedded toy model: ``selfdistill toy pretrain``.

A Qwen3-architecture causal LM (q/k norms, grouped-query attention, tied
embeddings, ~4 M parameters, K/V sites 128 wide, context 1024) trained from a
seed by next-token loss on the assistant turns of the pretraining mixture
(:mod:`selfdistill.toy.mixture`). Deterministic on CPU for a given seed and
thread count. Resumable: a checkpoint (weights, optimizer, schedule, data
cursor) is written atomically every ``checkpoint_every`` steps and picked up
by rerunning the same command; ``save_every`` writes step-N snapshots, from
which the shipped model is chosen on the ``valid`` preconditions only
(``selfdistill toy check``).
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
from typing import Callable

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from selfdistill.toy.mixture import example
from selfdistill.toy.tokenizer import build_toy_tokenizer

DEFAULT_MODEL_DIR = Path(__file__).parent / "model"


@dataclass
class PretrainConfig:
    """Settings of the toy model's pretraining."""

    seed: int = field(default=0, metadata={"help": "Seed of weights, data order and toy items."})
    steps: int = field(default=1800, metadata={"help": "Length of the learning-rate schedule, in steps."})
    stop_step: int = field(default=0, metadata={
        "help": "Stop (and save) after this many steps, before the schedule ends (0 = run all steps)."})
    tokens_per_step: int = field(default=8192, metadata={
        "help": "Padded tokens per step (batches are groups of similar length up to this budget)."})
    lr: float = field(default=5e-4, metadata={"help": "Peak learning rate (cosine decay to 10%; v3 used 2e-3, too high for copying to form: docs/toy_world.md)."})
    warmup: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    hidden_size: int = field(default=256, metadata={"help": "Model width."})
    layers: int = field(default=5, metadata={"help": "Decoder layers."})
    heads: int = field(default=4, metadata={"help": "Attention heads (head_dim = hidden / heads)."})
    kv_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention)."})
    intermediate: int = field(default=768, metadata={"help": "MLP width."})
    qk_norm_init: float = field(default=1.0, metadata={
        "help": "Starting gain of the per-head q/k norms (1 = transformers' init). With unit gains an "
                "attention logit is at most sqrt(head_dim), too flat to pick one position out of hundreds."})
    max_length: int = field(default=1024, metadata={"help": "Context length; longer examples are dropped."})
    threads: int = field(default=2, metadata={"help": "torch CPU threads (fixed, so results do not depend on the machine)."})
    save_every: int = field(default=200, metadata={"help": "Also save step-N snapshots every N steps (0 = off)."})
    checkpoint_every: int = field(default=50, metadata={"help": "Resumable checkpoint every N steps."})


def toy_model_config(vocab_size: int, cfg: PretrainConfig, pad_id: int, eos_id: int) -> Qwen3Config:
    """The Qwen3 config of the toy model."""
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden_size // cfg.heads, max_position_embeddings=cfg.max_length, tie_word_embeddings=True,
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None, rope_theta=10000.0, use_cache=True,
    )


def encode_example(tok, messages: list[dict[str, str]], trained: list[bool]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the chat template, and the loss mask (assistant turns in ``trained``)."""
    ids: list[int] = []
    mask: list[int] = []
    turn = 0
    end = tok.convert_tokens_to_ids("<|im_end|>")
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    heads = {r: tok(f"<|im_start|>{r}\n", add_special_tokens=False)["input_ids"] for r in ("user", "assistant")}
    for m in messages:
        head = heads.get(m["role"]) or tok(f"<|im_start|>{m['role']}\n", add_special_tokens=False)["input_ids"]
        body = tok(m["content"], add_special_tokens=False)["input_ids"] + [end]
        on = m["role"] == "assistant" and trained[turn]
        ids += head + body + nl
        mask += [0] * len(head) + [int(on)] * len(body) + [0] * len(nl)
        turn += m["role"] == "assistant"
    return ids, mask


def chunk_batches(tok, cfg: PretrainConfig, chunk: int, size: int = 2048) -> list[list[tuple[list[int], list[int]]]]:
    """Chunk ``chunk`` of the example stream cut into length-grouped batches (a pure function of the seed)."""
    exs = []
    for i in range(chunk * size, (chunk + 1) * size):
        _, msgs, trained = example(cfg.seed, i)
        ids, mask = encode_example(tok, msgs, trained)
        if len(ids) <= cfg.max_length:
            exs.append((ids, mask))
    exs.sort(key=lambda e: len(e[0]))
    batches, cur = [], []
    for e in exs:
        if cur and (len(cur) + 1) * len(e[0]) > cfg.tokens_per_step:
            batches.append(cur)
            cur = []
        cur.append(e)
    if cur:
        batches.append(cur)
    random.Random(f"batches/{cfg.seed}/{chunk}").shuffle(batches)
    return batches


def _tensors(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    L = max(len(ids) for ids, _ in batch)
    ids_BT = torch.full((len(batch), L), pad_id, dtype=torch.long)
    att_BT = torch.zeros((len(batch), L), dtype=torch.long)
    mask_BT = torch.zeros((len(batch), L), dtype=torch.float)
    for b, (ids, mask) in enumerate(batch):  # right padding: positions start at 0 for every row
        ids_BT[b, : len(ids)] = torch.tensor(ids)
        att_BT[b, : len(ids)] = 1
        mask_BT[b, : len(ids)] = torch.tensor(mask, dtype=torch.float)
    return ids_BT, att_BT, mask_BT


def _lr_lambda(cfg: PretrainConfig) -> Callable[[int], float]:
    def f(s: int) -> float:
        warm = min(1.0, (s + 1) / cfg.warmup)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    return f


def pretrain(out_dir: str | Path, cfg: PretrainConfig, log=print) -> Path:
    """Train the toy model from scratch (or resume ``out_dir/checkpoint``) and save it to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok_dir = out / "tokenizer"  # fixed at the start, so a resumed run reads the same vocabulary
    if (tok_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = build_toy_tokenizer()
        tok.save_pretrained(tok_dir)
    model = Qwen3ForCausalLM(toy_model_config(len(tok), cfg, tok.pad_token_id, tok.eos_token_id))
    if cfg.qk_norm_init != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.fill_(cfg.qk_norm_init)
                layer.self_attn.k_norm.weight.fill_(cfg.qk_norm_init)
    log(f"toy model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocabulary {len(tok)}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    step, chunk, pos, seen_tokens = 0, 0, 0, 0
    ck = out / "checkpoint"
    if (ck / "state.pt").exists():
        state = torch.load(ck / "state.pt", weights_only=False)
        if state["config"] != asdict(cfg) | {"stop_step": state["config"]["stop_step"]}:
            raise ValueError(f"{ck} was written with other settings; use another --out or delete it")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, chunk, pos, seen_tokens = state["step"], state["chunk"], state["pos"], state["tokens"]
        log(f"resumed from {ck} at step {step}")
    last = cfg.stop_step if 0 < cfg.stop_step < cfg.steps else cfg.steps
    batches = chunk_batches(tok, cfg, chunk)
    model.train()
    t0, loss_sum, n_sum = time.time(), 0.0, 0
    while step < last:
        if pos >= len(batches):
            chunk, pos = chunk + 1, 0
            batches = chunk_batches(tok, cfg, chunk)
        ids_BT, att_BT, mask_BT = _tensors(batches[pos], tok.pad_token_id)
        pos += 1
        logits = model(input_ids=ids_BT, attention_mask=att_BT).logits[:, :-1]
        tgt, mask = ids_BT[:, 1:], mask_BT[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                reduction="none").view_as(mask)
        loss = (nll * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        seen_tokens += int(att_BT.sum())
        loss_sum, n_sum = loss_sum + loss.item(), n_sum + 1
        if step % 25 == 0 or step == last:
            log(f"step {step:5d}  loss {loss_sum / n_sum:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"tokens {seen_tokens / 1e6:.2f} M  {time.time() - t0:.0f}s")
            loss_sum, n_sum = 0.0, 0
        if cfg.save_every and step % cfg.save_every == 0 and step < last:
            _save(model, tok, cfg, out / "snapshots" / f"step-{step}", step)
        if step % cfg.checkpoint_every == 0 and step < last:
            _checkpoint(ck, model, opt, sched, cfg, step, chunk, pos, seen_tokens)
    path = _save(model, tok, cfg, out, step)
    shutil.rmtree(ck, ignore_errors=True)
    return path


def _checkpoint(ck: Path, model, opt, sched, cfg, step, chunk, pos, tokens) -> None:
    tmp = ck.with_name(ck.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "config": asdict(cfg), "step": step, "chunk": chunk, "pos": pos, "tokens": tokens}, tmp / "state.pt")
    old = ck.with_name(ck.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ck.exists():
        os.replace(ck, old)
    os.replace(tmp, ck)
    shutil.rmtree(old, ignore_errors=True)


def _save(model, tok, cfg: PretrainConfig, out: Path, step: int) -> Path:
    tmp = out.with_name(out.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from selfdistill.models import quiet_transformers

    quiet_transformers()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "pretrain_config.json").write_text(json.dumps(asdict(cfg) | {"trained_steps": step}, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # files only: snapshots/, checkpoint/ and tokenizer/ inside out stay
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return out
