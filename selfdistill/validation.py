"""Checks a run makes before it writes anything (called by :func:`selfdistill.trainer.prepare_run`).

Each raises one :class:`ConfigError` line that names the file, row and field,
or the setting:

- :func:`check_solutions`: methods whose teacher or target is the reference
  solution (``requires_solution``) get one for every training item;
- :func:`check_models_and_prompts`: the student (and a separate
  ``teacher.path``) are causal LMs with one vocabulary, and every prompt fits
  the model's context with room for the completion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError
from selfdistill.tasks.base import Item, Task

#: Extra tokens allowed for merges across the chat template / prompt boundary
#: before a prompt's length is measured exactly through the template.
_MARGIN = 16


def check_solutions(cfg: TrainConfig, tasks: Sequence[Task]) -> None:
    """Every train item has a reference solution (the method needs it)."""
    for spec, task in zip(cfg.data.tasks, tasks):
        missing = next((it for it in task.items("train") if not (it.solution or "").strip()), None)
        if missing is None:
            continue
        need = f"method {cfg.method} needs a reference solution in every train row"
        files = getattr(task, "files", None) or {}
        if "train" in files:  # a JSONL task: re-read with the solution required, for file/row/field
            from selfdistill.tasks.loaders import TaskDataError, load_jsonl

            options = {**getattr(task, "_options", {}), "require_solution": True}
            try:
                load_jsonl(files["train"], **options)
            except TaskDataError as e:
                raise ConfigError(f"{e}; {need}") from None
        raise ConfigError(f"data.tasks {spec!r}: train item {missing.id!r}, field 'solution': missing; {need}")


def _context_length(model_cfg: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(model_cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    text = getattr(model_cfg, "get_text_config", None)
    if text is not None and text() is not model_cfg:
        return _context_length(text())
    return None


def _vocab_size(model_cfg: Any) -> int | None:
    v = getattr(model_cfg, "vocab_size", None)
    if v is None and hasattr(model_cfg, "get_text_config"):
        v = getattr(model_cfg.get_text_config(), "vocab_size", None)
    return v


def _longest_over(tok, items: Sequence[Item], system: str | None, limit: int) -> tuple[Item, int] | None:
    """The first item whose chat-formatted prompt has more than ``limit`` tokens.

    A token covers at least one byte, so prompts whose UTF-8 length plus the
    template's own length is well under the limit are skipped untokenised;
    the rest are tokenised in one batch, and those near the limit go through
    the template exactly.
    """
    from selfdistill.sequences import chat_prompt, encode_prompts

    if not items:
        return None
    overhead = len(encode_prompts(tok, [chat_prompt(tok, "", system)])[0])
    items = [it for it in items if overhead + len(it.prompt.encode("utf-8")) + 1 > limit - _MARGIN]
    if not items:
        return None
    raw = tok([it.prompt for it in items], add_special_tokens=False)["input_ids"]
    for it, ids in zip(items, raw):
        if overhead + len(ids) > limit - _MARGIN:
            n = len(encode_prompts(tok, [chat_prompt(tok, it.prompt, system)])[0])
            if n > limit:
                return it, n
    return None


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def _check_weights(path: str, setting: str) -> None:
    """A local model folder holds weights (a hub id is left to the download)."""
    p = Path(path)
    if p.is_dir() and not any(next(p.glob(g), None) for g in _WEIGHTS):
        raise ConfigError(f"{setting} {path}: no weights there (model.safetensors, pytorch_model.bin or a "
                          "sharded index); expected a Hugging Face model folder")


def _where(spec: str, task: Task, split: str, item: Item) -> str:
    files = getattr(task, "files", None) or {}
    if split in files:
        return f"{files[split]}, item {item.id!r}, field 'prompt'"
    return f"data.tasks {spec!r}, {split} item {item.id!r}, field 'prompt'"


def check_models_and_prompts(cfg: TrainConfig, method_cls: type, tasks: Sequence[Task]) -> None:
    """Student and teacher models are loadable causal LMs with one vocabulary; prompts fit the context."""
    from selfdistill.models import check_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model.path)
    trust = cfg.model.trust_remote_code
    model_cfg = check_causal_lm(path, trust)
    _check_weights(path, "model.path")
    tok = None

    if cfg.teacher.path:
        from selfdistill.methods.base import REGISTRY
        from selfdistill.methods.onpolicy import OnPolicyMethod

        if not issubclass(method_cls, OnPolicyMethod):
            users = ", ".join(sorted(n for n, c in REGISTRY.items() if issubclass(c, OnPolicyMethod)))
            raise ConfigError(f"teacher.path is set but method {cfg.method} has no teacher model "
                              f"(teacher.path is for the on-policy methods: {users})")
        tpath = resolve_model_path(cfg.teacher.path)
        teacher_cfg = check_causal_lm(tpath, trust, setting="teacher.path")
        _check_weights(tpath, "teacher.path")
        sv, tv = _vocab_size(model_cfg), _vocab_size(teacher_cfg)
        if sv != tv:
            raise ConfigError(f"teacher.path {cfg.teacher.path} has a vocabulary of {tv} tokens but the student "
                              f"(model.path {cfg.model.path}) has {sv}; a separate teacher must share the "
                              "student's tokenizer")
        tok = load_tokenizer(path, trust)
        try:
            teacher_tok = load_tokenizer(tpath, trust)
        except Exception:  # a weights-only folder: the vocabulary size check above is what we can do
            teacher_tok = None
        if teacher_tok is not None and teacher_tok.get_vocab() != tok.get_vocab():
            raise ConfigError(f"teacher.path {cfg.teacher.path}: its tokenizer differs from the student's "
                              f"(model.path {cfg.model.path}) although both have {sv} tokens")

    ctx = _context_length(model_cfg)
    if ctx is None:
        return
    checks = [("train", cfg.rollout.max_new_tokens, "rollout.max_new_tokens", 0)]
    if cfg.eval_before or cfg.eval_after or cfg.eval.every:
        checks += [(s, cfg.eval.max_new_tokens, "eval.max_new_tokens", cfg.eval.max_items) for s in cfg.eval.splits]
    tok = tok or load_tokenizer(path, trust)
    system = cfg.model.system_prompt or None
    for split, new_tokens, setting, max_items in checks:
        limit = ctx - new_tokens
        if limit <= 0:
            raise ConfigError(f"{setting}={new_tokens} leaves no room for a prompt in the {ctx}-token context "
                              f"of model.path {cfg.model.path}")
        for spec, task in zip(cfg.data.tasks, tasks):
            items = task.items(split)
            over = _longest_over(tok, items[:max_items] if max_items else items, system, limit)
            if over is not None:
                item, n = over
                raise ConfigError(f"{_where(spec, task, split, item)}: the prompt has {n} tokens (chat template "
                                  f"included); model.path {cfg.model.path} has a {ctx}-token context and "
                                  f"{setting}={new_tokens} leaves {limit} for the prompt")
