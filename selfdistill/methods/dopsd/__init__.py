"""d-OPSD (arXiv 2606.18195): on-policy self-distillation for masked-diffusion LMs.

Paper says: a masked-diffusion LM (LLaDA) samples its own answer; the state before every sampler step is
kept (the trajectory). The teacher is the same model with its base weights, shown the same state with a
random 25% of the positions after the current block filled with the student's own final tokens
("self-future"). At each state, the 2 still-masked positions of the current block where the teacher's
largest logit is highest get a reverse KL(student || teacher) over the teacher's top-20 tokens
(renormalised), each vocabulary element clamped at 0.05 before summing. A prompt is resampled (up to 8
times, T = 0.9) until its answer is verified correct; with no correct sample it gives no loss. One rollout
serves several optimizer steps (its states split into chunks).

We do: exactly that, on :func:`selfdistill.diffusion.sample` (``rollout.*``: ``max_new_tokens`` is the
response length, ``diffusion_block_length``, ``diffusion_steps``, ``temperature``) and the objective
library's :func:`~selfdistill.objectives.clipped_reverse_kl_on_support`. Where the paper is silent: the
self-future share is an exact count (rounded) drawn per state from the row's own seed; the loss is
normalised by the number of trained positions over all processes (the project's global-token rule; the
official code divides a sum by the batch, a constant factor away); the chunks of a rollout are the same
contiguous slice of every trajectory's states (early states first); the prompts of the steps between
rollouts are skipped, so a run of N steps reads N / ``dopsd.reuse`` batches of prompts.

The teacher's top-k support, its log-probs and the chosen positions are computed once per rollout (the
teacher is frozen), so a training step is one student forward per state.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from selfdistill.diffusion import DiffusionRollouts, logits_at, mask_token_id, sample
from selfdistill.config_io import ConfigError
from selfdistill.methods.base import Method, TrainBatch, register
from selfdistill.models import unwrap, unwrap_ddp
from selfdistill.objectives import clipped_reverse_kl_on_support, teacher_topk
from selfdistill.rollout import diffusion_settings, eos_ids, row_seed
from selfdistill.sequences import SequenceBatch, chat_prompt, encode_prompts, make_batch
from selfdistill.tasks.base import Item
from selfdistill.teachers import Teacher, TeacherConfig


def reveal_future(state: torch.Tensor, final: torch.Tensor, start: int, ratio: float, mask_id: int,
                  seed: int) -> torch.Tensor:
    """The teacher's view of one state (1-D ids): a ``ratio`` share (rounded) of the masked positions from
    ``start`` on filled with the final tokens there, chosen by ``seed``."""
    view = state.clone()
    cand = (view[start:] == mask_id).nonzero().squeeze(-1) + start
    n = int(round(ratio * cand.numel()))
    if n:
        pick = cand[torch.randperm(cand.numel(), generator=torch.Generator().manual_seed(seed))[:n]]
        view[pick] = final[pick]
    return view


def logits_of(model, seqs: SequenceBatch, pos_BP: torch.Tensor) -> torch.Tensor:
    """A masked LM's logits (B, P, V) at positions ``pos_BP`` of a right-padded batch (bidirectional: padding is
    masked out); the output layer runs on those positions only (:func:`selfdistill.diffusion.logits_at`)."""
    return logits_at(model, seqs.input_ids_BT, seqs.attention_mask_BT, pos_BP)


@register
class DOPSD(Method):
    name = "d-opsd"
    paper = "arXiv 2606.18195"
    summary = ("d-OPSD: a diffusion LM's own denoising trajectory, distilled from its base weights shown part "
               "of its own final answer")
    sections = ("dopsd",)
    model_kinds = ("masked",)
    needs_rewards = True  # correctness gating: a prompt trains only once a sample of it is verified correct

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.teacher = Teacher(unwrap_ddp(ctx.model), TeacherConfig(kind="initial"))
        self.pending: list[dict[str, Any]] = []  # chunks of the last rollout not trained on yet

    @classmethod
    def check(cls, cfg, tasks) -> None:
        if cfg.dopsd.resamples > 1 and cfg.rollout.temperature == 0:
            raise ConfigError(f"dopsd.resamples {cfg.dopsd.resamples} with rollout.temperature 0: every try "
                              "would write the same answer; set --rollout.temperature (the paper: 0.9) or "
                              "--dopsd.resamples 1")
        diffusion_settings(cfg.rollout)  # response length, blocks and steps fit together

    # -- rollouts: trajectories, tried until correct
    def trajectories(self, step: int, items: list[Item]) -> tuple[list[tuple[DiffusionRollouts, int, int]], dict]:
        """Per item whose answer was verified correct within ``dopsd.resamples`` tries: (rollout, row, seed
        of the row); and statistics."""
        from selfdistill.tasks.verify import verify_item

        ctx, cfg = self.ctx, self.ctx.cfg
        tok, model = ctx.tokenizer, unwrap(ctx.model)
        dcfg, mask = diffusion_settings(cfg.rollout), mask_token_id(tok)
        prompts = encode_prompts(tok, [chat_prompt(tok, it.prompt, ctx.system) for it in items])
        eos, pad = eos_ids(tok, model), tok.pad_token_id
        chosen: list[tuple[DiffusionRollouts, int, int] | None] = [None] * len(items)
        tries, todo = 0, list(range(len(items)))
        for j in range(cfg.dopsd.resamples):
            if not todo:
                break
            seeds = ctx.sample_seeds(step, len(items), 1, f"d-opsd/try{j}")
            for s in range(0, len(todo), cfg.rollout.batch_size):
                part = todo[s:s + cfg.rollout.batch_size]
                ro = sample(model, [prompts[i] for i in part], dcfg, mask, eos, pad, record=True,
                            row_seeds=[seeds[i] for i in part], tokenizer=tok)
                for r, i in enumerate(part):
                    if verify_item(items[i], ro.texts[r]):
                        chosen[i] = (ro, r, seeds[i])
            tries += len(todo)
            todo = [i for i in todo if chosen[i] is None]
        found = [c for c in chosen if c is not None]
        return found, {"solved_frac": len(found) / max(1, len(items)), "tries_per_prompt": tries / max(1, len(items))}

    def state_rows(self, found: list[tuple[DiffusionRollouts, int, int]]) -> list[list[tuple]]:
        """Per trajectory, per kept state: (prompt ids, student response, teacher response, block start,
        block end), response positions counted from the response's first token."""
        cfg, mask = self.ctx.cfg, mask_token_id(self.ctx.tokenizer)
        dcfg = diffusion_settings(cfg.rollout)
        out = []
        for ro, r, seed in found:
            P, prompt = ro.prompt_width, ro.prompt_ids[r]
            final = ro.final_BT[r, P:]
            rows = []
            for s, (state, blk) in enumerate(zip(ro.states, ro.step_block)):
                if cfg.dopsd.drop_last_block and blk == dcfg.blocks - 1:
                    continue
                lo, hi = blk * dcfg.block_length, (blk + 1) * dcfg.block_length
                student = state[r, P:]
                teacher = reveal_future(student, final, hi, cfg.dopsd.future_ratio, mask, row_seed(seed, s))
                rows.append((prompt, student.tolist(), teacher.tolist(), lo, hi))
            out.append(rows)
        return out

    def chunk(self, rows: list[tuple], info: dict[str, float]) -> dict[str, Any]:
        """One step's batch as tensors: student states, chosen positions, teacher support and log-probs."""
        ctx, d = self.ctx, self.ctx.cfg.dopsd
        tok, mask = ctx.tokenizer, mask_token_id(ctx.tokenizer)
        weight = 1.0
        if not rows:  # nothing verified correct: one row that carries no loss (every process steps alike)
            rows, weight = [self._empty_row], 0.0
        student = make_batch([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
        teacher = make_batch([r[0] for r in rows], [r[2] for r in rows], tok.pad_token_id)
        n, K = len(rows), d.topk
        pos = torch.zeros((n, d.positions), dtype=torch.long)
        valid = torch.zeros((n, d.positions), dtype=torch.bool)
        ids = torch.zeros((n, d.positions, K), dtype=torch.long)
        tlogp = torch.zeros((n, d.positions, K))
        mb = ctx.cfg.micro_batch_size
        with self.teacher.scoring() as tm:
            for s in range(0, n, mb):
                # each row's still-masked positions of its current block (padded with position 0, unused)
                cols_rows = [torch.tensor([len(r[0]) + i for i in range(r[3], r[4]) if r[1][i] == mask],
                                          dtype=torch.long) for r in rows[s:s + mb]]
                cols_BC = torch.nn.utils.rnn.pad_sequence(
                    [c if c.numel() else torch.zeros(1, dtype=torch.long) for c in cols_rows], batch_first=True)
                t_logits = logits_of(tm, rows_of(teacher, s, s + mb).to(ctx.device),
                                     cols_BC.to(ctx.device)).float().cpu()
                for b, cols in enumerate(cols_rows):
                    if not cols.numel() or weight == 0.0:
                        continue
                    score = t_logits[b, :cols.numel()].max(-1).values  # the teacher's max-logit: where it is surest
                    pick = score.topk(min(d.positions, cols.numel())).indices
                    top = cols[pick]
                    k_ids, k_logp = teacher_topk(t_logits[b, pick], K)
                    m = top.numel()
                    pos[s + b, :m], valid[s + b, :m] = top, True
                    ids[s + b, :m, :k_ids.shape[-1]], tlogp[s + b, :m, :k_ids.shape[-1]] = k_ids, k_logp
        fields = {"input_ids_BT": student.input_ids_BT, "attention_mask_BT": student.attention_mask_BT,
                  "completion_mask_BT": student.completion_mask_BT, "position_ids_BT": student.position_ids_BT}
        return {"student": fields, "tensors": {"pos_BP": pos, "valid_BP": valid, "ids_BPK": ids, "tlogp_BPK": tlogp},
                "info": info}

    @property
    def _empty_row(self) -> tuple:
        tok = self.ctx.tokenizer
        return ([tok.pad_token_id], [mask_token_id(tok)], [mask_token_id(tok)], 0, 1)

    def rollout_chunks(self, step: int, items: list[Item]) -> list[dict[str, Any]]:
        """This rollout's ``dopsd.reuse`` step batches."""
        t0 = time.perf_counter()
        found, info = self.trajectories(step, items)
        per_traj = self.state_rows(found)
        info["time_rollout_s"] = time.perf_counter() - t0
        info["states_per_trajectory"] = sum(map(len, per_traj)) / max(1, len(per_traj))
        reuse = self.ctx.cfg.dopsd.reuse
        chunks = []
        for c in range(reuse):
            rows = [r for traj in per_traj for r in traj[c * len(traj) // reuse:(c + 1) * len(traj) // reuse]]
            chunks.append(self.chunk(rows, dict(info, chunk=float(c))))
        return chunks

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        if not self.pending:
            self.pending = self.rollout_chunks(step, items)
        ch = self.pending.pop(0)
        return TrainBatch(SequenceBatch(**ch["student"]), None, dict(ch["tensors"]), dict(ch["info"]))

    def token_mask(self, batch: TrainBatch) -> torch.Tensor:
        return batch.tensors["valid_BP"].float()

    def loss(self, micro: TrainBatch, num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, d = self.ctx, self.ctx.cfg.dopsd
        s = micro.student.to(ctx.device)
        valid = micro.tensors["valid_BP"].to(ctx.device)
        pos = micro.tensors["pos_BP"].to(ctx.device)
        rows = logits_of(ctx.model, s, pos)  # (b, positions, V)
        per = clipped_reverse_kl_on_support(rows[valid], micro.tensors["ids_BPK"].to(ctx.device)[valid],
                                            micro.tensors["tlogp_BPK"].to(ctx.device)[valid], d.clip)
        return per.sum() / num_tokens.clamp_min(1), {}

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = list(state.get("pending", []))


def rows_of(b: SequenceBatch, lo: int, hi: int) -> SequenceBatch:
    """Rows ``lo:hi`` of a right-padded batch."""
    return SequenceBatch(b.input_ids_BT[lo:hi], b.attention_mask_BT[lo:hi], b.completion_mask_BT[lo:hi],
                         b.position_ids_BT[lo:hi])


from selfdistill.methods.dopsd import baselines  # noqa: E402,F401  (registers diffusion-sft and diffu-grpo)
