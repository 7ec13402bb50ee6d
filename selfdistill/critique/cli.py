"""``selfdistill critique analyze``: where each feedback context puts its pressure (per-token advantage)."""

from __future__ import annotations

from selfdistill.config_io import add_flags, build
from selfdistill.critique.analyze import AnalyzeConfig


def add_commands(sub) -> None:
    """The ``critique`` subcommand and its own subcommands."""
    p = sub.add_parser("critique", help="Step-aligned critique tools: the per-token advantage analysis.")
    csub = p.add_subparsers(dest="critique_command", required=True)
    an = csub.add_parser("analyze", help="Sample toy math traces, build the reward / reference / step contexts, "
                                         "write advantage.json and advantage.png.")
    an.add_argument("--config", help="YAML file with settings (flags override it).")
    add_flags(an, AnalyzeConfig)


def run(ns) -> int:
    from selfdistill.config_io import _leaf_fields
    from selfdistill.critique.analyze import analyze

    names = {n for n, _, _ in _leaf_fields(AnalyzeConfig)}
    analyze(build(AnalyzeConfig, ns.config, {k: v for k, v in vars(ns).items() if k in names}))
    return 0
