"""SGSD, skill-conditioned gated self-distillation (arXiv 2605.28791): the skill bank and its retrieval.

The method itself is :mod:`selfdistill.methods.sgsd`; its loss is
:func:`selfdistill.objectives.gated_token_loss`.
"""

from selfdistill.sgsd.retrieval import TfidfSimilarity, make_similarity, tfidf_cosine
from selfdistill.sgsd.skills import (AutoExtractor, Candidate, Entry, ModelExtractor, RuleExtractor, SkillBank,
                                     TeacherSpec, Trajectory, build_skill_bank, retrieve, teacher_pool)

__all__ = ["AutoExtractor", "Candidate", "Entry", "ModelExtractor", "RuleExtractor", "SkillBank", "TeacherSpec",
           "TfidfSimilarity", "Trajectory", "build_skill_bank", "make_similarity", "retrieve", "teacher_pool",
           "tfidf_cosine"]
