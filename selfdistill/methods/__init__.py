"""The training methods: one module, or one folder for a method with tooling of its own.

A method folder (``spd/``, ``ccopd/``, ``opcod/``, ``sgsd/``, ``critique/``, ``safesteer/``, ``dopsd/``) holds the
recipe in its ``__init__.py`` and beside it the method's views, CLI subcommands (``cli.py``), table
presets and evaluation; the core (trainer, rollout, objectives, arch, teachers, sequences, evaluation,
checkpoint, tasks) lives outside this package and imports no method.

Importing this package imports no method: :func:`load_all` (called by
:func:`selfdistill.methods.base.get_method`) imports every one, so their ``@register`` runs, and a method
that fails to import stops with its cause instead of going missing from the registry.
"""

from __future__ import annotations

import importlib

#: Every module or folder under ``selfdistill/methods`` that registers a method.
METHOD_MODULES = ("sft", "ssd", "privileged", "grpo", "spd", "ccopd", "opcod", "sgsd", "critique", "safesteer", "dopsd")


def load_all() -> None:
    """Import every method module (idempotent); an import error propagates with its traceback."""
    for name in METHOD_MODULES:
        importlib.import_module(f"selfdistill.methods.{name}")
