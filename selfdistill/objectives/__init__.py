"""The one objective library every method uses.

Per-token divergences between a student and a (detached) teacher: forward KL,
reverse KL, generalized JSD(beta), over the full vocabulary or a top-k support
(renormalised or with a tail bucket), the sampled-token estimator, importance
weights against the rollout policy, completion masks and global token
normalisation; computed in fp32, in chunks of tokens.

- :func:`divergence_from_hidden` / :func:`token_logprobs_from_hidden`: the
  memory-bounded path (from last hidden states + the LM head: a weight, or an
  :class:`LMHead` with its bias, logit scale and soft-cap).
- :func:`token_divergence`: the same objectives from logits.
- :func:`sampled_token_loss`: from per-token log-probs of realised tokens.
- :func:`reduce_token_losses`, :func:`global_token_count`: masks and
  gradient-accumulation-exact normalisation.
- :func:`policy_gradient_loss`, :func:`group_advantages`: the clipped-ratio
  policy-gradient loss (PPO / GRPO) on realised tokens.
- :func:`gated_token_loss`: SGSD's bounded loss signed by outcome x teacher support.
- :func:`subset_reverse_kl_from_hidden`: reverse KL summed over a fixed token subset (SafeSteer).
- :func:`clipped_topk_reverse_kl`: reverse KL over the teacher's top-k, clamped per element (d-OPSD).
"""

from __future__ import annotations

import importlib
from typing import Any

from selfdistill.objectives.config import DivergenceConfig

#: Everything else is imported on first use (PEP 562): the config tree reads ``DivergenceConfig``
#: without importing torch, so ``selfdistill --help`` stays fast.
_LAZY = {
    "generalized_jsd": "divergence", "per_row_divergence": "divergence", "token_logprob_rows": "divergence",
    "bounded_token_loss": "gated", "gated_token_loss": "gated", "teacher_support": "gated",
    "divergence_from_hidden": "hidden", "token_logprobs_from_hidden": "hidden", "LMHead": "hidden",
    "as_head": "hidden",
    "token_divergence": "logits",
    "clip_fraction": "pg", "group_advantages": "pg", "kl_k3": "pg", "policy_gradient_loss": "pg",
    "global_token_count": "reduce", "importance_weights": "reduce", "reduce_token_losses": "reduce",
    "sampled_token_loss": "reduce",
    "subset_reverse_kl_from_hidden": "subset", "subset_reverse_kl_rows": "subset",
    "clipped_reverse_kl_on_support": "clipped", "clipped_topk_reverse_kl": "clipped", "teacher_topk": "clipped",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = ["DivergenceConfig", *sorted(_LAZY)]
