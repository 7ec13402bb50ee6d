"""Batched on-policy sampling: the one place completions are sampled.

Backends (``rollout.backend``):

- ``hf`` (default): the training model itself, in process. Llama-family
  decoders (Llama, Qwen2, Qwen3, Mistral) run :mod:`selfdistill.fastgen`'s
  lean KV-cache loop (same weights, same sampling rule, one prefill per
  distinct prompt, finished rows dropped); anything else, or a model with
  hooks that loop would skip, runs ``transformers`` ``generate``.
- ``vllm``: a vLLM engine (GPU), its weights synced from the training model
  whenever they changed; see :mod:`selfdistill.vllm_backend` and docs/vllm.md.

Activation views (SPD's K/V projection, steering) are context managers the
caller wraps around :func:`generate`; the KV cache is filled under them, so it
holds the edited activations (the vLLM backend cannot apply them and falls back
to ``hf`` while a view's hooks are installed).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

from selfdistill.sequences import encode_prompts

# torch is imported inside generate(): the config tree imports this module, and `selfdistill --help` must not
# pay for torch.


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    max_new_tokens: int = field(default=96, metadata={"help": "Longest completion, in tokens."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature; 0 means greedy."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus truncation (1.0 = off)."})
    top_k: int = field(default=20, metadata={"help": "Top-k truncation (0 = off)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generate call."})
    backend: Literal["hf", "vllm"] = field(default="hf", metadata={
        "help": "hf: sample with the training model in process; vllm: a vLLM engine on the GPU, weights synced "
                "after every optimizer step (needs `pip install vllm`; see docs/vllm.md)."})
    fast_decode: bool = field(default=True, metadata={
        "help": "hf backend: use selfdistill's lean KV-cache decode loop for Llama/Qwen-family models "
                "(false: always transformers generate)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "vllm backend: share of GPU memory the engine may take (the rest is left to training)."})
    # Masked-diffusion models (selfdistill.diffusion): the response is max_new_tokens masks, committed most
    # confident first; temperature applies (Gumbel-max), top_p / top_k do not.
    diffusion_block_length: int = field(default=16, metadata={"help": "Diffusion LMs: block length."})
    diffusion_steps: int = field(default=0, metadata={"help": "Diffusion LMs: steps (0 = 2 tokens/step)."})

    def __post_init__(self) -> None:
        # Named as the flags of the section this config sits in (``rollout`` in every command).
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"rollout.batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"rollout.temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0, got {self.top_k}")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"rollout.backend must be 'hf' or 'vllm', got {self.backend!r}")
        if self.diffusion_block_length < 1 or self.diffusion_steps < 0:
            raise ValueError("rollout.diffusion_block_length must be >= 1 and rollout.diffusion_steps >= 0")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError("rollout.vllm_gpu_memory_utilization must be in (0, 1], "
                             f"got {self.vllm_gpu_memory_utilization}")

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the sampler's log-probs: ``temperature``, or 1 when sampling is greedy."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Rollouts:
    """Sampled completions for a list of formatted prompts (same order).

    ``sampler_logprobs``: when an engine other than the training model sampled them (``rollout.backend
    vllm``), the engine's log-prob of each completion token, at :attr:`SamplingConfig.logprob_temperature`
    (see :mod:`selfdistill.vllm_backend`); an importance ratio against the sampler uses them. None: the
    training model sampled them itself, in process, at the weights it has until the next optimizer step.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]  # ended with EOS within max_new_tokens
    sampler_logprobs: list[list[float]] | None = None


def eos_ids(tokenizer, model) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and the model's generation-config EOS."""
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return sorted(ids)


def row_seed(*key: object) -> int:
    """A 63-bit seed from a key such as (run seed, step, position in the global batch, sample index): stable
    across processes and Python runs (unlike ``hash`` of a string)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big") >> 1


def generate(model, tokenizer, prompts: Sequence[str], cfg: SamplingConfig,
             generator_seed: int | None = None, progress=None, desc: str | None = None,
             row_seeds: Sequence[int] | None = None) -> Rollouts:
    """Sample one completion per formatted prompt, in batches, left-padded.

    Completions are cut after the first EOS (kept, so SFT learns to stop);
    ``texts`` are decoded without special tokens. ``progress``: called with each batch's size; ``desc``
    (without ``progress``): show a progress bar of that name over the completions (a phase longer than a
    few seconds: SPD's probe, SSD's dataset, a skill bank).

    ``row_seeds`` (one per prompt, e.g. :func:`row_seed` of (seed, step, position, sample)): each completion
    is drawn from its own random stream, so it does not depend on which prompts share its batch or on how
    many processes split the work (the lean loop and ``transformers`` ``generate`` draw the same tokens
    from the same stream). Without them, sampling uses torch's global RNG (``generator_seed`` reseeds it).
    """
    import torch

    bar = None
    if desc is not None and progress is None and len(prompts) > cfg.batch_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="completion", dynamic_ncols=True, leave=False)
        progress = bar.update
    try:
        with torch.no_grad():
            return _generate(model, tokenizer, prompts, cfg, generator_seed, progress, row_seeds)
    finally:
        if bar is not None:
            bar.close()


def _row_draws(uniforms, prompt_len: int, cfg: SamplingConfig):
    """A ``transformers`` logits processor that applies the sampling rule with per-row uniforms and leaves only
    the drawn token (generate then runs greedy over it), so the fallback draws what the lean loop draws."""
    import torch
    from transformers import LogitsProcessor

    from selfdistill.fastgen import _pick

    class RowDraws(LogitsProcessor):
        def __call__(self, input_ids, scores):
            t = input_ids.shape[1] - prompt_len
            tok = _pick(scores, cfg.temperature, cfg.top_k, cfg.top_p, uniforms[:, t].to(scores.device))
            return torch.full_like(scores, float("-inf")).scatter_(1, tok[:, None], 0.0)

    return RowDraws()


def diffusion_settings(cfg: SamplingConfig):
    """The masked-diffusion sampler's settings for ``cfg`` (a clear error when they do not fit together)."""
    from selfdistill.diffusion import DiffusionSampling

    n = cfg.max_new_tokens
    block = min(cfg.diffusion_block_length, n)
    try:
        return DiffusionSampling(gen_length=n, block_length=block, steps=cfg.diffusion_steps or max(n // 2, n // block),
                                 temperature=cfg.temperature)
    except ValueError as e:
        raise ValueError(f"rollout/eval max_new_tokens {n} with diffusion_block_length {block} and diffusion_steps "
                         f"{cfg.diffusion_steps}: {e}") from None


def _diffusion_generate(model, tokenizer, prompt_ids, cfg: SamplingConfig, eos, pad_id, row_seeds,
                        progress) -> Rollouts:
    from selfdistill.diffusion import mask_token_id, sample

    dcfg, mask = diffusion_settings(cfg), mask_token_id(tokenizer)
    completions, finished = [], []
    for start in range(0, len(prompt_ids), cfg.batch_size):
        seeds = None if row_seeds is None else row_seeds[start:start + cfg.batch_size]
        ro = sample(model, prompt_ids[start:start + cfg.batch_size], dcfg, mask, eos, pad_id, row_seeds=seeds)
        completions += ro.completion_ids
        finished += ro.finished
        if progress is not None:
            progress(len(ro.completion_ids))
    return Rollouts(prompt_ids, completions, tokenizer.batch_decode(completions, skip_special_tokens=True), finished)


def _generate(model, tokenizer, prompts: Sequence[str], cfg: SamplingConfig, generator_seed: int | None,
              progress, row_seeds: Sequence[int] | None = None) -> Rollouts:
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids(tokenizer, model)
    all_prompt_ids = encode_prompts(tokenizer, prompts)
    completions: list[list[int]] = []
    finished: list[bool] = []
    if row_seeds is not None and len(row_seeds) != len(all_prompt_ids):
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(all_prompt_ids)} prompts")
    if cfg.temperature == 0:
        row_seeds = None  # greedy: nothing is drawn
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    if cfg.backend == "vllm":
        from selfdistill import vllm_backend

        if vllm_backend.usable(model):
            completions, finished, logprobs = vllm_backend.generate_ids(model, all_prompt_ids, cfg, eos)
            if progress is not None:
                progress(len(all_prompt_ids))
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            return Rollouts(all_prompt_ids, completions, texts, finished, logprobs)
    from selfdistill import diffusion, fastgen

    if diffusion.is_masked_diffusion(model):
        return _diffusion_generate(model, tokenizer, all_prompt_ids, cfg, eos, pad_id, row_seeds, progress)
    fast = cfg.fast_decode and fastgen.unsupported_reason(model) is None
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(all_prompt_ids), cfg.batch_size):
            chunk = all_prompt_ids[start : start + cfg.batch_size]
            seeds = None if row_seeds is None else row_seeds[start : start + cfg.batch_size]
            if fast:
                c, f = fastgen.sample(model, chunk, cfg.max_new_tokens, eos, temperature=cfg.temperature,
                                      top_k=cfg.top_k, top_p=cfg.top_p, row_seeds=seeds)
                completions += c
                finished += f
                if progress is not None:
                    progress(len(chunk))
                continue
            T = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, p in enumerate(chunk):
                ids[b, T - len(p):] = torch.tensor(p)
                attn[b, T - len(p):] = 1
            sample = cfg.temperature > 0 and seeds is None
            kw = dict(do_sample=sample, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                      pad_token_id=pad_id)
            if sample:
                kw.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
            else:
                kw.update(temperature=None, top_p=None, top_k=None)
            if seeds is not None:  # the rule with per-row uniforms, as a processor; generate keeps its token
                from transformers import LogitsProcessorList

                from selfdistill.fastgen import row_uniforms

                kw["logits_processor"] = LogitsProcessorList(
                    [_row_draws(row_uniforms(seeds, cfg.max_new_tokens), T, cfg)])
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kw)
            new = out[:, T:].tolist()
            for row in new:
                cut = next((i for i, t in enumerate(row) if t in eos), None)
                completions.append(row[: cut + 1] if cut is not None else row)
                finished.append(cut is not None)
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollouts(all_prompt_ids, completions, texts, finished)
