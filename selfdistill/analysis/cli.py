"""``selfdistill analyze``: what a training run changed in the weights (arXiv 2606.13657's analysis).

Three forms:

- ``selfdistill analyze BEFORE AFTER [--out DIR] [--dtype fp32|bf16]``: the report (Markdown, JSON, plots);
- ``selfdistill analyze compare RUN_A RUN_B --base BEFORE [--atol A | --top S]``: how two runs' update
  masks overlap, against random masks of the same densities (RUN_A/RUN_B may also be mask files);
- ``selfdistill analyze mask BEFORE AFTER --out FILE [--atol A | --top S] [--random SEED]``: the mask of
  the coordinates a run changed (or a random one of the same density per matrix) for ``--optim.mask``.

BEFORE/AFTER are Hugging Face folders, run folders (their ``model/``) or ``toy``.
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = "What a run changed in the weights: report, mask overlap, masks for sparse retraining."


def add_commands(sub) -> None:
    p = sub.add_parser("analyze", help=HELP, description=__doc__.split("\n\n")[1] if __doc__ else HELP)
    p.add_argument("paths", nargs="+", metavar="[compare|mask] PATH",
                   help="BEFORE AFTER; or `compare RUN_A RUN_B`; or `mask BEFORE AFTER`.")
    p.add_argument("--out", default="", help="Report folder (default: AFTER/analysis) or, for `mask`, the mask file.")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="Form Delta from float32 weights, or from both rounded to bfloat16 (exact zeros appear "
                        "from rounding alone; the report gives both zero shares).")
    p.add_argument("--base", default="", help="compare: the model both runs started from.")
    p.add_argument("--atol", type=float, default=0.0, help="compare/mask: a coordinate changed if |Delta| > atol.")
    p.add_argument("--top", type=float, default=0.0,
                   help="compare/mask: instead of --atol, the top share of coordinates by |Delta| per parameter.")
    p.add_argument("--random", type=int, default=-1,
                   help="mask: write a random mask with the same count per parameter (this seed) instead.")
    p.add_argument("--no_plots", action="store_true", help="Report without plots.")


def _masks_of(path: str, base: str, atol: float, top: float, dtype: str):
    from selfdistill.analysis import masks

    if Path(path).is_file():
        return masks.load(path)
    if not base:
        from selfdistill.config_io import ConfigError

        raise ConfigError(f"compare {path}: a run needs --base (the model it started from)")
    return masks.delta_masks(base, path, atol, top, dtype)


def run(ns) -> int:
    from selfdistill.config_io import ConfigError

    head, rest = ns.paths[0], ns.paths[1:]
    if head in ("compare", "mask"):
        if len(rest) != 2:
            raise ConfigError(f"analyze {head} takes two paths, got {len(rest)}")
    elif len(ns.paths) != 2:
        raise ConfigError(f"analyze takes BEFORE AFTER (two paths), got {len(ns.paths)}")
    if head == "compare":
        from selfdistill.analysis import masks

        a, b = (_masks_of(x, ns.base, ns.atol, ns.top, ns.dtype) for x in rest)
        res = masks.compare(a, b)
        print(masks.compare_markdown(res, rest[0], rest[1]))
        if ns.out:
            Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
            Path(ns.out).write_text(json.dumps({"a": rest[0], "b": rest[1], "base": ns.base, "atol": ns.atol,
                                                "top": ns.top, **res}, indent=1))
        return 0
    if head == "mask":
        from selfdistill.analysis import masks

        if not ns.out:
            raise ConfigError("analyze mask needs --out FILE.safetensors")
        before, after = rest
        m = masks.delta_masks(before, after, ns.atol, ns.top, ns.dtype)
        how = f"top {ns.top:g} by |Delta|" if ns.top else f"|Delta| > {ns.atol:g}"
        kind = "delta"
        if ns.random >= 0:
            m, kind = masks.random_like(m, ns.random), f"random (seed {ns.random})"
        masks.save(m, ns.out, kind, f"{after} vs {before}, {how}, {ns.dtype}")
        print(f"wrote {ns.out}: {kind} mask, {how}, density {masks.density(m):.4%}")
        return 0
    from selfdistill.analysis.report import analyze, write
    from selfdistill.analysis.weights import model_folder

    before, after = ns.paths
    out = ns.out or str((Path(after) if (Path(after) / "model").is_dir() else model_folder(after)) / "analysis")
    res = analyze(before, after, ns.dtype)
    paths = write(res, out, plots=not ns.no_plots)
    a = res["groups"]["all"]["all"]
    print(f"Delta ({ns.dtype}) over {a['params']:.0f} parameters, {a['numel']:,.0f} coordinates: "
          f"exact zeros {a['zero_share_n']:.2%}, below 1e-3 * RMS(W) {a['below_0.001_rms_n']:.2%}, "
          f"energy-weighted stable rank {a['stable_rank_e']:.1f}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
