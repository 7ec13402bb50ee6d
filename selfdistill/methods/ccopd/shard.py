"""Sharding: a problem's evidence split into user turns revealed one by one (CCOPD, arXiv 2605.30251).

The first shard states the goal; later shards add the conditions; the last
one asks for the result. Sources, in the order ``ccopd.sharder=auto`` tries
them:

1. ``item.meta["shards"]`` (a JSONL task can carry them in its ``meta``);
2. ``ccopd.shards_file``: JSONL rows ``{"id" or "prompt", "shards": [...]}``,
   matched to items by id, then by prompt text;
3. the toy rules (:func:`toy_shards`), deterministic, for toy items;
4. otherwise an error naming the item. ``sentences`` (split at lines and
   sentence ends) is an explicit choice, never a silent fallback.

:func:`shard_with_model` shards through a prompt to a local model (the
``selfdistill ccopd shard`` command writes its output as a shards file);
replies that do not keep every number of the problem fall back to the
sentence rule, and each row records which source it came from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from selfdistill.method_configs import CCOPDConfig
from selfdistill.tasks.base import Item

_NUM = re.compile(r"\d+(?:\.\d+)?")
_TOY_MATH = re.compile(r"^Compute (\d+)((?:[+-]\d+)+)$")
_TOY_CODE_HEAD = "What does this print?\n"
_OPTION = re.compile(r"^([A-Z])\) (.*)$")

MATH_GOAL = "I need a number computed step by step."
CODE_GOAL = "I have a short Python program and want to know what it prints."
CODE_ASK = "What does it print?"
MATH_ASK = "What is the result?"
MCQA_END = "Those are all the options."


def numbers(text: str) -> list[str]:
    """Every number in ``text``, in order, with repeats (the coverage check of a sharding)."""
    return _NUM.findall(text)


def covers(original: str, shards: Sequence[str]) -> bool:
    """True if the shards, concatenated, carry every number of ``original`` (as a multiset)."""
    have = numbers("\n".join(shards))
    for n in numbers(original):
        if n not in have:
            return False
        have.remove(n)
    return True


def join_shards(shards: Sequence[str], join: str = "newline") -> str:
    """The CONCAT text: every shard in one user turn."""
    return ("\n" if join == "newline" else " ").join(s.strip() for s in shards)


# ---------------------------------------------------------------- toy rules


def _math_shards(prompt: str) -> list[str] | None:
    m = _TOY_MATH.match(prompt.strip())
    if not m:
        return None
    ops = re.findall(r"([+-])(\d+)", m.group(2))
    out = [MATH_GOAL, f"Start from {m.group(1)}."]
    for i, (op, n) in enumerate(ops):
        verb = "Add" if op == "+" else "Subtract"
        if i == len(ops) - 1:
            out.append((f"Then {verb.lower()} {n}." if len(ops) > 1 else f"{verb} {n}.") + f" {MATH_ASK}")
        else:
            out.append(f"{verb} {n}.")
    return out


def _code_shards(prompt: str, per_shard: int) -> list[str] | None:
    if not prompt.startswith(_TOY_CODE_HEAD):
        return None
    lines = prompt[len(_TOY_CODE_HEAD):].split("\n")
    stmts: list[list[str]] = []  # a line and the indented lines under it
    for line in lines:
        if line.startswith((" ", "\t")) and stmts:
            stmts[-1].append(line)
        else:
            stmts.append([line])
    chunks = ["\n".join(l for s in stmts[i:i + per_shard] for l in s) for i in range(0, len(stmts), per_shard)]
    out = [CODE_GOAL]
    for i, chunk in enumerate(chunks):
        head = "It starts with:" if i == 0 else "Then:"
        out.append(f"{head}\n{chunk}" + (f"\n{CODE_ASK}" if i == len(chunks) - 1 else ""))
    return out


def _mcqa_shards(prompt: str, per_shard: int) -> list[str] | None:
    question, *rest = prompt.split("\n")
    if not rest or not all(_OPTION.match(l) for l in rest):
        return None
    groups = ["\n".join(rest[i:i + per_shard]) for i in range(0, len(rest), per_shard)]
    return [question] + [g + (f"\n{MCQA_END}" if i == len(groups) - 1 else "") for i, g in enumerate(groups)]


def toy_shards(item: Item, cfg: CCOPDConfig | None = None) -> list[str] | None:
    """The toy world's deterministic sharding of ``item``, or None if it is not a toy-format prompt.

    math ``Compute 47+8-5`` -> goal, ``Start from 47.``, ``Add 8.``, ``Then subtract 5. What is the
    result?``; code: goal, then the program's statements in chunks, then the question; mcqa: the
    question, then the options in groups.
    """
    cfg = cfg or CCOPDConfig()
    if item.meta.get("shards") and item.id.startswith("toy-"):  # the v2 toy world writes its own shards
        return list(item.meta["shards"])
    kind = item.meta.get("kind")
    if kind == "math":
        return _math_shards(item.prompt)
    if kind == "code_output":
        return _code_shards(item.prompt, cfg.code_lines_per_shard)
    if kind == "mcqa":
        return _mcqa_shards(item.prompt, cfg.mcqa_options_per_shard)
    return None


# ---------------------------------------------------------------- generic rules


def sentence_shards(prompt: str, max_shards: int = 4) -> list[str]:
    """Split at line breaks and sentence ends; the first piece is the goal, the rest are grouped
    into at most ``max_shards - 1`` contiguous shards of near-equal size."""
    pieces = [p.strip() for p in re.split(r"\n+|(?<=[.?!])\s+", prompt.strip()) if p.strip()]
    if len(pieces) <= 1:
        return pieces or [prompt]
    head, rest = pieces[0], pieces[1:]
    n = min(max_shards - 1, len(rest))
    size, extra = divmod(len(rest), n)
    out, pos = [head], 0
    for i in range(n):
        k = size + (1 if i < extra else 0)
        out.append(" ".join(rest[pos:pos + k]))
        pos += k
    return out


def _check_shards(shards, where: str) -> list[str]:
    if not isinstance(shards, list) or not shards or not all(isinstance(s, str) and s.strip() for s in shards):
        raise ValueError(f"{where}, field 'shards': must be a non-empty list of non-empty strings")
    return list(shards)


def load_shards_file(path: str | Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(by id, by prompt) from a JSONL of ``{"id" or "prompt", "shards"}`` rows; errors name row and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ccopd.shards_file {path}: no such file")
    by_id: dict[str, list[str]] = {}
    by_prompt: dict[str, list[str]] = {}
    from selfdistill.tasks.loaders import json_rows

    for lineno, row in json_rows(path):
        where = f"{path}, row {lineno}"
        if "shards" not in row:
            raise ValueError(f"{where}, field 'shards': missing")
        shards = _check_shards(row["shards"], where)
        if row.get("id") in (None, "") and not row.get("prompt"):
            raise ValueError(f"{where}: needs an 'id' or a 'prompt' to match items")
        if row.get("id") not in (None, ""):
            by_id[str(row["id"])] = shards
        if row.get("prompt"):
            by_prompt[str(row["prompt"])] = shards
    return by_id, by_prompt


class Sharder:
    """``item -> shards`` with the configured source (see the module docstring); results are cached."""

    def __init__(self, cfg: CCOPDConfig) -> None:
        self.cfg = cfg
        self.by_id: dict[str, list[str]] = {}
        self.by_prompt: dict[str, list[str]] = {}
        if cfg.shards_file and cfg.sharder in ("auto", "file"):
            self.by_id, self.by_prompt = load_shards_file(cfg.shards_file)
        self._cache: dict[tuple[str, str], list[str]] = {}

    def __call__(self, item: Item) -> list[str]:
        key = (item.id, item.prompt)
        if key not in self._cache:
            self._cache[key] = self._shard(item)
        return self._cache[key]

    def _shard(self, item: Item) -> list[str]:
        mode = self.cfg.sharder
        if mode == "sentences":
            return sentence_shards(item.prompt, self.cfg.max_shards)
        if mode == "auto" and "shards" in item.meta:
            return _check_shards(item.meta["shards"], f"item {item.id}, meta")
        if mode in ("auto", "file"):
            found = self.by_id.get(item.id) or self.by_prompt.get(item.prompt)
            if found is not None:
                return found
            if mode == "file":
                raise ValueError(f"item {item.id}: no row for it (by id or prompt) in ccopd.shards_file "
                                 f"{self.cfg.shards_file}")
        shards = toy_shards(item, self.cfg)
        if shards is not None:
            return shards
        raise ValueError(f"item {item.id}: no shards for it (not a toy-format prompt, no meta['shards'], no row "
                         "in ccopd.shards_file); write shards with `selfdistill ccopd shard` or set "
                         "--ccopd.sharder sentences")


# ---------------------------------------------------------------- sharding by a model

SHARD_PROMPT = ("Split the problem below into {n} short messages that a user would send one after another. "
                "The first message states only the goal; each later message adds some of the conditions; "
                "together they must contain every number and condition of the problem. Write one message per "
                "line, each starting with 'SHARD: '.\n\nProblem:\n{problem}")


def parse_model_shards(text: str) -> list[str]:
    """The ``SHARD: ...`` lines of a sharding reply, in order."""
    return [l.split(":", 1)[1].strip() for l in text.splitlines()
            if l.strip().upper().startswith("SHARD:") and l.split(":", 1)[1].strip()]


def shard_with_model(model, tokenizer, items: Sequence[Item], sampling, max_shards: int = 4,
                     template: str = SHARD_PROMPT, system: str | None = None) -> list[dict]:
    """Shard ``items`` by prompting ``model``; one row per item: ``{"id", "prompt", "shards", "source"}``.

    A reply with fewer than two shards or that drops a number of the problem is
    replaced by :func:`sentence_shards` (``source: "fallback"``).
    """
    from selfdistill.rollout import generate
    from selfdistill.sequences import chat_prompt

    prompts = [chat_prompt(tokenizer, template.format(n=max_shards, problem=it.prompt), system) for it in items]
    texts = generate(model, tokenizer, prompts, sampling).texts
    rows = []
    for it, text in zip(items, texts):
        shards = parse_model_shards(text)[:max_shards]
        source = "model"
        if len(shards) < 2 or not covers(it.prompt, shards):
            shards, source = sentence_shards(it.prompt, max_shards), "fallback"
        rows.append({"id": it.id, "prompt": it.prompt, "shards": shards, "source": source})
    return rows
