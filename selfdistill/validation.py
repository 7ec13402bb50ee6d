"""Checks a run makes before it writes anything (called by :func:`selfdistill.trainer.prepare_run`).

Each raises one :class:`ConfigError` line that names the file, row and field,
or the setting:

- :func:`check_items`: every task has train items, and every evaluated split has items;
- :func:`check_solutions`: methods whose teacher or target is the reference
  solution (``requires_solution``) get one for every training item;
- :func:`check_models_and_prompts`: the student (and a separate
  ``teacher.path``) are causal LMs with one vocabulary, complete weights whose
  shapes match their config and a working tokenizer, and every prompt fits
  the model's context with room for the completion;
- :func:`check_environment`: what the settings ask of this machine is here
  (``report_to`` packages, vLLM; fp16 refused);
- :func:`check_sampler_ratio`: with vLLM rollouts, an importance ratio is taken at the sampler's temperature;
- :func:`check_templates`: the method's prompt templates name only the placeholders it fills;
- :func:`check_teacher_prompts` (called by on-policy methods): the longest teacher prompt fits
  ``onpolicy.max_teacher_prompt_tokens``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError
from selfdistill.tasks.base import Item, Task

#: Extra tokens allowed for merges across the chat template / prompt boundary
#: before a prompt's length is measured exactly through the template.
_MARGIN = 16


def check_items(cfg: Any, tasks: Sequence[Task], train: bool = True, evaluated: bool = True) -> None:
    """Every task has train items (``train``) and items in every split of ``eval.splits`` (``evaluated``)."""
    for spec, task in zip(cfg.data.tasks, tasks):
        files = getattr(task, "files", None) or {}
        if train and not task.items("train"):
            where = f"{files['train']} has no rows" if "train" in files else "no train items"
            raise ConfigError(f"data.tasks {spec!r}: {where}; training needs at least one")
        for split in cfg.eval.splits if evaluated else ():
            if not task.items(split):
                where = f"{files[split]} has no rows" if split in files else f"split {split!r} has no items"
                raise ConfigError(f"data.tasks {spec!r}: {where}, so evaluation would measure nothing; "
                                  "add items or drop the split from --eval.splits")


def _check_field(cfg: TrainConfig, tasks: Sequence[Task], field: str, splits: Sequence[str], need: str) -> None:
    """Every item of ``splits`` has a non-empty ``field`` (``solution`` / ``answer``); else one line naming
    the file, row and field where the task is a JSONL file."""
    for spec, task in zip(cfg.data.tasks, tasks):
        for split in splits:
            missing = next((it for it in task.items(split) if not (getattr(it, field) or "").strip()), None)
            if missing is None:
                continue
            files = getattr(task, "files", None) or {}
            if split in files:  # a JSONL task: re-read with the field required, for file/row/field
                from selfdistill.tasks.loaders import TaskDataError, load_jsonl

                options = {**getattr(task, "_options", {}), f"require_{field}": True}
                try:
                    load_jsonl(files[split], **options)
                except TaskDataError as e:
                    raise ConfigError(f"{e}; {need}") from None
            raise ConfigError(f"data.tasks {spec!r}: {split} item {missing.id!r}, field {field!r}: missing; {need}")


def check_solutions(cfg: TrainConfig, tasks: Sequence[Task]) -> None:
    """Every train item has a reference solution (the method needs it)."""
    _check_field(cfg, tasks, "solution", ["train"],
                 f"method {cfg.method} needs a reference solution in every train row")


def check_answers(cfg: TrainConfig, method_cls: Any, tasks: Sequence[Task], evaluated: bool) -> None:
    """Answers where something reads them: every train item for a method that rewards rollouts with the
    verifier, every evaluated item when evaluation is on. Label-free runs (SPD, SSD, SFT, OPSD, ... with
    evaluation off) need none."""
    if getattr(method_cls, "needs_rewards", False):
        _check_field(cfg, tasks, "answer", ["train"],
                     f"method {cfg.method} rewards its rollouts with the verifier, which needs every train "
                     "row's answer")
    if evaluated:
        _check_field(cfg, tasks, "answer", list(cfg.eval.splits),
                     "evaluation checks completions against the answer; add answers or run without evaluation "
                     "(--eval_before false --eval_after false)")


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


def _longest_over(tok, items: Sequence[Item], system: str | None, limit: int,
                  texts: Sequence[str] | None = None) -> tuple[Item, int] | None:
    """The item whose chat-formatted prompt (or ``texts[i]`` for item i) is longest, if over ``limit`` tokens.

    A token covers at least one byte, so prompts whose UTF-8 length plus the
    template's own length is well under the limit are skipped untokenised;
    the rest are tokenised in one batch, and those near the limit go through
    the template exactly.
    """
    from selfdistill.sequences import chat_prompt, encode_prompts

    if not items:
        return None
    texts = [it.prompt for it in items] if texts is None else list(texts)
    overhead = len(encode_prompts(tok, [chat_prompt(tok, "", system)])[0])
    near = [(it, t) for it, t in zip(items, texts) if overhead + len(t.encode("utf-8")) + 1 > limit - _MARGIN]
    if not near:
        return None
    raw = tok([t for _, t in near], add_special_tokens=False)["input_ids"]
    longest_first = sorted(zip(near, raw), key=lambda pair: -len(pair[1]))
    for (it, text), ids in longest_first:
        if overhead + len(ids) <= limit - _MARGIN:
            break
        n = len(encode_prompts(tok, [chat_prompt(tok, text, system)])[0])
        if n > limit:
            return it, n
    return None


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def _safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (tensor names, shapes, offsets); ValueError if it is truncated or not one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: empty or truncated, not a safetensors file")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"truncated: its header needs {n} bytes, the file has {size - 8} after the length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("not a safetensors file (unreadable header)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: {size} bytes, its tensors need {8 + n + end}")
    return tensors


def _check_shapes(path: Path, shapes: dict[str, list[int]], model_cfg: Any, trust: bool, setting: str) -> None:
    """The weights' shapes are those the config builds (a model built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_cfg, trust_remote_code=trust)
    except Exception:  # an exotic architecture: loading will tell
        return
    for name, param in model.state_dict().items():
        want = list(param.shape)
        if name in shapes and shapes[name] != want:
            raise ConfigError(f"{setting} {path}: weight {name} has shape {shapes[name]} but config.json builds "
                              f"{want}; the config does not belong to these weights")


def _check_weights(path: str, setting: str, model_cfg: Any = None, trust: bool = False) -> None:
    """A local model folder holds complete weights, shaped as its config says (a hub id is left to the download)."""
    p = Path(path)
    if not p.is_dir():
        return
    if not any(next(p.glob(g), None) for g in _WEIGHTS):
        raise ConfigError(f"{setting} {path}: no weights there (model.safetensors, pytorch_model.bin or a "
                          "sharded index); expected a Hugging Face model folder")
    shapes: dict[str, list[int]] = {}
    for f in sorted(p.glob("*.safetensors")):
        try:
            shapes.update({k: list(v["shape"]) for k, v in _safetensors_header(f).items()})
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{setting} {path}: {f.name} is {e}") from None
    if shapes and model_cfg is not None:
        _check_shapes(p, shapes, model_cfg, trust, setting)


def check_tokenizer(path: str, trust: bool = False, setting: str = "model.path"):
    """The folder's tokenizer loads, encodes text, and can end a completion (pad or eos); returned."""
    from selfdistill.models import load_tokenizer

    tok = load_tokenizer(path, trust, setting=setting)
    if not tok("Hello world, 1 + 1 = 2", add_special_tokens=False)["input_ids"]:
        raise ConfigError(f"{setting} {path}: no working tokenizer there (it encodes text to no tokens; are "
                          "tokenizer.json / tokenizer_config.json missing?)")
    return tok


def _where(spec: str, task: Task, split: str, item: Item) -> str:
    files = getattr(task, "files", None) or {}
    if split in files:
        return f"{files[split]}, item {item.id!r}, field 'prompt'"
    return f"data.tasks {spec!r}, {split} item {item.id!r}, field 'prompt'"


def check_models_and_prompts(cfg: TrainConfig, method_cls: type, tasks: Sequence[Task]) -> None:
    """Student and teacher models are loadable causal LMs with one vocabulary; prompts fit the context."""
    from selfdistill.models import adapter_base, check_model_config, load_tokenizer, model_kind, resolve_model_path

    given = resolve_model_path(cfg.model.path)
    base = adapter_base(given)  # a LoRA adapter folder: its base is the model checked here
    path = resolve_model_path(base) if base is not None else given
    trust = cfg.model.trust_remote_code
    model_cfg = check_model_config(path, trust, "model.path" if base is None else f"model.path {cfg.model.path}: its base")
    kind = model_kind(model_cfg)
    if kind is not None and kind not in method_cls.model_kinds:
        from selfdistill.methods.base import REGISTRY

        fits = ", ".join(sorted(n for n, c in REGISTRY.items() if kind in c.model_kinds))
        what = {"causal": "an autoregressive (causal) LM", "masked": "a masked-diffusion LM"}[kind]
        raise ConfigError(f"model.path {cfg.model.path} is {what}; method {cfg.method} trains "
                          f"{' or '.join(method_cls.model_kinds)} models (methods for this model: {fits or 'none'})")
    _check_weights(path, "model.path", model_cfg, trust)
    tok = check_tokenizer(given if base is not None and (Path(given) / "tokenizer_config.json").is_file() else path,
                          trust)

    if cfg.teacher.path:
        from selfdistill.methods.base import REGISTRY
        from selfdistill.methods.onpolicy import OnPolicyMethod

        if not issubclass(method_cls, OnPolicyMethod):
            users = ", ".join(sorted(n for n, c in REGISTRY.items() if issubclass(c, OnPolicyMethod)))
            raise ConfigError(f"teacher.path is set but method {cfg.method} has no teacher model "
                              f"(teacher.path is for the on-policy methods: {users})")
        tpath = resolve_model_path(cfg.teacher.path)
        teacher_cfg = check_model_config(tpath, trust, setting="teacher.path")
        _check_weights(tpath, "teacher.path", teacher_cfg, trust)
        sv, tv = _vocab_size(model_cfg), _vocab_size(teacher_cfg)
        if sv != tv:
            raise ConfigError(f"teacher.path {cfg.teacher.path} has a vocabulary of {tv} tokens but the student "
                              f"(model.path {cfg.model.path}) has {sv}; a separate teacher must share the "
                              "student's tokenizer")
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


def check_environment(cfg: TrainConfig) -> None:
    """What the settings ask of this machine is here (``report_to`` packages, vLLM); fp16 is refused."""
    import importlib.util

    import torch

    for name in cfg.report_to:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"report_to {name}: {name} is not installed (pip install {name}); install it or "
                              "drop it from --report_to")
    if cfg.mixed_precision == "fp16":
        # fp16 gradients underflow without loss scaling, and a scaler's skipped steps would have to agree with
        # the trainer's own finite check and all-reduce on every process: refused rather than half done.
        raise ConfigError("mixed_precision fp16 is not supported: its gradients need loss scaling, which "
                          "selfdistill's trainer does not do; use --mixed_precision bf16 (GPUs since Ampere, and "
                          "CPUs) or no")
    if cfg.optim.mask:
        from selfdistill.analysis.masks import load

        load(cfg.optim.mask)  # a missing or malformed file fails here, before anything is loaded
        if cfg.model.lora.enabled:
            raise ConfigError("optim.mask restricts the base model's weights, and LoRA trains an adapter instead; "
                              "drop --model.lora.enabled or --optim.mask")
    if cfg.rollout.backend == "vllm":
        from selfdistill import vllm_backend

        reason = vllm_backend.unavailable_reason()
        if reason:
            raise ConfigError(f"rollout.backend vllm: {reason}; use --rollout.backend hf")


def check_distributed(cfg: TrainConfig, method_cls: Any, env: Any = None) -> None:
    """The launcher's distributed setup (``accelerate launch --config_file``'s environment) is one the trainer
    honours: DeepSpeed is refused (one line saying whether deepspeed is installed), and so are FSDP1 and what
    FSDP2 does not support yet."""
    import importlib.util
    import os

    from selfdistill.distributed import requested

    env = os.environ if env is None else env
    kind = requested(env)
    if kind == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("accelerate config: distributed_type DEEPSPEED needs the deepspeed package, which is "
                              "not installed (pip install deepspeed); or launch with examples/accelerate/fsdp.yaml")
        raise ConfigError("accelerate config: distributed_type DEEPSPEED is not supported by selfdistill's trainer "
                          "yet (ZeRO-2/3 have never been run with it); launch with examples/accelerate/fsdp.yaml")
    if kind != "fsdp":
        return
    where = "accelerate config (FSDP)"
    version = env.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ConfigError(f"{where}: fsdp_version {version} is not supported: the methods call the model's decoder, "
                          "LM head and K/V modules directly, which FSDP1 only gathers inside its own forward; set "
                          "fsdp_version: 2 (examples/accelerate/fsdp.yaml)")
    if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").strip().lower() == "true":
        raise ConfigError(f"{where}: fsdp_activation_checkpointing is not supported (it re-wraps the decoder layers "
                          "the methods call); set it to false")
    from selfdistill.methods.base import Method

    if getattr(method_cls, "trainees", Method.trainees) is not Method.trainees:
        raise ConfigError(f"{where}: method {cfg.method} trains a second model beside the student, and with FSDP "
                          "only the student is sharded so far; launch it without an FSDP config")
    unsupported = [(cfg.optim.mask, "--optim.mask (a mask of whole parameters; FSDP holds shards)"),
                   (cfg.model.lora.enabled, "--model.lora.enabled (never run with FSDP)"),
                   (cfg.rollout.backend == "vllm", "--rollout.backend vllm (never run with FSDP)")]
    for on, what in unsupported:
        if on:
            raise ConfigError(f"{where}: {what} is not supported with FSDP yet; drop it or launch without FSDP")


def check_sampler_ratio(cfg: TrainConfig, method_cls: Any) -> None:
    """With vLLM rollouts, an importance ratio compares the trained model's log-probs with the engine's, which
    are at the sampling temperature: the method's ratio must be taken at that temperature too."""
    ratio_temperature = getattr(method_cls, "ratio_temperature", None)
    t = ratio_temperature(cfg) if cfg.rollout.backend == "vllm" and ratio_temperature is not None else None
    sampler = cfg.rollout.logprob_temperature
    if t is not None and abs(t - sampler) > 1e-9:
        setting = "grpo.temperature" if cfg.method == "grpo" else "distill.temperature (with distill.is_clip)"
        raise ConfigError(f"rollout.backend vllm: the importance ratio takes the student's log-probs at {setting} "
                          f"{t} and the sampler's at rollout.temperature {cfg.rollout.temperature} (1 when greedy); "
                          "set them equal")


#: The prompt templates of each settings section, with the placeholders its method fills them with.
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "opsd": {"template": ("problem", "solution")},
    "sdft": {"template": ("problem", "demonstration")},
    "sdpo": {"template": ("problem", "attempt")},
    "sgsd": {"template": ("problem", "guidance"), "extract_template": ("problem", "attempt", "outcome", "n", "what")},
    "critique": {"critic_template": ("problem", "answer", "attempt"),
                 "reward_template": ("problem", "attempt", "verdict"),
                 "reference_template": ("problem", "solution"),
                 "step_template": ("problem", "attempt", "critique")},
    "opcod": {"template": ("problem", "context"), "feedback_template": ("quantities", "solution")},
}


def check_template(setting: str, template: str, placeholders: Sequence[str]) -> None:
    """``template`` can be filled with ``placeholders`` (found now, not at the first step that uses it)."""
    known = ", ".join("{" + p + "}" for p in placeholders)
    try:
        template.format(**dict.fromkeys(placeholders, ""))
    except KeyError as e:
        raise ConfigError(f"{setting}: unknown placeholder {{{e.args[0]}}}; known: {known} (write a literal "
                          "brace as {{ or }})") from None
    except (IndexError, ValueError, AttributeError) as e:
        raise ConfigError(f"{setting}: cannot be filled ({e}); placeholders are {known}, a literal brace is "
                          "{{ or }}") from None


def check_templates(cfg: TrainConfig, sections: Iterable[str]) -> None:
    """Every template of the method's settings sections."""
    for section in sections:
        for name, placeholders in TEMPLATES.get(section, {}).items():
            check_template(f"{section}.{name}", getattr(getattr(cfg, section), name), placeholders)


def check_teacher_prompts(cfg: TrainConfig, items: Sequence[Item], users: Sequence[str], note: str = "") -> None:
    """The longest teacher prompt (``users[i]`` for train item i, chat template included) fits
    ``onpolicy.max_teacher_prompt_tokens``; ``note`` says what the prompts leave out (e.g. the rollout)."""
    from selfdistill.models import resolve_model_path

    limit = cfg.onpolicy.max_teacher_prompt_tokens
    tok = check_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
    over = _longest_over(tok, items, cfg.model.system_prompt or None, limit, texts=users)
    if over is not None:
        item, n = over
        raise ConfigError(f"onpolicy.max_teacher_prompt_tokens={limit}: the teacher prompt of train item "
                          f"{item.id!r} has {n} tokens (chat template included{note}); raise it to at least {n} "
                          "or shorten the template")


def check_skill_bank(path: str) -> None:
    """``sgsd.bank_path`` is a skill bank file (JSON written by ``selfdistill sgsd skills``)."""
    from selfdistill.methods.sgsd.skills import SkillBank

    try:
        SkillBank.load(path)
    except UnicodeDecodeError:
        raise ConfigError(f"sgsd.bank_path {path}: not UTF-8 text, so not a skill bank (JSON)") from None
    except (FileNotFoundError, ValueError) as e:  # their messages name sgsd.bank_path
        raise ConfigError(str(e)) from None
    except (KeyError, TypeError, AttributeError, OSError) as e:
        raise ConfigError(f"sgsd.bank_path {path}: not a skill bank ({type(e).__name__}: {e}); build one with "
                          "`selfdistill sgsd skills --out FILE`") from None
