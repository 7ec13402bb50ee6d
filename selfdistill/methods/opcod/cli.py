"""``selfdistill opcod make-peers | table``: the OPCoD tools on the command line."""

from __future__ import annotations

from selfdistill.config_io import add_flags, from_args
from selfdistill.methods.opcod.peers import PeersConfig
from selfdistill.methods.opcod.table import OPCoDTableConfig


def add_commands(sub) -> None:
    p = sub.add_parser("opcod", help="OPCoD tools: make the two peer models, the co-distillation table.")
    osub = p.add_subparsers(dest="opcod_command", required=True)
    mk = osub.add_parser("make-peers", help="Fine-tune the base model briefly on one domain per peer.")
    add_flags(mk, PeersConfig)
    tab = osub.add_parser("table", help="Each model on both domains: base, opcod, one-way, self, sft.")
    add_flags(tab, OPCoDTableConfig)




def run(ns) -> int:
    if ns.opcod_command == "make-peers":
        from selfdistill.methods.opcod.peers import make_peers

        make_peers(from_args(PeersConfig, ns))
        return 0
    from selfdistill.methods.opcod.table import run_opcod_table

    run_opcod_table(from_args(OPCoDTableConfig, ns))
    return 0
