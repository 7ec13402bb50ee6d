"""SPD's table preset (``selfdistill table --preset spd``): base, SSD, SPD and its ablations, each SPD
ablation compared with the SPD row and SPD with SSD."""

from __future__ import annotations

from selfdistill.experiments import Preset, single_runs

ROWS = {
    "base": {},
    "ssd": {"method": "ssd"},
    "spd": {"method": "spd", "spd.beta": 0.5},
    "spd-random": {"method": "spd", "spd.beta": 0.5, "spd.subspace": "random"},
    "spd-alltokens": {"method": "spd", "spd.beta": 0.5, "spd.selector": "all"},
    "spd-beta0": {"method": "spd", "spd.beta": 0.0},
    "spd-beta0.8": {"method": "spd", "spd.beta": 0.8},
    "spd-beta0.9": {"method": "spd", "spd.beta": 0.9},
    "spd-rank2": {"method": "spd", "spd.beta": 0.5, "spd.rank": 2},
    "spd-rank32": {"method": "spd", "spd.beta": 0.5, "spd.rank": 32},
    # The choices of #16 item 3, one ablation row each (against the spd row).
    "spd-vote": {"method": "spd", "spd.beta": 0.5, "spd.selector": "vote"},
    "spd-keys": {"method": "spd", "spd.beta": 0.5, "spd.kinds": "k"},
    "spd-values": {"method": "spd", "spd.beta": 0.5, "spd.kinds": "v"},
    "spd-perhead": {"method": "spd", "spd.beta": 0.5, "spd.per_head": True},
    "spd-uncentred": {"method": "spd", "spd.beta": 0.5, "spd.center": False},
    "spd-top2layers": {"method": "spd", "spd.beta": 0.5, "spd.layers": "top:2"},
    "spd-rounds2": {"method": "spd", "spd.beta": 0.5, "spd.rounds": 2},
    "spd-opd": {"method": "spd-opd", "spd.beta": 0.5},
}


def preset() -> Preset:
    return Preset("spd", single_runs(ROWS), baselines={"spd": "ssd", **{n: "spd" for n in ROWS if n.startswith("spd-")}})
