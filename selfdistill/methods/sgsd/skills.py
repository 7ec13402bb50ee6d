"""SGSD's skill bank: general skills from the model's own successes, common mistakes from its failures.

1. :func:`build_skill_bank` samples the model's trajectories on train prompts,
   scores them with the task verifier, and asks an *extractor* for at most
   ``max_per_trajectory`` skills (successes) or mistakes (failures) each;
2. :meth:`SkillBank.add` merges them: an entry as similar as
   ``similarity_threshold`` to one already in the bank is counted into it,
   the rest are added (at most ``max_new`` at a time), and only the
   ``capacity`` most frequent entries of each kind are kept;
3. :func:`teacher_pool` retrieves, for one problem, the top-K skills and top-K
   mistakes, pairs the i-th with the i-th, and weights the teachers by the
   softmax of their mean retrieval score.

Extractors: :class:`RuleExtractor` (deterministic, the toy world: the trace's
steps are recomputed and compared, see :mod:`selfdistill.toy.steps`) and
:class:`ModelExtractor` (any local model through a prompt).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

from selfdistill.sequences import fill_template
from selfdistill.methods.sgsd.retrieval import Similarity, TfidfSimilarity
from selfdistill.tasks.base import ANSWER_MARKER, Item, extract_after_marker
from selfdistill.toy import steps as toy

Kind = Literal["skill", "mistake"]


@dataclass
class Entry:
    """One skill or mistake: a short general sentence, retrieval keywords, how often it was extracted."""

    text: str
    kind: Kind
    domain: str = ""
    keys: list[str] = field(default_factory=list)
    count: int = 1
    step: int = 0  # training step at which it entered the bank (0: the initial build)

    def document(self) -> str:
        """What retrieval compares a problem with."""
        return " ".join([self.text, *self.keys])

    def tag(self) -> str | None:
        """The toy world's closed-vocabulary skill (``carry``, ``borrow``, ...) this entry is about, if any."""
        return next((TOY_TAGS[k] for k in self.keys if k in TOY_TAGS), None)


#: Rule features -> the toy world's skill vocabulary (``skill: carry`` lines, as its pretraining writes them).
TOY_TAGS = {"add_carry": "carry", "sub_borrow": "borrow", "mul": "times", "if": "branch", "largest": "compare"}


@dataclass
class Candidate:
    """An extracted sentence before merging."""

    text: str
    kind: Kind
    domain: str = ""
    keys: list[str] = field(default_factory=list)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9# ]+", " ", text.lower()).split())


@dataclass
class SkillBank:
    """Skills and mistakes, each a list of :class:`Entry`, most frequent first."""

    skills: list[Entry] = field(default_factory=list)
    mistakes: list[Entry] = field(default_factory=list)

    def entries(self, kind: Kind) -> list[Entry]:
        return self.skills if kind == "skill" else self.mistakes

    def __len__(self) -> int:
        return len(self.skills) + len(self.mistakes)

    def add(self, candidates: Sequence[Candidate], *, similarity: Similarity | None = None,
            threshold: float = 0.8, capacity: int = 30, max_new: int | None = None, step: int = 0) -> list[Entry]:
        """Merge ``candidates`` (in order); returns the entries that are new. See the module doc."""
        sim = similarity or TfidfSimilarity()
        added: list[Entry] = []
        for kind in ("skill", "mistake"):
            bank = self.entries(kind)
            budget = max_new if max_new is not None else len(candidates)
            for c in (c for c in candidates if c.kind == kind):
                key = _norm(c.text)
                if not key:
                    continue
                same = next((e for e in bank if _norm(e.text) == key and e.domain == c.domain), None)
                if same is None:
                    peers = [e for e in bank if e.domain == c.domain]
                    if peers:
                        scores = sim([c.text], [e.text for e in peers])[0]
                        best = max(range(len(peers)), key=lambda i: (scores[i], -i))
                        if scores[best] >= threshold:
                            same = peers[best]
                if same is not None:
                    same.count += 1
                    same.keys = list(dict.fromkeys(same.keys + c.keys))
                    continue
                if budget <= 0:
                    continue
                e = Entry(c.text.strip(), kind, c.domain, list(dict.fromkeys(c.keys)), step=step)
                bank.append(e)
                added.append(e)
                budget -= 1
            # Most frequent first, the newer first among equally frequent ones (an online update can
            # replace stale rare entries); within one update, order of arrival. Then the capacity.
            bank.sort(key=lambda e: (-e.count, -e.step))
            dropped = bank[capacity:]
            del bank[capacity:]
            added = [e for e in added if all(e is not d for d in dropped)]
        return added

    def to_dict(self) -> dict[str, Any]:
        return {"skills": [asdict(e) for e in self.skills], "mistakes": [asdict(e) for e in self.mistakes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SkillBank":
        try:
            return cls([Entry(**e) for e in data.get("skills", [])], [Entry(**e) for e in data.get("mistakes", [])])
        except TypeError as e:
            raise ValueError(f"skill bank: malformed entry ({e})") from None

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> "SkillBank":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"sgsd.bank_path {p}: no such file")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"sgsd.bank_path {p}: not JSON ({e})") from None

    def format(self) -> str:
        """A readable listing."""
        out = []
        for kind, title in (("skill", "general skills"), ("mistake", "common mistakes")):
            es = self.entries(kind)
            out.append(f"{title} ({len(es)}):")
            out += [f"  [{e.count:3d}] {e.domain + ': ' if e.domain else ''}{e.text}" for e in es]
        return "\n".join(out)


# ---------------------------------------------------------------- extractors
@dataclass
class Trajectory:
    item: Item
    completion: str
    correct: bool


class Extractor(Protocol):
    def __call__(self, trajectories: Sequence[Trajectory]) -> list[list[Candidate]]: ...


# Rule texts (toy world). Keys are the features of :func:`selfdistill.toy.steps.problem_features`.
_MATH_SKILLS = {
    "add_carry": "When adding, carry 1 to the tens digit if the ones digits sum past 9.",
    "add": "Add the ones digits first, then the tens digits.",
    "sub_borrow": "When subtracting, borrow 10 from the tens digit if the ones digit is too small.",
    "sub": "Subtract step by step: the ones digit, then the tens digit.",
    "steps": "Write one operation per line and start each line from the previous line's result.",
    "answer": f"End with '{ANSWER_MARKER} ' followed by the last line's result.",
}
_MATH_MISTAKES = {
    "add_carry": "Recheck additions with a carry: ones digits summing past 9 add 1 to the tens digit.",
    "add": "Recheck plain additions: add the ones digits, then the tens digits.",
    "sub_borrow": "Recheck subtractions with a borrow: a too-small ones digit borrows 10 from the tens digit.",
    "sub": "Recheck plain subtractions: take away the ones digit first, then the tens digit.",
    "chain": "Start each step from the result of the previous step, not from another number.",
    "copy": "Copy each operation and number from the problem exactly, in order.",
    "missing": "Apply every operation of the problem before giving the answer.",
    "final": "Give the last step's result as the final answer.",
    "format": f"End with '{ANSWER_MARKER} ' followed by the final value.",
}
_CODE_SKILLS = {
    "trace": "Trace each assignment in order, writing the value the variable gets.",
    "mul": "For x * k, multiply the current value of x; 3 * k is k + k + k.",
    "add": "Substitute the variable's current value, then add.",
    "sub": "Substitute the variable's current value, then subtract; the result may be negative.",
    "if": "For an if, compare the current value with the threshold before changing the variable.",
    "print": "Print the variable named in print(...), which need not be the last one assigned.",
}
_CODE_MISTAKES = {
    "mul": "Recheck multiplications of the traced values.",
    "add": "Recheck additions of the traced values.",
    "sub": "Recheck subtractions of the traced values, including negative results.",
    "value": "Substitute the variable's current value, not an older or different variable's.",
    "if": "Compare the value with the threshold correctly before deciding whether the if runs.",
    "print": "Answer with the value of the variable named in print(...).",
    "format": f"End with '{ANSWER_MARKER} ' followed by the printed value.",
}
_MCQA_SKILLS = {
    "equals": "Compute the value first, then pick the letter whose option holds it.",
    "largest": "Compare every option and pick the letter of the biggest value.",
    "answer": f"Answer with a single option letter after '{ANSWER_MARKER}'.",
}
_MCQA_MISTAKES = {
    "arith": "Recheck the arithmetic before matching an option.",
    "letter": "Match the computed value to the letter written next to it.",
    "largest": "Compare all options before choosing the largest; more tens means bigger.",
    "format": f"End with '{ANSWER_MARKER} ' followed by one option letter.",
}
_GENERIC = {
    "skill": f"Work step by step and state the final answer after '{ANSWER_MARKER}'.",
    "mistake": "Check every step and the final answer against the question before answering.",
}


def _math_rules(item: Item, completion: str, correct: bool) -> list[tuple[str, list[str]]]:
    expected = toy.math_steps(item.prompt) or []
    if correct:
        feats = [f for a, op, b, _ in expected for f in toy.step_features(a, op, b)]
        # The most specific feature of each step first (carry/borrow before plain add/sub).
        order = sorted(dict.fromkeys(feats), key=lambda f: ("_" not in f, feats.index(f)))
        return [(_MATH_SKILLS[f], ["math", *dict.fromkeys([f.split("_")[0], f])]) for f in order] + [
            (_MATH_SKILLS["steps"], ["math", "steps"]), (_MATH_SKILLS["answer"], ["math", "answer"])]
    out: list[tuple[str, list[str]]] = []
    lines = [ln for ln in completion.split("\n") if ln.strip() and ANSWER_MARKER not in ln]
    prev = toy.math_operations(item.prompt)
    value = prev[0] if prev else None
    for i, ln in enumerate(lines):
        p = toy.parse_step(ln)
        if p is None:
            continue
        a, op, b, c = p
        if c != toy.apply(a, op, b):
            f = toy.step_features(a, op, b)
            out.append((_MATH_MISTAKES[f[-1]], ["math", *f]))
        elif value is not None and a != value:
            out.append((_MATH_MISTAKES["chain"], ["math", "steps"]))
        elif i < len(expected) and (op, b) != expected[i][1:3]:
            out.append((_MATH_MISTAKES["copy"], ["math", "steps"]))
        value = c
    if len(lines) < len(expected):
        out.append((_MATH_MISTAKES["missing"], ["math", "steps"]))
    ans = extract_after_marker(completion)
    if ans is None:
        out.append((_MATH_MISTAKES["format"], ["math", "answer"]))
    elif value is not None and ans.strip() != str(value):
        out.append((_MATH_MISTAKES["final"], ["math", "answer"]))
    return out


def _code_rules(item: Item, completion: str, correct: bool) -> list[tuple[str, list[str]]]:
    tr = toy.code_trace(item.meta.get("program") or item.prompt.split("\n", 1)[-1])
    if tr is None:
        return []
    expected, _, _, feats = tr
    if correct:
        order = [f for f in ("print", "if", "mul", "sub", "add") if f in feats]
        return [(_CODE_SKILLS[f], ["code", f]) for f in order] + [(_CODE_SKILLS["trace"], ["code", "trace"])]
    from selfdistill.methods.critique.critic import exact_critique

    out: list[tuple[str, list[str]]] = []
    crit = exact_critique(item, completion, chain=True)
    for c in crit.wrong if crit else []:
        if c.kind == "answer":
            key = "format" if c.original is None else "print"
            out.append((_CODE_MISTAKES[key], ["code", "print" if key == "print" else "answer"]))
            continue
        if c.original is None or c.corrected is None:
            continue
        m, e = toy.CODE_STEP_RE.match(c.original), toy.CODE_STEP_RE.match(c.corrected)
        if m and e:
            if m.group(1) is not None or e.group(1) is not None:
                out.append((_CODE_MISTAKES["if"], ["code", "if"]))
            elif m.group(4) != e.group(4):
                out.append((_CODE_MISTAKES["value"], ["code", "trace"]))
            else:
                op = {"+": "add", "-": "sub", "*": "mul"}[m.group(5)]
                out.append((_CODE_MISTAKES[op], ["code", op]))
        elif "skip" in c.original or "skip" in (c.corrected or ""):
            out.append((_CODE_MISTAKES["if"], ["code", "if"]))
        else:
            out.append((_CODE_MISTAKES["value"], ["code", "trace"]))
    return out


def _mcqa_rules(item: Item, completion: str, correct: bool) -> list[tuple[str, list[str]]]:
    feats = toy.problem_features(item)
    kind = "largest" if "largest" in feats else "equals"
    if correct:
        return [(_MCQA_SKILLS[kind], ["mcqa", kind]), (_MCQA_SKILLS["answer"], ["mcqa", "answer"])]
    out: list[tuple[str, list[str]]] = []
    if extract_after_marker(completion) is None:
        out.append((_MCQA_MISTAKES["format"], ["mcqa", "answer"]))
    if kind == "largest":
        out.append((_MCQA_MISTAKES["largest"], ["mcqa", "largest"]))
        return out
    work = next((toy.parse_step(ln) for ln in completion.split("\n") if toy.parse_step(ln)), None)
    if work is not None and work[3] != toy.apply(*work[:3]):
        out.append((_MCQA_MISTAKES["arith"], ["mcqa", "equals", *toy.step_features(*work[:3])]))
    else:
        out.append((_MCQA_MISTAKES["letter"], ["mcqa", "equals"]))
    return out


class RuleExtractor:
    """Deterministic skills and mistakes for toy items (generic sentences for anything else)."""

    def __init__(self, max_per_trajectory: int = 3) -> None:
        self.k = max_per_trajectory

    def one(self, t: Trajectory) -> list[Candidate]:
        kind: Kind = "skill" if t.correct else "mistake"
        rules = {"math": _math_rules, "code": _code_rules, "mcqa": _mcqa_rules}.get(t.item.domain)
        found = rules(t.item, t.completion, t.correct) if rules and toy.is_toy(t.item) else []
        if not found:
            found = [(_GENERIC[kind], [t.item.domain])]
        out, seen = [], set()
        for text, keys in found:
            if text not in seen:
                seen.add(text)
                out.append(Candidate(text, kind, t.item.domain, keys))
        return out[: self.k]

    def __call__(self, trajectories: Sequence[Trajectory]) -> list[list[Candidate]]:
        return [self.one(t) for t in trajectories]


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(.*\S)\s*$")


def parse_bullets(text: str, k: int) -> list[str]:
    """Up to ``k`` bullet lines ("- x", "* x", "1. x") of a model's answer, 8-200 characters each."""
    out = []
    for line in text.splitlines():
        m = _BULLET.match(line)
        if m and 8 <= len(m.group(1)) <= 200 and m.group(1) not in out:
            out.append(m.group(1))
        if len(out) >= k:
            break
    return out


class ModelExtractor:
    """Skills and mistakes written by a local model through ``template`` (greedy decoding)."""

    def __init__(self, model, tokenizer, template: str, max_per_trajectory: int = 3, max_new_tokens: int = 128,
                 system: str | None = None, batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.k, self.max_new_tokens, self.system, self.batch_size = (max_per_trajectory, max_new_tokens, system,
                                                                     batch_size)

    def prompt(self, t: Trajectory) -> str:
        what = "general skills that made it succeed" if t.correct else "common mistakes it made, phrased as things to avoid"
        return fill_template(self.template, "sgsd.extract_template", problem=t.item.prompt,
                             attempt=t.completion, outcome="correct" if t.correct else "incorrect", n=self.k,
                             what=what)

    def __call__(self, trajectories: Sequence[Trajectory]) -> list[list[Candidate]]:
        from selfdistill.models import unwrap
        from selfdistill.rollout import SamplingConfig, generate
        from selfdistill.sequences import chat_prompt

        if not trajectories:
            return []
        prompts = [chat_prompt(self.tokenizer, self.prompt(t), self.system) for t in trajectories]
        cfg = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                             batch_size=self.batch_size)
        texts = generate(unwrap(self.model), self.tokenizer, prompts, cfg).texts
        return [[Candidate(s, "skill" if t.correct else "mistake", t.item.domain, [t.item.domain])
                 for s in parse_bullets(text, self.k)] for t, text in zip(trajectories, texts)]


class AutoExtractor:
    """Rule extractor for toy items, model extractor (made on first use) for the rest."""

    def __init__(self, rule: RuleExtractor, make_model: Callable[[], Extractor] | None) -> None:
        self.rule, self.make_model, self.model = rule, make_model, None

    def __call__(self, trajectories: Sequence[Trajectory]) -> list[list[Candidate]]:
        out: list[list[Candidate]] = [[] for _ in trajectories]
        other = [i for i, t in enumerate(trajectories) if not toy.is_toy(t.item)]
        if other and self.make_model is not None:
            self.model = self.model or self.make_model()
            for i, cands in zip(other, self.model([trajectories[i] for i in other])):
                out[i] = cands
        for i, t in enumerate(trajectories):
            if toy.is_toy(t.item) or self.make_model is None:
                out[i] = self.rule.one(t)
        return out


# ---------------------------------------------------------------- building
def candidates_from(extractor: Extractor, trajectories: Sequence[Trajectory]) -> list[Candidate]:
    return [c for cands in extractor(trajectories) for c in cands]


def sample_trajectories(model, tokenizer, items: Sequence[Item], samples: int, sampling, *,
                        system: str | None = None) -> list[Trajectory]:
    """``samples`` completions of each item from ``model``, verified."""
    from selfdistill.models import unwrap
    from selfdistill.rollout import generate
    from selfdistill.sequences import chat_prompt
    from selfdistill.tasks.verify import verify_item

    prompts = [chat_prompt(tokenizer, it.prompt, system) for it in items for _ in range(samples)]
    texts = generate(unwrap(model), tokenizer, prompts, sampling, desc="skill bank rollouts").texts
    its = [it for it in items for _ in range(samples)]
    return [Trajectory(it, t, bool(verify_item(it, t))) for it, t in zip(its, texts)]


def build_skill_bank(model, tokenizer, items: Sequence[Item], cfg, sampling, extractor: Extractor, *,
                     seed: int = 0, similarity: Similarity | None = None, system: str | None = None,
                     log: Callable[[str], None] | None = None) -> SkillBank:
    """Sample ``cfg.bank_prompts`` items x ``cfg.bank_samples`` trajectories, extract, merge (see module doc).

    ``cfg`` is an :class:`~selfdistill.method_configs.SGSDConfig`; ``sampling`` a
    :class:`~selfdistill.rollout.SamplingConfig`.
    """
    import torch

    chosen = random.Random(seed).sample(list(items), k=min(cfg.bank_prompts, len(items)))
    torch.manual_seed(seed)
    trajs = sample_trajectories(model, tokenizer, chosen, cfg.bank_samples, sampling, system=system)
    bank = SkillBank()
    bank.add(candidates_from(extractor, trajs), similarity=similarity, threshold=cfg.similarity_threshold,
             capacity=cfg.capacity)
    if log is not None:
        acc = sum(t.correct for t in trajs) / max(1, len(trajs))
        log(f"sgsd: skill bank from {len(trajs)} trajectories ({acc:.0%} correct): {len(bank.skills)} skills, "
            f"{len(bank.mistakes)} mistakes")
    return bank


# ---------------------------------------------------------------- retrieval
@dataclass
class TeacherSpec:
    """One teacher of the pool: a (skill, mistake) pair, its mean retrieval score and weight."""

    skill: Entry | None
    mistake: Entry | None
    score: float
    weight: float

    def guidance(self, form: str = "sentences") -> str:
        """The teacher's guidance text: sentences, or (``form="tags"``) the toy world's ``skill: X`` lines."""
        if form == "tags":
            tags = [e.tag() for e in (self.skill, self.mistake) if e is not None]
            return "\n".join(f"skill: {t}" for t in dict.fromkeys(t for t in tags if t))
        lines = []
        if self.skill is not None:
            lines.append(f"Useful skill: {self.skill.text}")
        if self.mistake is not None:
            lines.append(f"Common mistake to avoid: {self.mistake.text}")
        return "\n".join(lines)


def query_text(item: Item) -> str:
    """What retrieval compares entries with: the problem and (toy items) the features solving it takes."""
    return " ".join([item.prompt, *toy.problem_features(item)])


def retrieve(bank: SkillBank, item: Item, kind: Kind, k: int, similarity: Similarity) -> list[tuple[Entry, float]]:
    """The top-``k`` entries of ``kind`` for ``item`` with their scores (ties: bank order).

    Entries of the item's domain are preferred: other domains' entries are
    candidates only when the bank has none for this domain.
    """
    pool = bank.entries(kind)
    same = [e for e in pool if e.domain in (item.domain, "")]
    pool = same or pool
    if not pool:
        return []
    scores = similarity([query_text(item)], [e.document() for e in pool])[0]
    order = sorted(range(len(pool)), key=lambda i: (-scores[i], i))[:k]
    return [(pool[i], float(scores[i])) for i in order]


def teacher_pool(bank: SkillBank, item: Item, k: int, similarity: Similarity,
                 temperature: float = 1.0) -> list[TeacherSpec]:
    """Up to ``k`` teachers: the i-th retrieved skill with the i-th retrieved mistake (either may be missing
    when one list is shorter); weights = softmax(mean retrieval score / temperature)."""
    skills = retrieve(bank, item, "skill", k, similarity)
    mistakes = retrieve(bank, item, "mistake", k, similarity)
    n = max(len(skills), len(mistakes))
    specs = []
    for i in range(n):
        s = skills[i] if i < len(skills) else None
        m = mistakes[i] if i < len(mistakes) else None
        scores = [x[1] for x in (s, m) if x is not None]
        specs.append(TeacherSpec(s[0] if s else None, m[0] if m else None, sum(scores) / len(scores), 0.0))
    if specs:
        top = max(t.score for t in specs)
        ex = [math.exp((t.score - top) / temperature) for t in specs]
        for t, e in zip(specs, ex):
            t.weight = e / sum(ex)
    return specs
