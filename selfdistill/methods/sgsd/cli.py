"""``selfdistill sgsd skills``: build the skill bank from the model's own rollouts and show it."""

from __future__ import annotations

from selfdistill.config import TrainConfig
from selfdistill.config_io import add_flags, from_args


def add_commands(sub) -> None:
    """The ``sgsd`` subcommand and its own subcommands."""
    p = sub.add_parser("sgsd", help="SGSD tools: build and show the skill bank.")
    ssub = p.add_subparsers(dest="sgsd_command", required=True)
    sk = ssub.add_parser("skills", help="Sample, verify, extract skills and mistakes; save the bank as JSON; "
                                        "show it and the teacher pools of a few items.")
    sk.add_argument("--config", help="YAML file with settings (flags override it).")
    sk.add_argument("--out", default="skill_bank.json", help="Where the bank is written (JSON).")
    sk.add_argument("--show", type=int, default=2, help="Show the teacher pools of this many train items.")
    add_flags(sk, TrainConfig)


def config_class(ns) -> type:
    """The settings class whose flags the command takes (for the closest-flag hint of a misspelled one)."""
    return TrainConfig


def run(ns) -> int:
    from selfdistill.methods.sgsd import skills_cli

    cfg = from_args(TrainConfig, ns)
    skills_cli(cfg, ns.out, ns.show)
    return 0
