"""Which folder a run writes to: a fresh default one, a named one (``--overwrite``), or the one it resumes.

- ``output_dir`` empty (the default): a new ``runs/<method>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... when
  two runs start in the same second), and ``runs/latest`` a symlink to it, replaced atomically, so running
  ``selfdistill train`` again never meets the last run's files; ``--resume true`` continues ``runs/latest``.
- a named folder that already holds a run (its ``run_config.yaml``) is refused unless ``--resume true``
  continues it or ``--overwrite true`` replaces it (set aside by one rename, then deleted).

:func:`check_output_dir` only reads (it runs with the other checks, before anything is written);
:func:`claim_output_dir` creates the folder once every check has passed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError

#: Where default runs go, relative to the working directory.
RUNS = Path("runs")
LATEST = RUNS / "latest"
RUN_RECORD = "run_config.yaml"


def holds_run(folder: Path) -> bool:
    """True when ``folder`` holds a run's record (finished, failed or stopped)."""
    return (folder / RUN_RECORD).exists()


def resume_dir(cfg: TrainConfig) -> Path:
    """The folder ``--resume true`` continues: ``output_dir``, or where ``runs/latest`` points."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if not LATEST.exists():
        raise ConfigError(f"--resume true without --output_dir continues {LATEST}, and there is none; "
                          "pass the run's --output_dir")
    return LATEST.resolve()


def _writable(folder: Path, setting: str) -> None:
    """``folder`` (or, if missing, its nearest existing parent) accepts new files; nothing is left behind."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{setting} {folder}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):  # unnamed on Linux: never visible, gone on close
            pass
    except OSError as e:
        raise ConfigError(f"{setting} {folder}: cannot write in {probe} ({e.strerror})") from None


def check_output_dir(cfg: TrainConfig) -> None:
    """The run's folder can be used as asked (no files are written)."""
    if not cfg.output_dir and not cfg.resume:
        _writable(RUNS, "output_dir (default)")
        return
    out = resume_dir(cfg) if cfg.resume else Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    if holds_run(out) and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"output_dir {out} already holds a run; pass --resume true to continue it, "
                          "--overwrite true to replace it, or choose another --output_dir")
    _writable(out, "output_dir")


def _fresh_default(method: str) -> Path:
    """Create and return a new ``runs/<method>-<date>-<time>[-n]`` (``mkdir`` decides races between runs)."""
    RUNS.mkdir(parents=True, exist_ok=True)
    stem = f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 10_000):
        path = RUNS / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"output_dir: no free name for {RUNS / stem}")


def claim_output_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """The run's folder, created (or emptied with ``overwrite``); and whether this run made it."""
    if cfg.resume:
        return resume_dir(cfg), False
    if not cfg.output_dir:
        return _fresh_default(cfg.method), True
    out = Path(cfg.output_dir)
    if out.is_symlink():  # e.g. --output_dir runs/latest --overwrite true: the run it points at
        out = out.resolve()
    if cfg.overwrite and holds_run(out):
        aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.rename(out, aside)  # one step: the name never holds half an old run
        out.mkdir()
        shutil.rmtree(aside, ignore_errors=True)
        return out, True
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return out, made


def release_output_dir(out: Path, made: bool) -> None:
    """After a failure before the run's record was written: remove the folder this run made, if still empty."""
    if made:
        try:
            out.rmdir()
        except OSError:
            pass


def point_latest(out: Path) -> str | None:
    """Make ``runs/latest`` point at ``out`` (a default run) atomically; a note when it cannot."""
    if LATEST.exists() and not LATEST.is_symlink():
        return (f"note: {LATEST} is a folder (from an older version), left as it is; this run is in {out} "
                f"(rename {LATEST} to have it point at the newest run)")
    tmp = RUNS / f".latest-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(out.name, tmp)  # relative: the runs/ folder can be moved
        os.replace(tmp, LATEST)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        return f"note: could not point {LATEST} at {out} ({e.strerror})"
    return None
