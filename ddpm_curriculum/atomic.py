"""The one atomic file writer: write a temporary file next to the target, then rename it over the target.

A crash at any moment leaves either the old file or the new one under the final name, never a partial
file. With ``durable=True`` (the default) the data is fsynced before the rename and the directory after
it, so the rename itself survives a power loss. A killed writer leaves its temporary file
(``.<name>.tmp<pid>``) behind; :func:`remove_stale_temps` deletes them where the caller knows no other
writer is active (e.g. under the run-directory lock).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_PATTERN = re.compile(r"^\..+\.tmp\d+$")  # the names temp_path makes


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, which cannot open a directory (and needs no directory fsync)
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = True) -> Path:
    """Call ``write(f)`` on a binary file object for a temporary file, then rename it to ``path``.

    An exception in ``write`` leaves ``path`` as it was and removes the temporary file. ``durable=False``
    skips both fsyncs (for many small files whose loss after a power cut is detected and repaired).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return path


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temporary files killed writers left in ``directory`` (only names ``temp_path`` makes).

    Only call this where no other writer can be active in ``directory``: a live writer's file looks the same.
    """
    removed = []
    if Path(directory).is_dir():
        for p in Path(directory).iterdir():
            if TEMP_PATTERN.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a JSON record) to a log under an exclusive lock, so that several processes appending
    at once never interleave; a crash loses at most the line being written, never earlier ones."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line.rstrip("\n") + "\n")
        f.flush()
