"""Step-aligned critique (arXiv 2606.11173): frozen critics and the per-token advantage analysis."""

from selfdistill.critique.critic import Critique, ModelCritic, StepCheck, exact_critique

__all__ = ["Critique", "ModelCritic", "StepCheck", "exact_critique"]
