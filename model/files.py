"""Durable file writes (checkpoints, results): atomic replace of a whole file, fsync of folders;
and telling whether a path still holds the file that was read."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# (device, inode, size, mtime in ns) of a folder entry, not followed if a symlink.
Identity = tuple[int, int, int, int]


def file_identity(path: str | Path) -> Identity | None:
    """What changes when a file is replaced or rewritten under the same name; None if it is gone."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename over it, fsync the folder: readers see
    the old file or the new one, never a partial one, also after a crash."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
