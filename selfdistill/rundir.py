"""Which folder a run writes to: a fresh default one, a named one (``--overwrite``), or the one it resumes.

- ``output_dir`` empty (the default): a new ``runs/<method>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... when
  two runs start in the same second), and ``runs/latest`` a symlink to it, replaced atomically, so running
  ``selfdistill train`` again never meets the last run's files; ``--resume true`` continues ``runs/latest``.
- a named folder that already holds a run (its ``run_config.yaml``) is refused unless ``--resume true``
  continues it or ``--overwrite true`` replaces it (set aside by one rename, then deleted).

One folder, one run: a run holds an exclusive ``flock`` on ``OUTPUT/.lock`` for its whole life (the kernel
drops it when the process ends, however it ends), so a second run in the same folder stops with the live
run's pid. A folder is empty, a run (``run_config.yaml``: resumable, or finished with ``model/``), or refused:
files without a run record are never pruned, replaced or resumed. ``--resume true`` checks its settings
against the saved ``run_config.yaml`` (:func:`resume_differences`).

:func:`check_output_dir` only reads (it runs with the other checks, before anything is written);
:func:`claim_output_dir` creates and locks the folder once every check has passed, and checks again under
the lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

from selfdistill.atomic import SCRATCH, remove_scratch
from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError, flatten, load_yaml, to_dict

#: Where default runs go, relative to the working directory.
RUNS = Path("runs")
LATEST = RUNS / "latest"
RUN_RECORD = "run_config.yaml"
LOCK_FILE = ".lock"

#: Settings a resumed run may change without --resume_force: how long it runs, where and how often it saves
#: and evaluates, and where it logs (report_to). Every other setting changes what the run computes.
RESUME_MAY_CHANGE = ("steps", "resume", "resume_force", "overwrite", "output_dir", "save_every",
                     "keep_checkpoints", "eval.every", "report_to")


def holds_run(folder: Path) -> bool:
    """True when ``folder`` holds a run's record (finished, failed or stopped)."""
    return (folder / RUN_RECORD).exists()


def _run_files(folder: Path) -> list[str]:
    """What ``folder`` holds besides the lock and temporary files (so: whether it is empty to a run)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE and not SCRATCH.match(p.name))


def _in_use(folder: Path, pid: str) -> ConfigError:
    return ConfigError(f"output_dir {folder} is in use by a live run (pid {pid}); wait for it to end, or "
                       "choose another --output_dir")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class FolderLock:
    """An exclusive ``flock`` on ``FOLDER/.lock``, held for a run's life: one folder, one run.

    The kernel releases it when the process dies, however it dies, so a lock file left by a killed run is
    simply taken over (``stale`` keeps the pid it named). The holder's pid is written in the file for the
    refusal message; :meth:`release` deletes the file, then drops the lock.
    """

    def __init__(self, path: Path, fd: int, stale: str) -> None:
        self.path, self.fd, self.stale = path, fd, stale

    @classmethod
    def acquire(cls, folder: Path, tries: int = 40) -> "FolderLock":
        """Lock ``folder`` or raise a :class:`ConfigError` naming the live holder's pid.

        A few short retries let a concurrent :func:`live_holder` probe (a brief shared lock) pass.
        """
        path = folder / LOCK_FILE
        for _ in range(tries):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                time.sleep(0.025)
                continue
            if not _same_file(fd, path):  # a holder deleted this file as it left: lock the new one
                os.close(fd)
                continue
            stale = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return cls(path, fd, stale)
        raise _in_use(folder, live_holder(folder) or "unknown")

    def release(self) -> None:
        """Delete the lock file (if it is still this lock's) and drop the lock; idempotent."""
        if self.fd < 0:
            return
        if _same_file(self.fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def live_holder(folder: Path) -> str | None:
    """The pid written by the live run that holds ``folder``'s lock, or None (reads only)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def resume_differences(cfg: TrainConfig, out: Path) -> list[str]:
    """``--key (saved A, now B)`` for each setting of ``cfg`` that differs from the run saved in ``out``.

    :data:`RESUME_MAY_CHANGE` is ignored; a setting the saved run predates counts as its default then.
    """
    saved = flatten(load_yaml(out / RUN_RECORD))
    now, default = flatten(to_dict(cfg)), flatten(to_dict(TrainConfig()))
    return [f"--{k} (saved {saved.get(k, default.get(k))!r}, now {v!r})" for k, v in now.items()
            if k not in RESUME_MAY_CHANGE and saved.get(k, default.get(k)) != v]


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
    pid = live_holder(out)
    if pid:
        raise _in_use(out, pid)
    others = _run_files(out)
    if others and not holds_run(out):
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ConfigError(f"output_dir {out} holds files ({shown}) but no {RUN_RECORD}: not a run this tool can "
                          "resume or replace; choose another --output_dir, or empty it yourself")
    if cfg.resume:
        if not holds_run(out):
            raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'} and no {RUN_RECORD} in {out}: "
                              "there is no run to resume")
        diffs = resume_differences(cfg, out)
        if diffs and not cfg.resume_force:
            raise ConfigError(f"--resume: the settings differ from the saved run's ({out / RUN_RECORD}) in "
                              f"{', '.join(diffs)}; resume with the saved settings, or pass --resume_force true "
                              "to continue with these")
    elif holds_run(out) and not cfg.overwrite:
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


def claim_output_dir(cfg: TrainConfig) -> tuple[Path, bool, FolderLock]:
    """The run's folder, created (or emptied with ``overwrite``) and locked; whether this run made it; the lock.

    What :func:`check_output_dir` found is checked again under the lock (a run started beside this one may
    have taken the folder since). The temporary files a killed run left in it are removed.
    """
    if cfg.resume:
        out = resume_dir(cfg)
        lock = FolderLock.acquire(out)
        made = False
    elif not cfg.output_dir:
        out = _fresh_default(cfg.method)
        lock, made = FolderLock.acquire(out), True
    else:
        out = Path(cfg.output_dir)
        if out.is_symlink():  # e.g. --output_dir runs/latest --overwrite true: the run it points at
            out = out.resolve()
        replaced = None
        if cfg.overwrite and holds_run(out):
            held = FolderLock.acquire(out)  # never replace a live run
            replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.rename(out, replaced)  # one step: the name never holds half an old run
            held.release()  # (its file went with the folder: only the lock is dropped)
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock.acquire(out)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    if cfg.resume and not holds_run(out):
        lock.release()
        raise ConfigError(f"--resume: {out} no longer holds a run ({RUN_RECORD} is gone)")
    if not cfg.resume and _run_files(out):
        lock.release()
        raise ConfigError(f"output_dir {out} was taken by another run while this one started; choose another "
                          "--output_dir")
    remove_scratch(out)
    return out, made, lock


def release_output_dir(out: Path, made: bool) -> None:
    """After a failure before the run's record was written: remove the folder this run made, if still empty."""
    if made:
        remove_scratch(out)
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
