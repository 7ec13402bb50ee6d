"""Errors the command line turns into one line (kept free of torch so the CLI imports them cheaply).

:class:`selfdistill.config_io.ConfigError` (bad input, exit 2) lives with the config code.
"""

from __future__ import annotations


class TrainingStopped(RuntimeError):
    """The run stopped itself on purpose (e.g. ``max_bad_steps`` non-finite steps in a row); exit 1."""
