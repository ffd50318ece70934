"""Crash-safe directory saves: write everything into a sibling, fsync it, then swap it in by rename.

A crash at any point leaves either the old directory or the new one complete; between the two renames of a swap the
old one waits as the ``.previous`` sibling, which ``recover`` puts back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    """fsync a file written by another library."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def partial(final: Path) -> Path:
    """Where a save of ``final`` is written before it is complete."""
    return final.with_name(f".{final.name}.partial")


def previous(final: Path) -> Path:
    """Where the older ``final`` waits while the new one is renamed in."""
    return final.with_name(f".{final.name}.previous")


def recover(final: Path) -> None:
    """Put back an older ``final`` left aside by a swap that crashed between its two renames."""
    if not final.exists() and previous(final).is_dir():
        os.rename(previous(final), final)
        fsync_dir(final.parent)


def start(final: Path) -> Path:
    """Recover ``final`` if a swap crashed, clear a stale partial save, and return a fresh empty partial directory."""
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = partial(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, final: Path) -> Path:
    """Swap the complete directory ``tmp`` in as ``final`` (whose older version is removed once the swap is done).

    Every file in ``tmp`` must already be fsynced.
    """
    fsync_dir(tmp)
    old = previous(final)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final
