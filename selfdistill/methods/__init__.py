"""Every method registers itself here on import (see :mod:`selfdistill.methods.base`)."""

from selfdistill.methods import privileged, sft, ssd  # noqa: F401
from selfdistill.methods import ccopd, opcod  # noqa: F401
from selfdistill.methods import critique, grpo, sgsd  # noqa: F401
from selfdistill.methods.base import REGISTRY, Method, TrainBatch, get_method, register

try:  # SPD lands with its core; keep the registry importable meanwhile.
    from selfdistill.methods import spd  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["REGISTRY", "Method", "TrainBatch", "get_method", "register"]
