"""Every method's settings section (``ssd``, ``spd``, ``onpolicy``, ``opsd``, ...).

Kept apart from the methods so that the config tree imports no training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SSDConfig:
    """SSD, simple self-distillation (arXiv 2604.01193): SFT on the model's own raw samples."""

    rounds: int = field(default=1, metadata={
        "help": "Sample a fresh dataset from the current model this many times over the run (1 = once, from the base)."})
    samples_per_prompt: int = field(default=1, metadata={"help": "Completions sampled per prompt."})


@dataclass
class SPDConfig:
    """SPD, Self-Policy Distillation (arXiv 2605.22675): see docs/methods/spd.md."""

    selector: Literal["answer", "all"] = field(default="answer", metadata={
        "help": "Correctness-defining tokens: the final-answer span (by format) or all completion tokens (ablation)."})
    probe_size: int = field(default=96, metadata={"help": "Unlabeled train prompts sampled to build the subspace."})
    probe_samples: int = field(default=2, metadata={"help": "Completions per probe prompt."})
    rank: int = field(default=8, metadata={"help": "Subspace rank per site (0 = use energy)."})
    energy: float = field(default=0.0, metadata={"help": "If > 0: smallest rank keeping this share of gradient energy."})
    per_head: bool = field(default=False, metadata={"help": "One subspace per KV head instead of per layer."})
    center: bool = field(default=True, metadata={"help": "Project around the activations' mean (mu) instead of 0."})
    kinds: Literal["kv", "k", "v"] = field(default="kv", metadata={"help": "Project keys, values or both."})
    layers: str = field(default="all", metadata={"help": "'all', 'top:N' (by gradient energy), or a comma list of layer indices."})
    beta: float = field(default=0.5, metadata={"help": "Share of the complement kept: 0 = hard projection, 1 = no projection."})
    grad_positions: Literal["all", "completion"] = field(default="all", metadata={
        "help": "Positions whose K/V gradients are stacked."})
    subspace: Literal["gradient", "random"] = field(default="gradient", metadata={
        "help": "'random' = a random subspace of the same rank (ablation)."})
    rounds: int = field(default=1, metadata={"help": "Rounds; each recomputes the subspace and resamples."})
    samples_per_prompt: int = field(default=1, metadata={"help": "Completions sampled per training prompt."})
    subspace_path: str = field(default="", metadata={"help": "Load a saved subspace (safetensors) instead of extracting."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"spd.beta must be in [0, 1], got {self.beta}")
        if self.rank < 0:
            raise ValueError(f"spd.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.energy <= 1.0:
            raise ValueError(f"spd.energy must be in [0, 1], got {self.energy}")
        if self.rank == 0 and self.energy == 0.0:
            raise ValueError("spd.rank is 0 and spd.energy is 0: set one of them")


@dataclass
class OnPolicyConfig:
    """Settings shared by on-policy methods."""

    samples_per_prompt: int = field(default=1, metadata={"help": "Rollouts per prompt (a group)."})
    max_teacher_prompt_tokens: int = field(default=1024, metadata={
        "help": "Teacher prompts longer than this are an error (they would silently lose context)."})

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1:
            raise ValueError(f"onpolicy.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")


OPSD_TEMPLATE = ("{problem}\n\nHere is a reference solution:\n{solution}\n\n"
                 "After understanding the reference solution, reason in your own words to the same answer.")
SDFT_TEMPLATE = "{problem}\n\nExample of a good answer:\n{demonstration}\n\nNow answer in the same way."
SDPO_TEMPLATE = ("{problem}\n\nA correct attempt at this problem:\n{attempt}\n\n"
                 "Use it to answer correctly in your own words.")


@dataclass
class OPSDConfig:
    """OPSD (arXiv 2601.18734): teacher = problem + reference solution + instruction."""

    template: str = field(default=OPSD_TEMPLATE, metadata={"help": "Teacher prompt; {problem}, {solution}."})


@dataclass
class SDFTConfig:
    """SDFT (arXiv 2601.19897): teacher = problem + a demonstration."""

    template: str = field(default=SDFT_TEMPLATE, metadata={"help": "Teacher prompt; {problem}, {demonstration}."})
    demonstration: str = field(default="own", metadata={
        "help": "own: the item's reference solution; other: another train item's problem + solution (a "
                "worked example, not the answer)."})


@dataclass
class SDPOConfig:
    """SDPO (arXiv 2601.20802): teacher = problem + a successful rollout of the same group."""

    template: str = field(default=SDPO_TEMPLATE, metadata={"help": "Teacher prompt; {problem}, {attempt}."})
    reprompt_on_self_success: bool = field(default=False, metadata={
        "help": "Give a teacher signal to samples that are themselves correct (off: they get none)."})
