"""The baselines of d-OPSD's table, for masked-diffusion LMs: supervised (labels) and RLVR (verifier).

- ``diffusion-sft``: LLaDA's supervised masked-diffusion loss (:func:`selfdistill.diffusion.masked_diffusion_loss`)
  on the reference solutions, each padded with EOS to the response length (``rollout.max_new_tokens``) as the
  sampler writes it; one masking ratio and mask per row, drawn from the row's own seed when the batch is made.
- ``diffu-grpo`` (d1, arXiv 2504.12216): ``onpolicy.samples_per_prompt`` sampled answers per prompt, 0/1
  verifier rewards, group-normalised advantages and the objective library's clipped-ratio policy gradient on
  d1's one-step log-prob estimate: one forward with the whole response masked and each prompt token masked
  with probability ``diffu_grpo.prompt_mask``; the tokens up to the first EOS carry the loss. One update per
  batch (d1 takes several per batch; the table compares methods at equal optimizer steps), so the ratio's
  "old" log-probs are the current ones detached and no extra forward is spent; no KL term.

Both lay rows out right-padded (prompt, then the response); the model is bidirectional with rotary
positions, so this equals the sampler's left-padded layout.
"""

from __future__ import annotations

import time

import torch

from selfdistill.diffusion import mask_token_id, masked_diffusion_loss
from selfdistill.config_io import ConfigError
from selfdistill.methods.base import Method, TrainBatch, register
from selfdistill.models import unwrap
from selfdistill.objectives import clip_fraction, group_advantages, policy_gradient_loss
from selfdistill.rollout import generate, row_seed
from selfdistill.sequences import chat_prompt, encode_prompts, make_batch
from selfdistill.tasks.base import Item


def _prompts(ctx, items: list[Item], k: int = 1) -> list[list[int]]:
    return encode_prompts(ctx.tokenizer, [chat_prompt(ctx.tokenizer, it.prompt, ctx.system) for it in items
                                          for _ in range(k)])


def _padded(resp: list[int], length: int, eos: int) -> list[int]:
    """A response cut or padded with EOS to the sampler's fixed length."""
    return (list(resp) + [eos] * length)[:length]


@register
class DiffusionSFT(Method):
    name = "diffusion-sft"
    paper = "arXiv 2502.09992"
    summary = "SFT for masked-diffusion LMs: LLaDA's masked-diffusion loss on the reference solutions (labels)"
    model_kinds = ("masked",)
    requires_solution = True

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        ctx, tok = self.ctx, self.ctx.tokenizer
        L, eos = ctx.cfg.rollout.max_new_tokens, tok.eos_token_id
        targets = [_padded(tok(it.solution, add_special_tokens=False)["input_ids"], L, eos) for it in items]
        seqs = make_batch(_prompts(ctx, items), targets, tok.pad_token_id)
        t_B, noise = torch.empty(len(items)), torch.empty(seqs.input_ids_BT.shape)
        for b, seed in enumerate(ctx.sample_seeds(step, len(items), 1, "diffusion-sft")):
            g = torch.Generator().manual_seed(seed)  # the row's ratio and mask: its own stream
            t_B[b] = torch.rand((), generator=g)
            noise[b] = torch.rand(noise.shape[1:], generator=g)
        return TrainBatch(seqs, None, {"t_B": t_B, "noise_BT": noise})

    def token_mask(self, batch: TrainBatch) -> torch.Tensor:
        return torch.ones(len(batch), 1)  # one per row: LLaDA normalises each row by its response length

    def loss(self, micro: TrainBatch, num_tokens: torch.Tensor):
        ctx, s = self.ctx, micro.student.to(self.ctx.device)
        resp = s.completion_mask_BT.bool()
        mean = masked_diffusion_loss(ctx.model, s.input_ids_BT, s.attention_mask_BT, resp,
                                     mask_token_id(ctx.tokenizer), micro.tensors["t_B"].to(ctx.device),
                                     micro.tensors["noise_BT"].to(ctx.device))
        return mean * len(micro) / num_tokens.clamp_min(1), {}


@register
class DiffuGRPO(Method):
    name = "diffu-grpo"
    paper = "arXiv 2504.12216"
    summary = "diffu-GRPO (d1): GRPO for masked-diffusion LMs on a one-step log-prob estimate (verifier rewards)"
    sections = ("onpolicy", "grpo", "diffu_grpo")
    model_kinds = ("masked",)
    needs_rewards = True

    @classmethod
    def check(cls, cfg, tasks) -> None:
        if cfg.onpolicy.samples_per_prompt < 2:
            raise ConfigError("method diffu-grpo compares samples within a group: set "
                              f"--onpolicy.samples_per_prompt >= 2 (e.g. 4), got {cfg.onpolicy.samples_per_prompt}")
        if cfg.grpo.kl_coef > 0:
            raise ConfigError("method diffu-grpo has no KL term: set --grpo.kl_coef 0")

    def logprobs(self, model, ids: torch.Tensor, attn: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """d1's estimate: log p of every token with the positions in ``masked`` replaced by the mask."""
        noisy = torch.where(masked, torch.full_like(ids, mask_token_id(self.ctx.tokenizer)), ids)
        logits = model(input_ids=noisy, attention_mask=attn).logits.float()
        return logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        from selfdistill.tasks.verify import verify_item

        ctx, g, k = self.ctx, self.ctx.cfg.grpo, self.ctx.cfg.onpolicy.samples_per_prompt
        tok, L = ctx.tokenizer, ctx.cfg.rollout.max_new_tokens
        t0 = time.perf_counter()
        seeds = ctx.sample_seeds(step, len(items), k, "rollout")
        texts = [chat_prompt(tok, it.prompt, ctx.system) for it in items for _ in range(k)]
        ro = generate(unwrap(ctx.model), tok, texts, ctx.cfg.rollout, row_seeds=seeds)
        t_rollout = time.perf_counter() - t0
        rewards = torch.tensor([[float(verify_item(it, ro.texts[i * k + j])) for j in range(k)]
                                for i, it in enumerate(items)])
        adv_B = group_advantages(rewards, eps=g.adv_eps, scale=g.scale_rewards).reshape(-1)
        seqs = make_batch(ro.prompt_ids, [_padded(c, L, tok.eos_token_id) for c in ro.completion_ids],
                          tok.pad_token_id)
        target = torch.zeros_like(seqs.completion_mask_BT)
        pmask = torch.zeros(seqs.input_ids_BT.shape, dtype=torch.bool)
        for b, (p, c) in enumerate(zip(ro.prompt_ids, ro.completion_ids)):
            target[b, len(p):len(p) + len(c)] = 1  # up to the first EOS (kept)
            u = torch.rand(len(p), generator=torch.Generator().manual_seed(row_seed(seeds[b], "prompt-mask")))
            pmask[b, :len(p)] = u < ctx.cfg.diffu_grpo.prompt_mask
        masked = pmask | seqs.completion_mask_BT.bool()
        solved = (rewards.max(-1).values > rewards.min(-1).values).float()
        info = {"reward_mean": float(rewards.mean()), "groups_with_signal": float(solved.mean()),
                "time_rollout_s": t_rollout,
                "completion_len": sum(map(len, ro.completion_ids)) / max(1, len(ro.completion_ids))}
        return TrainBatch(seqs, None, {"adv_B": adv_B, "target_BT": target, "masked_BT": masked},
                          info)

    def token_mask(self, batch: TrainBatch) -> torch.Tensor:
        return batch.tensors["target_BT"]

    def loss(self, micro: TrainBatch, num_tokens: torch.Tensor):
        ctx, g = self.ctx, self.ctx.cfg.grpo
        s, dev = micro.student.to(self.ctx.device), self.ctx.device
        mask = micro.tensors["target_BT"].to(dev)
        logp = self.logprobs(ctx.model, s.input_ids_BT, s.attention_mask_BT, micro.tensors["masked_BT"].to(dev))
        # One update per batch, sampled at these very weights: the rollout policy's log-probs are the current
        # ones, detached (ratio exactly 1; no second forward when the batch is made, as in GRPO).
        old, adv = logp.detach(), micro.tensors["adv_B"].to(dev)[:, None]
        loss = policy_gradient_loss(logp, old, adv, mask, clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high,
                                    num_items_in_batch=num_tokens)
        return loss, {"clip_frac": clip_fraction(logp.detach(), old, adv, mask, clip_eps=g.clip_eps,
                                                 clip_eps_high=g.clip_eps_high)}
