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


def method(cfg: TrainConfig, model=None):
    """``cfg``'s method on one CPU process, without a trainer: the model (loaded from ``model.path`` unless
    given), its tokenizer, the tasks and a stream of ``cfg.batch_size`` items per step."""
    from types import SimpleNamespace

    import torch

    from selfdistill.methods.base import Context, get_method
    from selfdistill.models import load_model, load_tokenizer
    from selfdistill.tasks.registry import ItemStream, build_tasks

    if model is None:
        model, tok = load_model(cfg.model)
    else:
        tok = load_tokenizer(cfg.model.path)
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"), is_main_process=True)
    tasks = build_tasks(cfg.data)
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, tasks=tasks, accelerator=acc, out_dir=None,
                  log=lambda s: None, stream=ItemStream(tasks, cfg.batch_size, cfg.seed))
    return get_method(cfg.method)(ctx)
