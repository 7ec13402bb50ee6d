"""Every method's settings section (``ssd``, ``spd``, ``onpolicy``, ``opsd``, ...).

Kept apart from the methods so that the config tree imports no training code.
"""

from __future__ import annotations

import math
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

    selector: Literal["answer", "vote", "all", "style"] = field(default="answer", metadata={
        "help": "Correctness-defining tokens: the final-answer span (by format); vote: that span only where the "
                "answer is the majority of its prompt's probe samples (>= 2 agreeing; label-free); all: every "
                "completion token (ablation); style: the toy world's style lines (diagnostics)."})
    probe_size: int = field(default=96, metadata={"help": "Unlabeled train prompts sampled to build the subspace."})
    probe_samples: int = field(default=2, metadata={"help": "Completions per probe prompt."})
    rank: int = field(default=8, metadata={"help": "Subspace rank per site (0 = use energy)."})
    energy: float = field(default=0.0, metadata={"help": "If > 0: smallest rank keeping this share of gradient energy."})
    per_head: bool = field(default=False, metadata={"help": "One subspace per KV head instead of per layer."})
    center: bool = field(default=True, metadata={"help": "Project around the activations' mean (mu) instead of 0."})
    kinds: Literal["kv", "k", "v"] = field(default="kv", metadata={"help": "Project keys, values or both."})
    key_site: Literal["auto", "proj"] = field(default="auto", metadata={
        "help": "Where keys are read and projected: auto = after the key norm where the architecture has one "
                "(Qwen3, Gemma 3, OLMo 2: what attention compares); proj = the raw k_proj output (v1, ablation)."})
    layers: str = field(default="all", metadata={"help": "'all', 'top:N' (by gradient energy), or a comma list of layer indices."})
    fold: bool = field(default=True, metadata={
        "help": "While sampling, fold the projection into the K/V projection weights (no per-call cost; "
                "restored bit for bit after); false = forward hooks. LoRA-wrapped or Conv1D projections "
                "always use hooks."})
    beta: float = field(default=0.9, metadata={"help": "Share of the complement kept: 0 = hard projection, 1 = no projection (0.9: chosen on the toy valid split, see docs/methods/spd.md)."})
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
        if self.selector == "vote" and self.probe_samples < 2:
            raise ValueError(f"spd.selector vote needs spd.probe_samples >= 2 (a majority of one is no vote), "
                             f"got {self.probe_samples}")


@dataclass
class OnPolicyConfig:
    """Settings shared by on-policy methods."""

    samples_per_prompt: int = field(default=1, metadata={"help": "Rollouts per prompt (a group)."})
    max_teacher_prompt_tokens: int = field(default=1024, metadata={
        "help": "Teacher prompts longer than this are an error (they would silently lose context)."})

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1:
            raise ValueError(f"onpolicy.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")


# Default teacher templates: the toy world's held-out paraphrases (selfdistill/toy/templates.py HELD_OUT),
# never seen in its pretraining, so a toy teacher must read the context rather than recognise a template;
# plain English, so they serve real models as they are.
OPSD_TEMPLATE = ("{problem}\n\nHere is a reference solution:\n{solution}\n\n"
                 "Use it to solve the problem in your own words.")
SDFT_TEMPLATE = "{problem}\n\nAn example of a good answer:\n{demonstration}\n\nWrite your answer in the same way."
SDPO_TEMPLATE = ("{problem}\n\nHere is a correct attempt:\n{attempt}\n\n"
                 "Use it to solve the problem in your own words.")


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


@dataclass
class CCOPDConfig:
    """CCOPD, canonical-context on-policy distillation (arXiv 2605.30251): see docs/methods/ccopd_opcod.md."""

    sharder: Literal["auto", "toy", "file", "sentences"] = field(default="auto", metadata={
        "help": "Where a problem's shards come from. auto: the item's meta['shards'], else ccopd.shards_file, else "
                "the toy rules for toy items, else an error; toy / file: only those; sentences: split the prompt "
                "at lines and sentence ends (first piece = the goal)."})
    shards_file: str = field(default="", metadata={
        "help": "JSONL of {\"id\" or \"prompt\", \"shards\": [str, ...]} rows (`selfdistill ccopd shard` writes one "
                "by prompting a local model)."})
    code_lines_per_shard: int = field(default=2, metadata={
        "help": "Toy code: program statements revealed per turn (an if and its body count as one)."})
    mcqa_options_per_shard: int = field(default=2, metadata={"help": "Toy mcqa: options revealed per turn."})
    max_shards: int = field(default=4, metadata={"help": "sentences sharder: at most this many shards."})
    turn_max_new_tokens: int = field(default=32, metadata={
        "help": "Longest intermediate assistant reply (the final turn uses rollout.max_new_tokens)."})
    turns: Literal["final", "all"] = field(default="final", metadata={
        "help": "Assistant turns the divergence is taken on: the final one, or every one."})
    intermediate_teacher: Literal["revealed", "full"] = field(default="revealed", metadata={
        "help": "turns=all: the teacher of an intermediate turn sees the shards revealed so far as one clean "
                "user turn (revealed) or the full prompt (full)."})
    concat_join: Literal["newline", "space"] = field(default="newline", metadata={
        "help": "How shards are joined into one user turn (CONCAT setting and the 'revealed' teacher)."})

    def __post_init__(self) -> None:
        for name in ("code_lines_per_shard", "mcqa_options_per_shard", "turn_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ccopd.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_shards < 2:
            raise ValueError(f"ccopd.max_shards must be >= 2, got {self.max_shards}")
        if self.sharder == "file" and not self.shards_file:
            raise ValueError("ccopd.sharder is 'file' but ccopd.shards_file is empty")


OPCOD_TEMPLATE = "{problem}\n\n{context}Use this to answer correctly in your own words."
OPCOD_FEEDBACK_TEMPLATE = "{quantities}A peer's worked solution:\n{solution}"


@dataclass
class OPCoDConfig:
    """OPCoD, on-policy co-distillation (arXiv 2606.14368): see docs/methods/ccopd_opcod.md."""

    peer: str = field(default="", metadata={
        "help": "The second model (folder or hub id, same tokenizer as model.path); both models train."})
    update_peer: bool = field(default=True, metadata={
        "help": "Train the peer too (co-distillation); false = one-way distillation into model.path."})
    gate: Literal["verified", "confidence", "both", "always", "never"] = field(default="verified", metadata={
        "help": "Cognizance gate, per problem: give the peer's feedback when the peer's verified success rate "
                "reaches opcod.min_peer_success (verified), when its answer confidence reaches "
                "opcod.confidence_threshold (confidence), both, always, or never (self-distillation only)."})
    min_peer_success: float = field(default=0.5, metadata={
        "help": "verified gate: share of the peer's rollouts on the problem that must verify."})
    confidence_threshold: float = field(default=-0.5, metadata={
        "help": "confidence gate: mean token log-prob of the peer's final-answer tokens (its own model) needed."})
    gate_relative: bool = field(default=False, metadata={
        "help": "Also require the peer's success rate on the problem to exceed the student's."})
    anchor: bool = field(default=True, metadata={
        "help": "Feedback anchoring: restate the problem's quantities, keep the peer's solution up to its answer "
                "line, and drop feedback that has no answer line or mentions none of the problem's numbers."})
    own_attempt: Literal["other", "none"] = field(default="other", metadata={
        "help": "other: the teacher also sees another verified rollout of the student's own group (never the "
                "sample's own); none: peer feedback only."})
    template: str = field(default=OPCOD_TEMPLATE, metadata={"help": "Teacher prompt; {problem}, {context}."})
    feedback_template: str = field(default=OPCOD_FEEDBACK_TEMPLATE, metadata={
        "help": "Peer feedback; {quantities} (empty without anchoring), {solution}."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_peer_success <= 1.0:
            raise ValueError(f"opcod.min_peer_success must be in [0, 1], got {self.min_peer_success}")
        if self.confidence_threshold > 0:
            raise ValueError(f"opcod.confidence_threshold is a mean log-prob (<= 0), got {self.confidence_threshold}")


@dataclass
class GRPOConfig:
    """GRPO baseline (arXiv 2402.03300): group-normalised verifier rewards, clipped-ratio policy gradient.

    Groups are ``onpolicy.samples_per_prompt`` rollouts of one prompt (at least 2).
    """

    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip: ratio kept in [1 - clip_eps, 1 + clip_eps_high]."})
    clip_eps_high: float | None = field(default=None, metadata={
        "help": "Upper clip (DAPO's clip-higher); None = clip_eps."})
    kl_coef: float = field(default=0.0, metadata={
        "help": "Weight of the per-token k3 KL to the initial model (0 = off, no reference model kept)."})
    scale_rewards: bool = field(default=True, metadata={
        "help": "Divide centred rewards by the group's std (false: Dr. GRPO, centring only)."})
    adv_eps: float = field(default=1e-4, metadata={"help": "eps in (r - mean) / (std + eps)."})
    temperature: float | None = field(default=None, metadata={
        "help": "Temperature of the log-probs in the ratio and the KL term. Unset (the default): "
                "rollout.temperature (1 when sampling is greedy), the distribution the rollouts were drawn "
                "from. Before issue #18 the default was 1 (the model's own distribution): pass 1.0 for that."})

    def __post_init__(self) -> None:
        if self.clip_eps < 0 or (self.clip_eps_high is not None and self.clip_eps_high < 0):
            raise ValueError(f"grpo.clip_eps and grpo.clip_eps_high must be >= 0, got {self.clip_eps}, "
                             f"{self.clip_eps_high}")
        if self.kl_coef < 0:
            raise ValueError(f"grpo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"grpo.temperature must be > 0 (or unset), got {self.temperature}")


SGSD_TEMPLATE = "{problem}\n\nUse these skills:\n{guidance}"
SGSD_EXTRACT_TEMPLATE = (
    "Problem:\n{problem}\n\nAn attempt:\n{attempt}\n\nThe attempt is {outcome}. List at most {n} {what}, "
    "each a short general sentence that would help on similar problems, one per line starting with '- '.")


@dataclass
class SGSDConfig:
    """SGSD (arXiv 2605.28791): skill-bank teachers, gated bounded token loss. See docs/methods/sgsd_critique.md."""

    bank_path: str = field(default="", metadata={
        "help": "Load a saved skill bank (JSON from `selfdistill sgsd skills`) instead of building one."})
    bank_prompts: int = field(default=64, metadata={"help": "Train prompts sampled to build the bank."})
    bank_samples: int = field(default=4, metadata={"help": "Trajectories per bank prompt."})
    max_per_trajectory: int = field(default=3, metadata={"help": "Skills or mistakes extracted per trajectory."})
    extractor: Literal["auto", "rule", "model"] = field(default="auto", metadata={
        "help": "rule: the deterministic toy-world extractor; model: prompt a local model; auto: rule for "
                "toy items, model for the rest."})
    extractor_model: str = field(default="", metadata={
        "help": "Model that writes skills and mistakes (folder or hub id); empty = the student."})
    extract_template: str = field(default=SGSD_EXTRACT_TEMPLATE, metadata={
        "help": "Extraction prompt; {problem}, {attempt}, {outcome}, {n}, {what}."})
    extract_max_new_tokens: int = field(default=128, metadata={"help": "Longest extraction answer."})
    similarity_threshold: float = field(default=0.8, metadata={
        "help": "Entries at least this similar (retrieval cosine) to one in the bank are merged into it."})
    capacity: int = field(default=30, metadata={
        "help": "Most skills and most mistakes kept (each); the least frequent are dropped."})
    update_every: int = field(default=25, metadata={
        "help": "Online update: extract from the step's rollouts every N steps (0 = off)."})
    update_max_new: int = field(default=5, metadata={"help": "Online update: most new entries added per update."})
    num_teachers: int = field(default=8, metadata={
        "help": "K: top-K skills and top-K mistakes retrieved per problem, i-th paired with i-th."})
    retriever: Literal["auto", "tfidf", "embedding"] = field(default="auto", metadata={
        "help": "embedding: sentence-transformers model; tfidf: deterministic lexical cosine; auto: embedding "
                "when sentence-transformers and the model are installed locally, else tfidf."})
    embedding_model: str = field(default="sentence-transformers/all-MiniLM-L6-v2", metadata={
        "help": "Sentence-embedding model of the embedding retriever."})
    weight_temperature: float = field(default=1.0, metadata={
        "help": "Teacher weights = softmax(mean retrieval score / this)."})
    template: str = field(default=SGSD_TEMPLATE, metadata={"help": "Teacher prompt; {guidance}, {problem}."})
    guidance: Literal["auto", "sentences", "tags"] = field(default="auto", metadata={
        "help": "How a teacher's (skill, mistake) pair is written: sentences; tags = the toy world's closed "
                "vocabulary ('skill: carry' lines, as its pretraining has them); auto = tags for toy items."})
    tau: float = field(default=1.0, metadata={"help": "tau of l = log 2 - softplus(-delta^2 / (2 tau))."})
    delta_clip: float = field(default=3.0, metadata={"help": "Support = mean clip(delta, -c, c)."})
    support_threshold: float = field(default=0.05, metadata={"help": "|support| at or below this: sign 0."})
    exclude_chars: str = field(default="#", metadata={
        "help": "Completion tokens made only of these characters (the answer marker) are left out of the loss, "
                "as are special tokens."})

    def __post_init__(self) -> None:
        for name in ("bank_prompts", "bank_samples", "max_per_trajectory", "capacity", "num_teachers"):
            if getattr(self, name) < 1:
                raise ValueError(f"sgsd.{name} must be >= 1, got {getattr(self, name)}")
        if self.update_every < 0 or self.update_max_new < 0:
            raise ValueError("sgsd.update_every and sgsd.update_max_new must be >= 0")
        if not 0.0 < self.similarity_threshold <= 1.0:
            raise ValueError(f"sgsd.similarity_threshold must be in (0, 1], got {self.similarity_threshold}")
        for name in ("tau", "weight_temperature", "delta_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sgsd.{name} must be > 0, got {getattr(self, name)}")
        if self.bank_path:
            from pathlib import Path

            if not Path(self.bank_path).is_file():
                raise ValueError(f"sgsd.bank_path {self.bank_path}: no such file (build one with "
                                 "`selfdistill sgsd skills --out FILE`)")


CRITIQUE_REWARD_TEMPLATE = ("{problem}\n\nYour previous attempt:\n{attempt}\n\nYour previous attempt was {verdict}. "
                            "Now solve the problem.")
CRITIQUE_REFERENCE_TEMPLATE = OPSD_TEMPLATE
CRITIQUE_STEP_TEMPLATE = ("{problem}\n\nYour previous attempt, checked step by step (wrong steps corrected):\n"
                          "{critique}\n\nNow solve the problem.")
CRITIQUE_CRITIC_TEMPLATE = (
    "Problem:\n{problem}\n\nCorrect final answer: {answer}\n\nA student's attempt:\n{attempt}\n\n"
    "Check the attempt step by step. Copy every correct step verbatim; replace every wrong step by the "
    "corrected step followed by '(corrected)'. End with the correct final answer.")


@dataclass
class CritiqueConfig:
    """Step-aligned critique (arXiv 2606.11173): the teacher sees feedback from a frozen critic."""

    feedback: Literal["reward", "reference", "step"] = field(default="step", metadata={
        "help": "reward: 'your previous attempt was correct/incorrect'; reference: the reference solution; "
                "step: the attempt checked step by step (correct steps verbatim, wrong ones corrected)."})
    critic: Literal["auto", "exact", "model"] = field(default="auto", metadata={
        "help": "exact: recompute the toy world's steps (math, code, mcqa); model: prompt a frozen model; "
                "auto: exact for toy items, model for the rest."})
    critic_model: str = field(default="", metadata={
        "help": "The model critic (folder or hub id); empty = the student's initial weights, frozen."})
    critic_template: str = field(default=CRITIQUE_CRITIC_TEMPLATE, metadata={
        "help": "Model critic prompt; {problem}, {answer}, {attempt}."})
    critic_max_new_tokens: int = field(default=128, metadata={"help": "Longest model critique."})
    chain: bool = field(default=True, metadata={
        "help": "Exact critic: a step that starts from a wrong earlier value is wrong too (false: only each "
                "step's own arithmetic is checked)."})
    reward_template: str = field(default=CRITIQUE_REWARD_TEMPLATE, metadata={
        "help": "Teacher prompt for feedback=reward; {problem}, {attempt}, {verdict}."})
    reference_template: str = field(default=CRITIQUE_REFERENCE_TEMPLATE, metadata={
        "help": "Teacher prompt for feedback=reference; {problem}, {solution}."})
    step_template: str = field(default=CRITIQUE_STEP_TEMPLATE, metadata={
        "help": "Teacher prompt for feedback=step; {problem}, {attempt}, {critique}."})


@dataclass
class SafeSteerConfig:
    """SafeSteer (arXiv 2606.02530): a teacher steered along the model's own refusal direction, distilled on
    a few safety tokens only. See docs/methods/safesteer.md."""

    direction: str = field(default="", metadata={
        "help": "A direction folder from `selfdistill safesteer direction` (empty: computed at the start of the "
                "run from the training task's harmful and harmless prompts, saved in the run's folder)."})
    tokens: str = field(default="", metadata={
        "help": "A safety-token file from `selfdistill safesteer tokens` (empty: chosen at the start of the run)."})
    coeff: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0], metadata={
        "help": "Steering coefficients tried in order when selecting the direction: the first for which some "
                "candidate's addition (coeff x the raw mean difference) induces refusal on harmless prompts is "
                "kept, and the teacher adds coeff x direction (a direction file keeps its own coefficient)."})
    vocabulary: Literal["safety", "full"] = field(default="safety", metadata={
        "help": "safety: reverse KL summed over the safety tokens (SafeSteer); full: full-vocabulary reverse KL "
                "to the steered teacher (the 'global' baseline; the distill section is then used)."})
    renormalise: bool = field(default=False, metadata={
        "help": "Renormalise student and teacher over the safety tokens before the KL (the paper's loss does not)."})
    gradient: Literal["exact", "ratio_detached"] = field(default="exact", metadata={
        "help": "exact: the paper's loss as written (its minimum puts each safety token at p_teacher / e); "
                "ratio_detached: the same value with the log-ratio detached, whose gradient vanishes at "
                "p_student = p_teacher (ours; docs/methods/safesteer.md)."})
    n_direction: int = field(default=128, metadata={
        "help": "Harmful and harmless prompts each for the mean difference."})
    n_select: int = field(default=32, metadata={
        "help": "Harmful and harmless prompts each for choosing the candidate."})
    drop_last_layers: float = field(default=0.2, metadata={
        "help": "Candidates in the last share of blocks are dropped."})
    max_kl: float = field(default=0.1, metadata={
        "help": "Drop candidates whose ablation moves the harmless next-token distribution by more than this KL."})
    filter_prompts: bool = field(default=True, metadata={
        "help": "Keep only harmful prompts the model already leans to refuse (refusal score > 0) and harmless "
                "ones it does not (< 0) for the mean difference, when at least 8 of each remain."})
    num_tokens: int = field(default=50, metadata={"help": "Safety tokens kept."})
    vote_top: int = field(default=200, metadata={
        "help": "Each position votes for its top this-many tokens by log-ratio."})
    token_prompts: int = field(default=64, metadata={"help": "Harmless prompts the steered model continues to vote."})
    token_samples: int = field(default=8, metadata={"help": "Samples per prompt (temperature 1)."})
    token_new: int = field(default=6, metadata={"help": "Tokens generated per sample."})
    min_prob: float = field(default=1e-8, metadata={
        "help": "Tokens whose mean steered probability over the voting positions is below this are banned."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_last_layers < 1.0:
            raise ValueError(f"safesteer.drop_last_layers must be in [0, 1), got {self.drop_last_layers}")
        for name in ("num_tokens", "vote_top", "token_prompts", "token_samples", "token_new", "n_direction",
                     "n_select"):
            if getattr(self, name) < 1:
                raise ValueError(f"safesteer.{name} must be >= 1, got {getattr(self, name)}")
        if not self.coeff or any(not (c > 0) for c in self.coeff):
            raise ValueError(f"safesteer.coeff must be a non-empty list of numbers > 0, got {self.coeff}")
        if self.vote_top < self.num_tokens:
            raise ValueError(f"safesteer.vote_top ({self.vote_top}) must be >= safesteer.num_tokens "
                             f"({self.num_tokens})")


@dataclass
class DOPSDConfig:
    """d-OPSD (arXiv 2606.18195): on-policy self-distillation for masked-diffusion LMs; see docs/methods/d_opsd.md.

    The student's own denoising trajectory (the state before every sampler step, ``rollout.*`` settings) is
    scored by the base weights shown the same state with a share of the student's own final tokens of later
    blocks revealed ("self-future").
    """

    future_ratio: float = field(default=0.25, metadata={
        "help": "Share of the positions after the current block that the teacher sees filled with the "
                "student's own final tokens (0 = the teacher sees the student's state: no privileged view)."})
    positions: int = field(default=2, metadata={
        "help": "Masked positions of the current block trained per state: those with the highest teacher "
                "max-logit."})
    topk: int = field(default=20, metadata={"help": "The reverse KL runs over the teacher's top-k tokens "
                                                    "(both distributions renormalised over them)."})
    clip: float = field(default=0.05, metadata={
        "help": "Each vocabulary element of the reverse KL is clamped at this value before summing "
                "(0 = no clamp; the paper: 0.05, 0.04 for math)."})
    resamples: int = field(default=8, metadata={
        "help": "Tries per prompt until a sample is verified correct; a prompt with none gives no loss."})
    reuse: int = field(default=4, metadata={
        "help": "Optimizer steps per rollout: the trajectory's states are split into this many chunks, one "
                "per step (the prompts of the steps between rollouts are not used)."})
    drop_last_block: bool = field(default=True, metadata={
        "help": "Skip the states of the last block (no later block to reveal)."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.future_ratio <= 1.0:
            raise ValueError(f"dopsd.future_ratio must be in [0, 1], got {self.future_ratio}")
        for name in ("positions", "topk", "resamples", "reuse"):
            if getattr(self, name) < 1:
                raise ValueError(f"dopsd.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ValueError(f"dopsd.clip must be a finite number >= 0, got {self.clip}")


@dataclass
class DiffuGRPOConfig:
    """diffu-GRPO (d1, arXiv 2504.12216): GRPO for masked-diffusion LMs, the RLVR baseline of d-OPSD's table.

    A completion's per-token log-probs are read in one forward pass with the whole completion masked and each
    prompt token masked with probability ``prompt_mask`` (d1's one-step estimate); the rest is ``grpo.*``.
    """

    prompt_mask: float = field(default=0.15, metadata={
        "help": "Probability of masking each prompt token in the log-prob estimate (d1: 0.15)."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.prompt_mask < 1.0:
            raise ValueError(f"diffu_grpo.prompt_mask must be in [0, 1), got {self.prompt_mask}")
