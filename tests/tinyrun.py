"""Shared by the tests that start small training runs: nested settings from a base dict and dotted overrides."""

from __future__ import annotations

import copy
from typing import Any

from selfdistill.config import TrainConfig
from selfdistill.config_io import from_dict, set_dotted


def settings(base: dict[str, Any], **over: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with each dotted override (``rollout.max_new_tokens=8``) applied."""
    data = copy.deepcopy(base)
    for k, v in over.items():
        set_dotted(data, k, v)
    return data


def config(base: dict[str, Any], **over: Any) -> TrainConfig:
    """:func:`settings`, validated into a :class:`TrainConfig`."""
    return from_dict(TrainConfig, settings(base, **over))
