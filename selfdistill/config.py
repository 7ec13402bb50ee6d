"""The run configuration: one typed tree, the same names in Python, YAML and flags.

``TrainConfig(spd=SPDConfig(rank=8))`` == ``spd: {rank: 8}`` == ``--spd.rank 8``.
Method sections (``ssd``, ``spd``, ...) are read only by their method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from selfdistill.evaluate import EvalConfig
from selfdistill.method_configs import (OnPolicyConfig, OPSDConfig, SDFTConfig, SDPOConfig, SPDConfig,
                                        SSDConfig)
from selfdistill.method_configs import CCOPDConfig, OPCoDConfig
from selfdistill.method_configs import CritiqueConfig, GRPOConfig, SafeSteerConfig, SGSDConfig
from selfdistill.method_configs import DiffuGRPOConfig, DOPSDConfig
from selfdistill.objectives.config import DivergenceConfig
from selfdistill.rollout import SamplingConfig

#: ``report_to`` destinations.
REPORTERS = ("tensorboard", "wandb")


@dataclass
class TeacherConfig:
    """Which weights the teacher uses."""

    kind: Literal["initial", "live", "ema"] = field(default="initial", metadata={
        "help": "initial: the starting model (LoRA disabled, or a frozen copy); live: the current student; "
                "ema: a moving average of the student."})
    ema_rate: float = field(default=0.05, metadata={"help": "EMA: teacher <- (1-rate) teacher + rate student."})
    ema_every: int = field(default=1, metadata={"help": "EMA: update every N optimizer steps."})
    path: str = field(default="", metadata={
        "help": "On-policy methods: a separate frozen teacher model (folder or hub id) with the student's "
                "vocabulary; empty = the student's own weights (kind)."})

    def __post_init__(self) -> None:
        if self.path and self.kind != "initial":
            raise ValueError(f"teacher.path is set, so the teacher is a separate frozen model: teacher.kind must "
                             f"be initial, got {self.kind}")
        if not 0.0 < self.ema_rate <= 1.0:
            raise ValueError(f"teacher.ema_rate must be in (0, 1], got {self.ema_rate}")
        if self.ema_every < 1:
            raise ValueError(f"teacher.ema_every must be >= 1, got {self.ema_every}")


@dataclass
class LoraSettings:
    """LoRA through PEFT (off by default: the toy model is small enough to train fully)."""

    enabled: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: str = field(default="all-linear", metadata={"help": "Comma list of module names, or all-linear."})
    save_merged: bool = field(default=False, metadata={
        "help": "Also save the base with the adapter merged in, as a plain model, in the run's merged/ folder "
                "(model/ always holds the adapter; every --model.path accepts either)."})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    """The student model."""

    path: str = field(default="toy", metadata={"help": "HF model id or local folder; 'toy' = the embedded toy model."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Weights dtype when loading."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Pass trust_remote_code to transformers."})
    lora: LoraSettings = field(default_factory=LoraSettings)
    system_prompt: str = field(default="", metadata={"help": "Optional system message for every prompt."})


@dataclass
class DataConfig:
    """Where training and evaluation items come from."""

    tasks: list[str] = field(default_factory=lambda: ["toy-math", "toy-code", "toy-mcqa"], metadata={
        "help": "Task specs: toy-math|toy-code|toy-mcqa, nl-math|nl-code|nl-mcqa, humaneval, jsonl:PATH[:domain], "
                "hf:NAME[:config], hf:FORMAT@FILE."})
    columns: list[str] = field(default_factory=list, metadata={
        "help": "jsonl: tasks: our field=the file's column, e.g. prompt=question,answer=label (fields: prompt, "
                "solution, answer, id, domain, meta). Rows need no answer unless something reads it."})
    seed: int = field(default=0, metadata={"help": "Seed of the toy world's items."})
    train_size: int = field(default=4000, metadata={"help": "Toy train items per domain."})
    test_size: int = field(default=100, metadata={"help": "Toy test items per split and domain."})

    def column_map(self) -> dict[str, str]:
        """``columns`` as {our field: the file's column}."""
        return {a.strip(): b.strip() for a, _, b in (p.partition("=") for p in self.columns)}

    def __post_init__(self) -> None:
        for pair in self.columns:
            ours, eq, theirs = pair.partition("=")
            if not eq or not ours.strip() or not theirs.strip():
                raise ValueError(f"data.columns: {pair!r} is not field=column (e.g. prompt=question)")
        for name, least in (("seed", 0), ("train_size", 1), ("test_size", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"data.{name} must be >= {least}, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine or constant."""

    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=5, metadata={"help": "Linear warm-up steps."})
    schedule: Literal["cosine", "constant", "linear"] = field(default="cosine", metadata={"help": "Decay after warm-up."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max global grad norm (0 = off)."})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas."})
    mask: str = field(default="", metadata={
        "help": "Train only the coordinates of this mask file (from `selfdistill analyze mask`); parameters it "
                "does not name are frozen. Empty = train everything."})

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "grad_clip", "warmup_steps"):
            value = getattr(self, name)
            if not math.isfinite(value):  # nan passes `< 0`; an infinite lr turns every weight into nan
                raise ValueError(f"optim.{name} must be a finite number, got {value}")
            if value < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {value}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class TrainConfig:
    """A whole run. Defaults are the toy-world run of ``selfdistill train``."""

    method: str = field(default="spd", metadata={"help": "Method name (see `selfdistill methods`)."})
    output_dir: str = field(default="", metadata={
        "help": "Folder for model, logs, plots, checkpoints (default: a new runs/<method>-<date>-<time>, with "
                "runs/latest pointing at it; with --resume true: runs/latest)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a finished or failed run in output_dir (its files are deleted once the new run's "
                "checks pass)."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, sampling and init."})
    steps: int = field(default=40, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per optimizer step (global)."})
    micro_batch_size: int = field(default=32, metadata={"help": "Sequences per forward/backward (grad accumulation)."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={"help": "accelerate mixed precision: no or bf16 (fp16 is refused: it needs loss scaling)."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0 = only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Most recent checkpoints kept."})
    resume: bool = field(default=False, metadata={
        "help": "Continue the run in output_dir from its latest checkpoint (from step 0 if it has none yet); its "
                "settings must match the saved run_config.yaml except steps, save_every, keep_checkpoints, "
                "eval.every and report_to."})
    resume_force: bool = field(default=False, metadata={
        "help": "With --resume true: continue even where the settings differ from the saved run's (the "
                "differences are logged as a warning)."})
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list, metadata={
        "help": "Also log to: tensorboard, wandb (comma list; each must be installed)."})
    max_bad_steps: int = field(default=5, metadata={"help": "Stop after this many non-finite steps in a row."})
    log_completions: int = field(default=-1, metadata={
        "help": "Write the sequences each step trained on to train_completions.jsonl: -1 = all (the main "
                "process's share), N = the first N per step, 0 = none."})
    eval_before: bool = field(default=True, metadata={"help": "Evaluate the model before training."})
    eval_after: bool = field(default=True, metadata={"help": "Evaluate the model after training."})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ssd: SSDConfig = field(default_factory=SSDConfig)
    spd: SPDConfig = field(default_factory=SPDConfig)
    distill: DivergenceConfig = field(default_factory=DivergenceConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    opsd: OPSDConfig = field(default_factory=OPSDConfig)
    sdft: SDFTConfig = field(default_factory=SDFTConfig)
    sdpo: SDPOConfig = field(default_factory=SDPOConfig)
    ccopd: CCOPDConfig = field(default_factory=CCOPDConfig)
    opcod: OPCoDConfig = field(default_factory=OPCoDConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sgsd: SGSDConfig = field(default_factory=SGSDConfig)
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)
    safesteer: SafeSteerConfig = field(default_factory=SafeSteerConfig)
    dopsd: DOPSDConfig = field(default_factory=DOPSDConfig)
    diffu_grpo: DiffuGRPOConfig = field(default_factory=DiffuGRPOConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            raise ValueError(f"report_to: {unknown[0]!r} is not one of {list(REPORTERS)}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume are both true: continue the run (resume) or replace it "
                             "(overwrite), not both")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("batch_size and micro_batch_size must be >= 1")
        # micro_batch_size > batch_size is allowed: no accumulation, one forward per process and step.
        for name in ("save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = {'only at the end' if name == 'save_every' else 'keep all'}), "
                                 f"got {getattr(self, name)}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.method == "grpo" and self.onpolicy.samples_per_prompt < 2:
            raise ValueError("method grpo compares samples within a group: set onpolicy.samples_per_prompt >= 2 "
                             f"(e.g. 4), got {self.onpolicy.samples_per_prompt}")
        if self.method == "sdpo" and self.onpolicy.samples_per_prompt < 2:
            raise ValueError("method sdpo's teacher quotes a successful sibling rollout of the same prompt, so with "
                             f"onpolicy.samples_per_prompt={self.onpolicy.samples_per_prompt} no sample ever gets a "
                             "teacher signal: set it >= 2 (e.g. 4)")
