"""The three conversation settings of CCOPD, and the multi-turn (sharded) rollout.

- ``full``: the original prompt, one user turn;
- ``sharded``: one user turn per shard, each followed by the model's own
  reply (intermediate replies are short: ``ccopd.turn_max_new_tokens``), the
  last reply is the answer;
- ``concat``: every shard in one user turn.

:func:`sharded_rollout` is the one place multi-turn conversations are
sampled; training (the student view) and the SHARDED evaluation both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from selfdistill.methods.ccopd.shard import join_shards
from selfdistill.rollout import SamplingConfig, generate
from selfdistill.sequences import chat_messages
from selfdistill.tasks.base import Item

SETTINGS = ("full", "sharded", "concat")


def messages_for(setting: str, item: Item | None, shards: Sequence[str], replies: Sequence[str] = (),
                 join: str = "newline") -> list[dict]:
    """The conversation (ending with a user turn) the model answers in ``setting``.

    For ``sharded``, ``replies`` are the assistant's replies to the first
    ``len(replies)`` shards; the conversation ends with shard ``len(replies)``.
    """
    if setting == "full":
        if item is None:
            raise ValueError("messages_for: the full setting needs the item")
        return [{"role": "user", "content": item.prompt}]
    if setting == "concat":
        return [{"role": "user", "content": join_shards(shards, join)}]
    if setting != "sharded":
        raise ValueError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    if len(replies) >= len(shards):
        raise ValueError(f"{len(replies)} replies for {len(shards)} shards: nothing left to ask")
    msgs: list[dict] = []
    for k, reply in enumerate(replies):
        msgs += [{"role": "user", "content": shards[k]}, {"role": "assistant", "content": reply}]
    return msgs + [{"role": "user", "content": shards[len(replies)]}]


@dataclass
class Turn:
    """One sampled assistant turn: its formatted-prompt ids, completion ids and text."""

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finished: bool
    revealed: int  # shards the user had revealed when this turn was sampled
    final: bool
    logprobs: list[float] | None = None  # the sampler's, when an engine sampled it (Rollouts.sampler_logprobs)


@dataclass
class Conversation:
    """A sharded conversation: its shards and the assistant turns sampled so far."""

    shards: list[str]
    turns: list[Turn] = field(default_factory=list)

    @property
    def final(self) -> Turn:
        return self.turns[-1]

    def messages(self) -> list[dict]:
        """The whole conversation: user shards and assistant replies alternating."""
        out: list[dict] = []
        for shard, turn in zip(self.shards, self.turns):
            out += [{"role": "user", "content": shard}, {"role": "assistant", "content": turn.text}]
        return out


def sharded_rollout(model, tokenizer, shard_lists: Sequence[Sequence[str]], cfg: SamplingConfig,
                    turn_max_new_tokens: int, system: str | None = None,
                    generator_seed: int | None = None) -> list[Conversation]:
    """Sample every conversation turn by turn, in batches across conversations.

    Turn t of every conversation that has one is sampled in one
    :func:`~selfdistill.rollout.generate` call (intermediate turns with at most
    ``turn_max_new_tokens`` tokens, final turns with ``cfg.max_new_tokens``);
    each reply is appended (as decoded text) before the next shard.
    """
    convs = [Conversation(list(s)) for s in shard_lists]
    if any(not c.shards for c in convs):
        raise ValueError("sharded_rollout: a conversation has no shards")
    mid_cfg = replace(cfg, max_new_tokens=turn_max_new_tokens)
    for t in range(max(len(c.shards) for c in convs)):
        for final in (False, True):
            idx = [i for i, c in enumerate(convs) if len(c.shards) > t and (t == len(c.shards) - 1) == final]
            if not idx:
                continue
            prompts = []
            for i in idx:
                c = convs[i]
                msgs = messages_for("sharded", None, c.shards, [u.text for u in c.turns])
                prompts.append(chat_messages(tokenizer, msgs, system))
            seed = None if generator_seed is None else generator_seed + 1009 * t + int(final)
            ro = generate(model, tokenizer, prompts, cfg if final else mid_cfg, generator_seed=seed)
            for j, i in enumerate(idx):
                lp = None if ro.sampler_logprobs is None else ro.sampler_logprobs[j]
                convs[i].turns.append(Turn(ro.prompt_ids[j], ro.completion_ids[j], ro.texts[j], ro.finished[j],
                                           t + 1, final, lp))
    return convs
