"""Files and folders that appear whole or not at all: written under a temporary sibling, renamed into place.

Temporary siblings are named ``.NAME.tmp-PID`` (and ``.NAME.old-PID`` for a folder's previous copy while it is
being replaced); :data:`SCRATCH` matches exactly these names, so a run can remove what a killed predecessor
left without touching anything else in its folder.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

#: Names of the temporary siblings made here (and nothing else).
SCRATCH = re.compile(r"^\..+\.(tmp|old)-\d+$")


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def fsync_path(path: Path) -> None:
    """Flush a file or a folder's entries to disk (best effort for folders: not every file system allows it)."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling to write ``path`` through (for writers that take a file name).

    On success it is flushed and renamed over ``path`` in one step; on any error or signal it is removed, and
    ``path`` keeps its old content (or stays absent).
    """
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and one rename: a crash or a full disk never leaves half a file."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def publish_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Build folder ``final`` with ``write(tmp)`` in a temporary sibling, flush it, and rename it into place.

    ``final`` is never a half-written folder: it is absent, the previous complete copy, or the new complete
    copy. An existing copy is set aside for the instant between the two renames (and put back if that
    instant is interrupted), then deleted.
    """
    tmp, old = _sibling(final, "tmp"), _sibling(final, "old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_scratch(folder: Path) -> list[str]:
    """Delete the temporary siblings (:data:`SCRATCH`) directly inside ``folder``; the names removed."""
    gone = []
    for p in folder.iterdir() if folder.is_dir() else []:
        if SCRATCH.match(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone
