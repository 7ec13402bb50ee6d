"""``selfdistill spd subspace``: extract, save and inspect SPD's capability subspace."""

from __future__ import annotations

from selfdistill.config import TrainConfig
from selfdistill.config_io import add_flags, from_args


def add_commands(sub) -> None:
    """The ``spd`` subcommand and its own subcommands."""
    from selfdistill.catalog import COMMON_SECTIONS

    spd = sub.add_parser("spd", help="SPD tools: the capability subspace, its spectra and diagnostics.")
    ssub = spd.add_subparsers(dest="spd_command", required=True)
    subsp = ssub.add_parser("subspace", help="Extract and save the capability subspace, plot its spectra.")
    subsp.add_argument("--config", help="YAML file with settings (flags override it).")
    subsp.add_argument("--out", default="subspace", help="Output folder (subspace.safetensors + spectra.png).")
    subsp.add_argument("--eval_betas", default="", help="Also measure the projected policy's accuracy on the "
                       "valid split for these betas, e.g. 0,0.5,1 (1 = no projection).")
    subsp.add_argument("--diagnostics", action="store_true", help="Also: energy inside the subspace vs a random "
                       "one, answer-vs-style principal angles, and per beta the projected policy's accuracy, style "
                       "and KL to the plain policy (diagnostics.json, diagnostics.png).")
    add_flags(subsp, TrainConfig, show={*COMMON_SECTIONS, "spd"})


def config_class(ns) -> type:
    """The settings class whose flags the command takes (for the closest-flag hint of a misspelled one)."""
    return TrainConfig


def run(ns) -> int:
    from selfdistill.methods.spd import extract_subspace_cli

    cfg = from_args(TrainConfig, ns)
    betas = [float(b) for b in ns.eval_betas.split(",") if b.strip()]
    extract_subspace_cli(cfg, ns.out, betas, diagnostics=ns.diagnostics)
    return 0
