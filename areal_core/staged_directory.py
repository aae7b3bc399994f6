"""A directory that appears under its final name complete or not at all.

Its files are written into a hidden staging sibling (same filesystem, so the rename is atomic),
and the staging directory is renamed to the final name only once everything in it is written;
any exception removes the staging directory. Adapter versions and merged models are written so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename into it, say) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(directory: str | os.PathLike) -> None:
    """fsync every file under ``directory`` and the directories holding them, for files
    written by code that does not fsync them itself (``save_pretrained``, ``shutil.copy``)."""
    for root, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


@contextmanager
def staged_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside ``final``; rename it to ``final`` when the block
    ends normally, remove it when the block raises (the exception propagates).

    The caller refuses an existing ``final`` beforehand: the rename replaces an empty directory
    (POSIX ``rename``), and fails on anything else.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 would hide the result from a server run as another user
        os.rename(staging, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
