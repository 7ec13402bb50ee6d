"""Errors the command line turns into one line (kept free of torch so the CLI imports them cheaply).

:class:`selfdistill.config_io.ConfigError` (bad input, exit 2) lives with the config code.
"""

from __future__ import annotations


class TrainingStopped(RuntimeError):
    """The run stopped itself on purpose (e.g. ``max_bad_steps`` non-finite steps in a row); exit 1."""


class RunInterrupted(BaseException):
    """SIGTERM/SIGINT outside the step loop (loading, an evaluation, method setup, the final save).

    A ``BaseException`` like ``KeyboardInterrupt``, so no ``except Exception`` swallows it. The trainer turns
    it into a stopped run once the run's folder exists; before that it reaches the CLI (exit 128 + signal).
    """

    def __init__(self, signum: int, phase: str) -> None:
        super().__init__(f"stopped by signal {signum} during {phase}")
        self.signum, self.phase = signum, phase
