"""``selfdistill opcod make-peers | table``: the OPCoD tools on the command line."""

from __future__ import annotations

from selfdistill.config_io import add_flags, build
from selfdistill.opcod.peers import PeersConfig
from selfdistill.opcod.table import OPCoDTableConfig


def add_commands(sub) -> None:
    p = sub.add_parser("opcod", help="OPCoD tools: make the two peer models, the co-distillation table.")
    osub = p.add_subparsers(dest="opcod_command", required=True)
    mk = osub.add_parser("make-peers", help="Fine-tune the base model briefly on one domain per peer.")
    add_flags(mk, PeersConfig)
    tab = osub.add_parser("table", help="Each model on both domains: base, opcod, one-way, self, sft.")
    add_flags(tab, OPCoDTableConfig)


def _dotted(ns, cls) -> dict:
    from selfdistill.config_io import _leaf_fields

    names = {n for n, _, _ in _leaf_fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def run(ns) -> int:
    if ns.opcod_command == "make-peers":
        from selfdistill.opcod.peers import make_peers

        make_peers(build(PeersConfig, None, _dotted(ns, PeersConfig)))
        return 0
    from selfdistill.opcod.table import run_opcod_table

    run_opcod_table(build(OPCoDTableConfig, None, _dotted(ns, OPCoDTableConfig)))
    return 0
