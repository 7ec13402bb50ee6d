"""Every method registers itself here on import (see :mod:`selfdistill.methods.base`)."""

from selfdistill.methods import privileged, sft, ssd  # noqa: F401
from selfdistill.methods import ccopd, opcod  # noqa: F401
from selfdistill.methods import critique, grpo, safesteer, sgsd, spd  # noqa: F401  (a failing import fails loudly)
from selfdistill.methods.base import REGISTRY, Method, TrainBatch, get_method, register

__all__ = ["REGISTRY", "Method", "TrainBatch", "get_method", "register"]
