"""SGSD: skill-conditioned gated self-distillation (arXiv 2605.28791), see docs/methods/sgsd_critique.md.

Setup builds (or loads) a skill bank from the model's own verified rollouts
(:mod:`selfdistill.methods.sgsd`). Each step, every student rollout is scored by a
*pool* of teachers: the same (frozen, ``teacher.*``) model given the problem
plus one retrieved (skill, mistake) pair. Rows of the batch are (rollout,
teacher) pairs: the student sequence is repeated once per teacher (its forward
is computed once per rollout in :meth:`SGSD.loss`), the teacher sequence
differs, and ``weights_B`` carries the teacher weight. The loss is
:func:`~selfdistill.objectives.gated_token_loss`, averaged over the global
number of rollouts. Every ``sgsd.update_every`` steps the bank learns from
that step's rollouts.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from selfdistill.methods.base import TrainBatch, register
from selfdistill.methods.onpolicy import OnPolicyMethod
from selfdistill.models import unwrap
from selfdistill.objectives import gated_token_loss, teacher_support
from selfdistill.scoring import target_logprobs
from selfdistill.sequences import SequenceBatch, fill_template
from selfdistill.methods.sgsd.retrieval import make_similarity
from selfdistill.methods.sgsd.skills import (AutoExtractor, ModelExtractor, RuleExtractor, SkillBank, Trajectory,
                                            build_skill_bank, teacher_pool)
from selfdistill.tasks.base import Item
from selfdistill.toy.steps import is_toy


def excluded_token_ids(tokenizer, ids: list[int], chars: str) -> set[int]:
    """Which of ``ids`` are special tokens, or decode to only ``chars`` (the answer marker) and whitespace."""
    special = set(tokenizer.all_special_ids)
    out = set()
    for i in set(ids):
        if i in special:
            out.add(i)
            continue
        text = tokenizer.decode([i]).strip()
        if text and chars and all(c in chars for c in text):
            out.add(i)
    return out


def make_extractor(cfg, model, tokenizer, system: str | None = None, batch_size: int = 64):
    """The extractor ``sgsd.extractor`` names; the model one loads ``sgsd.extractor_model`` on first use."""
    rule = RuleExtractor(cfg.max_per_trajectory)
    if cfg.extractor == "rule":
        return rule

    def make_model():
        m = model
        if cfg.extractor_model:
            from transformers import AutoModelForCausalLM

            from selfdistill.models import load_tokenizer, resolve_model_path

            path = resolve_model_path(cfg.extractor_model)
            m = AutoModelForCausalLM.from_pretrained(path).to(next(model.parameters()).device).eval()
            return ModelExtractor(m, load_tokenizer(path), cfg.extract_template, cfg.max_per_trajectory,
                                  cfg.extract_max_new_tokens, system, batch_size)
        return ModelExtractor(m, tokenizer, cfg.extract_template, cfg.max_per_trajectory,
                              cfg.extract_max_new_tokens, system, batch_size)

    if cfg.extractor == "model":
        return make_model()
    return AutoExtractor(rule, make_model)


@register
class SGSD(OnPolicyMethod):
    name = "sgsd"
    sections = ("onpolicy", "teacher", "sgsd")
    paper = "arXiv 2605.28791"
    summary = "skill-conditioned gated self-distillation: a pool of skill+mistake teachers, gated bounded loss"
    needs_rewards = True

    @classmethod
    def check(cls, cfg, tasks) -> None:
        """A ``sgsd.bank_path`` is a skill bank (found before the run, not at its setup)."""
        super().check(cfg, tasks)
        if cfg.sgsd.bank_path:
            from selfdistill.validation import check_skill_bank

            check_skill_bank(cfg.sgsd.bank_path)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.bank: SkillBank | None = None
        self.similarity = make_similarity(ctx.cfg.sgsd.retriever, ctx.cfg.sgsd.embedding_model, ctx.log)
        self._extractor = None

    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = make_extractor(self.ctx.cfg.sgsd, unwrap(self.ctx.model), self.ctx.tokenizer,
                                             self.ctx.system, self.ctx.cfg.rollout.batch_size)
        return self._extractor

    # -- the bank
    def setup(self) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg.sgsd
        if self.bank is None:  # (a resumed run has its bank from the checkpoint)
            if cfg.bank_path:
                self.bank = SkillBank.load(cfg.bank_path)
                ctx.log(f"sgsd: loaded {len(self.bank.skills)} skills, {len(self.bank.mistakes)} mistakes "
                        f"from {cfg.bank_path}")
            elif ctx.rank == 0:
                self.bank = build_skill_bank(ctx.model, ctx.tokenizer, ctx.stream.items, cfg, ctx.cfg.rollout,
                                             self.extractor, seed=ctx.cfg.seed, similarity=self.similarity,
                                             system=ctx.system, log=ctx.log)
            self._sync_bank()
        self._save_bank()

    def _sync_bank(self) -> None:
        """Every process uses process 0's bank."""
        if self.ctx.world > 1:
            obj = [self.bank.to_dict() if self.ctx.rank == 0 else None]
            torch.distributed.broadcast_object_list(obj, src=0)
            self.bank = SkillBank.from_dict(obj[0])

    def _save_bank(self) -> None:
        if self.ctx.accelerator.is_main_process:
            self.bank.save(self.ctx.out_dir / "skill_bank.json")

    def _update_bank(self, groups, step: int) -> int:
        cfg = self.ctx.cfg.sgsd
        added = 0
        if self.ctx.rank == 0:
            trajs = [Trajectory(g.item, t, r > 0) for g in groups for t, r in zip(g.texts, g.rewards)]
            cands = [c for cs in self.extractor(trajs) for c in cs]
            added = len(self.bank.add(cands, similarity=self.similarity, threshold=cfg.similarity_threshold,
                                      capacity=cfg.capacity, max_new=cfg.update_max_new, step=step + 1))
        self._sync_bank()
        self._save_bank()
        return added

    # -- the batch: one row per (rollout, teacher)
    def _form(self, item: Item) -> str:
        """How guidance is written for ``item`` (``sgsd.guidance``; auto = tags for toy items)."""
        g = self.ctx.cfg.sgsd.guidance
        return ("tags" if is_toy(item) else "sentences") if g == "auto" else g

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        ctx, cfg = self.ctx, self.ctx.cfg.sgsd
        t0 = time.perf_counter()
        ro, groups = self.rollout(items)
        t_rollout = time.perf_counter() - t0
        info: dict[str, float] = {}
        if cfg.update_every and (step + 1) % cfg.update_every == 0:
            info["bank_added"] = float(self._update_bank(groups, step))
        pools = {}
        rows: list[tuple[int, str, float, float]] = []  # (rollout index, teacher user message, weight, reward)
        b = 0
        for g in groups:
            if g.item.id not in pools:
                pools[g.item.id] = teacher_pool(self.bank, g.item, cfg.num_teachers, self.similarity,
                                                cfg.weight_temperature)
            pool = pools[g.item.id]
            for r in g.rewards:
                for t in pool:
                    user = fill_template(cfg.template, "sgsd.template", guidance=t.guidance(self._form(g.item)),
                                         problem=g.item.prompt)
                    rows.append((b, user, t.weight, r))
                if not pool:  # no teacher: a placeholder row of weight 0 keeps the batch well formed
                    rows.append((b, g.item.prompt, 0.0, r))
                b += 1
        k = len(groups[0].texts)
        t_ids = self.teacher_ids([u for _, u, _, _ in rows], [groups[i // k].item for i, _, _, _ in rows])
        student, teacher = self.sequences([ro.prompt_ids[i] for i, _, _, _ in rows],
                                          [ro.completion_ids[i] for i, _, _, _ in rows], t_ids)
        drop = excluded_token_ids(ctx.tokenizer, [t for c in ro.completion_ids for t in c], cfg.exclude_chars)
        keep_BT = student.completion_mask_BT.bool()
        if drop:
            keep_BT &= ~torch.isin(student.input_ids_BT, torch.tensor(sorted(drop)))
        tensors = {"weights_B": torch.tensor([w for _, _, w, _ in rows]),
                   "rewards_B": torch.tensor([r for _, _, _, r in rows]),
                   "sample_B": torch.tensor([i for i, _, _, _ in rows]),
                   "gate_BT": keep_BT.long()}
        n_teachers = [len(p) for p in pools.values()]
        rs = [r for g in groups for r in g.rewards]
        info.update({"reward_mean": sum(rs) / max(1, len(rs)), "time_rollout_s": t_rollout,
                     "teachers_per_prompt": sum(n_teachers) / max(1, len(n_teachers)),
                     "bank_skills": float(len(self.bank.skills)), "bank_mistakes": float(len(self.bank.mistakes)),
                     "completion_len": sum(len(c) for c in ro.completion_ids) / max(1, len(ro.completion_ids))})
        return TrainBatch(student, teacher, tensors, info)

    def token_mask(self, batch: TrainBatch) -> torch.Tensor:
        gate = batch.tensors["gate_BT"][:, 1:].to(batch.student.completion_mask_BT.device)
        return gate * (batch.tensors["weights_B"][:, None] > 0).to(gate.device)

    def loss(self, micro: TrainBatch, num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, cfg = self.ctx, self.ctx.cfg.sgsd
        dev = ctx.device
        s, t = micro.student.to(dev), micro.teacher.to(dev)
        sample_B = micro.tensors["sample_B"].to(dev)
        # One student forward per rollout: its rows (one per teacher) are consecutive and identical.
        first_B = torch.ones_like(sample_B, dtype=torch.bool)
        first_B[1:] = sample_B[1:] != sample_B[:-1]
        inv_B = first_B.long().cumsum(0) - 1
        idx_U = first_B.nonzero().squeeze(-1)
        s_u = SequenceBatch(s.input_ids_BT[idx_U], s.attention_mask_BT[idx_U], s.completion_mask_BT[idx_U],
                            s.position_ids_BT[idx_U])
        logp_s_BT = target_logprobs(ctx.model, s_u)[inv_B]
        t0 = time.perf_counter()
        with self.teacher.scoring() as tm:
            logp_t_BT = target_logprobs(tm, t)
        t_teacher = time.perf_counter() - t0
        # Completion tokens sit at different columns behind the two prompts: left-align both.
        s_mask, t_mask = s.completion_mask_BT[:, 1:].bool(), t.completion_mask_BT[:, 1:].bool()
        n_B = s_mask.sum(-1)
        C = max(int(n_B.max()), 1)
        pos_BC = torch.arange(C, device=dev)[None] < n_B[:, None]
        logp_s_BC = logp_s_BT.new_zeros(pos_BC.shape).masked_scatter(pos_BC, logp_s_BT[s_mask])
        logp_t_BC = logp_t_BT.new_zeros(pos_BC.shape).masked_scatter(pos_BC, logp_t_BT[t_mask])
        gate = micro.tensors["gate_BT"].to(dev)[:, 1:][s_mask].float()
        gate_BC = torch.zeros(pos_BC.shape, device=dev).masked_scatter(pos_BC, gate)
        weights_B, rewards_B = micro.tensors["weights_B"].to(dev), micro.tensors["rewards_B"].to(dev)
        n_rollouts = ctx.cfg.batch_size * ctx.cfg.onpolicy.samples_per_prompt
        loss = gated_token_loss(logp_s_BC, logp_t_BC, gate_BC, rewards_B, weights_B, tau=cfg.tau,
                                clip=cfg.delta_clip, threshold=cfg.support_threshold, num_items_in_batch=n_rollouts)
        with torch.no_grad():
            live = weights_B > 0
            support, sign = teacher_support(logp_t_BC - logp_s_BC.detach(), gate_BC, clip=cfg.delta_clip,
                                            threshold=cfg.support_threshold)
            pol = sign * torch.where(rewards_B > 0, 1.0, -1.0)
            n = max(int(live.sum()), 1)
            stats = {"support_mean": float(support[live].sum()) / n,
                     "polarity_pos_frac": float((pol[live] > 0).sum()) / n,
                     "polarity_zero_frac": float((pol[live] == 0).sum()) / n,
                     "time_teacher_s": t_teacher}
        return loss, stats

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bank": self.bank.to_dict() if self.bank is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("bank") is not None:
            self.bank = SkillBank.from_dict(state["bank"])


def skills_cli(cfg, out: str, show: int = 2, log=print):
    """``selfdistill sgsd skills``: build the skill bank from the model's own rollouts, save it, show it.

    Also shows the teacher pool (pairs, scores, weights) of ``show`` train items.
    """
    from pathlib import Path

    from selfdistill.models import load_model
    from selfdistill.tasks.registry import ItemStream, build_tasks

    tasks = build_tasks(cfg.data)
    model, tok = load_model(cfg.model)
    system = cfg.model.system_prompt or None
    items = ItemStream(tasks, cfg.batch_size, cfg.seed).items
    scfg = cfg.sgsd
    similarity = make_similarity(scfg.retriever, scfg.embedding_model, log)
    extractor = make_extractor(scfg, model, tok, system, cfg.rollout.batch_size)
    if scfg.bank_path:
        bank = SkillBank.load(scfg.bank_path)
    else:
        bank = build_skill_bank(model, tok, items, scfg, cfg.rollout, extractor, seed=cfg.seed,
                                similarity=similarity, system=system, log=log)
    path = bank.save(Path(out))
    log(bank.format())
    log(f"saved {path}")
    for it in items[:show]:
        log(f"\nteachers for {it.id}: {it.prompt!r}")
        for i, t in enumerate(teacher_pool(bank, it, scfg.num_teachers, similarity, scfg.weight_temperature)):
            log(f"  {i}: weight {t.weight:.3f} (score {t.score:.3f})  " + t.guidance().replace("\n", " | "))
    return path
