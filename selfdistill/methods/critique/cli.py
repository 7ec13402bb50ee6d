"""``selfdistill critique analyze``: where each feedback context puts its pressure (per-token advantage)."""

from __future__ import annotations

from selfdistill.config_io import add_flags, from_args
from selfdistill.methods.critique.analyze import AnalyzeConfig


def add_commands(sub) -> None:
    """The ``critique`` subcommand and its own subcommands."""
    p = sub.add_parser("critique", help="Step-aligned critique tools: the per-token advantage analysis.")
    csub = p.add_subparsers(dest="critique_command", required=True)
    an = csub.add_parser("analyze", help="Sample toy math traces, build the reward / reference / step contexts, "
                                         "write advantage.json and advantage.png.")
    an.add_argument("--config", help="YAML file with settings (flags override it).")
    add_flags(an, AnalyzeConfig)


def config_class(ns) -> type:
    """The settings class whose flags the command takes (for the closest-flag hint of a misspelled one)."""
    return AnalyzeConfig


def run(ns) -> int:
    from selfdistill.methods.critique.analyze import analyze

    analyze(from_args(AnalyzeConfig, ns))
    return 0
