"""CCOPD, canonical-context on-policy distillation (arXiv 2605.30251).

Student view: the problem's evidence revealed shard by shard over a
multi-turn conversation (user turns scripted from the shards, every assistant
turn the student's own rollout). Teacher view: the frozen base model
(``teacher.kind=initial``, the default) given the clean FULL prompt. The
divergence (``distill.*``) is taken on the student's final-turn completion
(``ccopd.turns=final``) or on every assistant turn (``all``; an intermediate
turn's teacher sees the shards revealed so far as one clean user turn, or the
full prompt: ``ccopd.intermediate_teacher``).

Everything after the rollout is the shared on-policy recipe
(:class:`~selfdistill.methods.onpolicy.OnPolicyMethod`): the student's
"prompt" is the conversation prefix, the teacher's is its single-turn view,
both score the same completion tokens. See docs/methods/ccopd_opcod.md.
"""

from __future__ import annotations

from selfdistill.methods.ccopd.conversation import messages_for, sharded_rollout
from selfdistill.methods.ccopd.shard import Sharder, join_shards
from selfdistill.config_io import ConfigError
from selfdistill.methods.base import TrainBatch, register
from selfdistill.methods.onpolicy import Group, OnPolicyMethod
from selfdistill.models import unwrap
from selfdistill.rollout import Rollouts
from selfdistill.sequences import chat_messages, encode_prompts
from selfdistill.tasks.base import Item


@register
class CCOPD(OnPolicyMethod):
    name = "ccopd"
    sections = ("onpolicy", "distill", "teacher", "ccopd")
    paper = "arXiv 2605.30251"
    summary = ("canonical-context OPD: student sees the evidence shard by shard over turns, frozen base teacher "
               "sees the clean full prompt")

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.sharder = Sharder(ctx.cfg.ccopd)
        self._teacher_users: list[str] = []
        self._info: dict[str, float] = {}
        if ctx.cfg.teacher.kind != "initial":
            ctx.log(f"ccopd: teacher.kind={ctx.cfg.teacher.kind} (the paper's teacher is the frozen base model, "
                    "teacher.kind=initial)")

    @classmethod
    def check(cls, cfg, tasks) -> None:
        """Every train item shards, and its conversation fits the context with its replies."""
        from selfdistill.models import check_model_config, load_tokenizer, resolve_model_path
        from selfdistill.validation import _context_length

        ccfg, trust = cfg.ccopd, cfg.model.trust_remote_code
        path = resolve_model_path(cfg.model.path)
        limit = _context_length(check_model_config(path, trust))
        tok = load_tokenizer(path, trust)
        sharder, system = Sharder(ccfg), cfg.model.system_prompt or None
        items = [it for t in tasks for it in t.items("train")]
        convs = [sharder(it) for it in items]  # an item with no shards fails here, by id
        if limit is None:
            return
        texts = [chat_messages(tok, messages_for("sharded", it, s, [""] * (len(s) - 1)), system)
                 for it, s in zip(items, convs)]
        for it, s, ids in zip(items, convs, encode_prompts(tok, texts)):
            need = len(ids) + (len(s) - 1) * ccfg.turn_max_new_tokens + cfg.rollout.max_new_tokens
            if need > limit:
                raise ConfigError(f"item {it.id}: its {len(s)}-shard conversation needs up to {need} tokens "
                                  f"({len(ids)} of prompts, ccopd.turn_max_new_tokens={ccfg.turn_max_new_tokens} "
                                  f"per intermediate reply, rollout.max_new_tokens={cfg.rollout.max_new_tokens}); "
                                  f"model.path {cfg.model.path} has a {limit}-token context")

    def teacher_user(self, item: Item, shards: list[str], revealed: int, final: bool) -> str:
        """The teacher's clean single-turn view of an assistant turn."""
        ccfg = self.ctx.cfg.ccopd
        if final or ccfg.intermediate_teacher == "full":
            return item.prompt
        return join_shards(shards[:revealed], ccfg.concat_join)

    def rollout(self, items: list[Item]) -> tuple[Rollouts, list[Group]]:
        """Sharded conversations (``onpolicy.samples_per_prompt`` per item); one row per trained turn."""
        ctx, ccfg = self.ctx, self.ctx.cfg.ccopd
        k = ctx.cfg.onpolicy.samples_per_prompt
        shard_lists = [self.sharder(it) for it in items for _ in range(k)]
        convs = sharded_rollout(unwrap(ctx.model), ctx.tokenizer, shard_lists, ctx.cfg.rollout,
                                ccfg.turn_max_new_tokens, ctx.system)
        prompt_ids, completion_ids, finished, logprobs = [], [], [], []
        self._teacher_users, groups = [], []
        for i, it in enumerate(items):
            rows = []
            for c in convs[i * k:(i + 1) * k]:
                for turn in (c.turns if ccfg.turns == "all" else [c.final]):
                    prompt_ids.append(turn.prompt_ids)
                    completion_ids.append(turn.completion_ids)
                    finished.append(turn.finished)
                    logprobs.append(turn.logprobs)
                    rows.append(turn.text)
                    self._teacher_users.append(self.teacher_user(it, c.shards, turn.revealed, turn.final))
            groups.append(Group(it, rows))
        from selfdistill.tasks.verify import verify_item

        final_ok = [float(verify_item(it, c.final.text)) for i, it in enumerate(items) for c in convs[i * k:(i + 1) * k]]
        self._info = {"sharded_reward_mean": sum(final_ok) / max(1, len(final_ok)),
                      "turns_mean": sum(len(c.turns) for c in convs) / max(1, len(convs))}
        texts = [t for g in groups for t in g.texts]
        if any(lp is None for lp in logprobs) and any(lp is not None for lp in logprobs):
            raise RuntimeError("ccopd: some turns were sampled by the vLLM engine and some in process")
        sampler_logprobs = None if not logprobs or logprobs[0] is None else logprobs
        return Rollouts(prompt_ids, completion_ids, texts, finished, sampler_logprobs), groups

    def teacher_prompts(self, groups: list[Group]) -> list[list[str | None]]:
        out, pos = [], 0
        for g in groups:
            out.append(self._teacher_users[pos:pos + len(g.texts)])
            pos += len(g.texts)
        return out

    def make_batch(self, step: int, items: list[Item]) -> TrainBatch:
        batch = super().make_batch(step, items)
        batch.info.update(self._info)
        return batch
