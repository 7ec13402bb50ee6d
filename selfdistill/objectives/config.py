"""The one typed configuration of every per-token objective.

Other modules build :class:`DivergenceConfig` from YAML or the command line,
so field names are plain and every field carries a ``help`` string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

KINDS = ("jsd", "forward_kl", "reverse_kl", "sampled")
SUPPORTS = ("student", "teacher")
TAILS = ("renorm", "bucket")

Kind = Literal["jsd", "forward_kl", "reverse_kl", "sampled"]


@dataclass
class DivergenceConfig:
    """How a student is pulled towards a teacher, token by token.

    Generalized JSD convention (GKD, arXiv 2306.13649 Eq. 1; TRL's
    ``generalized_jsd_loss``; OPSD's code), with ``p_T`` the teacher and
    ``p_S`` the student::

        M        = beta * p_T + (1 - beta) * p_S
        JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)

    As beta -> 0, JSD_beta / beta -> KL(p_T || p_S) (forward KL) and as
    beta -> 1, JSD_beta / (1 - beta) -> KL(p_S || p_T) (reverse KL); the value
    itself tends to 0 at both ends, so beta = 0 and beta = 1 are computed
    directly as the plain forward and reverse KL.
    """

    kind: Kind = field(
        default="jsd",
        metadata={
            "help": "jsd: generalized JSD with `beta`; forward_kl: KL(teacher||student); "
            "reverse_kl: KL(student||teacher); sampled: per realised token y_t, "
            "loss = -stopgrad(log p_T(y_t) - log p_S(y_t)) * log p_S(y_t)."
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "JSD interpolation in [0, 1], used only when kind='jsd': "
            "0 is forward KL(teacher||student), 1 is reverse KL(student||teacher), "
            "mixture M = beta*p_teacher + (1-beta)*p_student."
        },
    )
    topk: int | None = field(
        default=None,
        metadata={
            "help": "None: full vocabulary. k: only the k most probable tokens of the "
            "`topk_support` distribution (per position); k >= vocab size means full."
        },
    )
    topk_support: Literal["student", "teacher"] = field(
        default="student",
        metadata={"help": "Whose probabilities choose the top-k tokens: student or teacher."},
    )
    tail: Literal["renorm", "bucket"] = field(
        default="bucket",
        metadata={
            "help": "With topk: renorm renormalises both distributions over the k tokens; "
            "bucket adds one category holding each distribution's remaining mass (k+1 categories)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature (> 0) applied to both student and teacher logits."},
    )
    is_clip: float | None = field(
        default=None,
        metadata={
            "help": "None: no importance weighting. c > 0: multiply each token's loss by "
            "min(exp(logp_student - logp_rollout), c), detached (SDPO / Vision-OPD use 2.0); "
            "needs the rollout policy's log-probs of the sampled tokens."
        },
    )
    chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Tokens per chunk: peak extra memory is a few chunk_size x vocab fp32 "
            "tensors, independent of batch x length."
        },
    )
    truncate_vocab: bool = field(
        default=False,
        metadata={
            "help": "When student and teacher vocab sizes differ (padding ids, e.g. Qwen2.5 "
            "151936 vs 152064): True slices both to the smaller size, False raises."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field if any value is out of range."""
        if self.kind not in KINDS:
            raise ValueError(f"DivergenceConfig.kind={self.kind!r} is unknown; choose one of {KINDS}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise ValueError(f"DivergenceConfig.beta must be a number in [0, 1], got {self.beta!r}")
        if not (0.0 <= float(self.beta) <= 1.0):
            raise ValueError(f"DivergenceConfig.beta={self.beta} is outside [0, 1]")
        if self.topk is not None:
            if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
                raise ValueError(f"DivergenceConfig.topk must be None or an integer >= 1, got {self.topk!r}")
            if self.kind == "sampled":
                raise ValueError("DivergenceConfig.topk has no effect with kind='sampled'; set topk=None")
        if self.topk_support not in SUPPORTS:
            raise ValueError(
                f"DivergenceConfig.topk_support={self.topk_support!r} is unknown; choose one of {SUPPORTS}"
            )
        if self.tail not in TAILS:
            raise ValueError(f"DivergenceConfig.tail={self.tail!r} is unknown; choose one of {TAILS}")
        if not _positive_finite(self.temperature):
            raise ValueError(f"DivergenceConfig.temperature must be a finite number > 0, got {self.temperature!r}")
        if self.is_clip is not None and not _positive_finite(self.is_clip):
            raise ValueError(f"DivergenceConfig.is_clip must be None or a finite number > 0, got {self.is_clip!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"DivergenceConfig.chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        if not isinstance(self.truncate_vocab, bool):
            raise ValueError(f"DivergenceConfig.truncate_vocab must be true or false, got {self.truncate_vocab!r}")

    @property
    def effective_beta(self) -> float:
        """beta as used by the math: 0 for forward_kl, 1 for reverse_kl."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.kind, float(self.beta))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for CLIs and generated docs."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


def _positive_finite(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0
