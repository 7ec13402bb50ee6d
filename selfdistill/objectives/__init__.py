"""The one objective library every method uses.

Per-token divergences between a student and a (detached) teacher: forward KL,
reverse KL, generalized JSD(beta), over the full vocabulary or a top-k support
(renormalised or with a tail bucket), the sampled-token estimator, importance
weights against the rollout policy, completion masks and global token
normalisation; computed in fp32, in chunks of tokens.

- :func:`divergence_from_hidden` / :func:`token_logprobs_from_hidden`: the
  memory-bounded path (from last hidden states + lm_head weight).
- :func:`token_divergence`: the same objectives from logits.
- :func:`sampled_token_loss`: from per-token log-probs of realised tokens.
- :func:`reduce_token_losses`, :func:`global_token_count`: masks and
  gradient-accumulation-exact normalisation.
- :func:`policy_gradient_loss`, :func:`group_advantages`: the clipped-ratio
  policy-gradient loss (PPO / GRPO) on realised tokens.
- :func:`gated_token_loss`: SGSD's bounded loss signed by outcome x teacher support.
"""

from selfdistill.objectives.config import DivergenceConfig
from selfdistill.objectives.divergence import generalized_jsd, per_row_divergence, token_logprob_rows
from selfdistill.objectives.gated import bounded_token_loss, gated_token_loss, teacher_support
from selfdistill.objectives.hidden import divergence_from_hidden, token_logprobs_from_hidden
from selfdistill.objectives.logits import token_divergence
from selfdistill.objectives.pg import clip_fraction, group_advantages, kl_k3, policy_gradient_loss
from selfdistill.objectives.reduce import (
    global_token_count,
    importance_weights,
    reduce_token_losses,
    sampled_token_loss,
)

__all__ = [
    "bounded_token_loss",
    "clip_fraction",
    "gated_token_loss",
    "group_advantages",
    "kl_k3",
    "policy_gradient_loss",
    "teacher_support",
    "DivergenceConfig",
    "divergence_from_hidden",
    "generalized_jsd",
    "global_token_count",
    "importance_weights",
    "per_row_divergence",
    "reduce_token_losses",
    "sampled_token_loss",
    "token_divergence",
    "token_logprob_rows",
    "token_logprobs_from_hidden",
]
