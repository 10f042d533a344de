"""Durable file writes (checkpoints, results): atomic replace of a whole file, fsync of folders;
reading a file that someone else may have put there (images, checkpoints); and telling whether a
path still holds the file that was read."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

# (device, inode, size, mtime and ctime in ns) of a folder entry, not followed if a symlink.
Identity = tuple[int, int, int, int, int]


def readable_name(name: str) -> str:
    """A file name as valid Unicode, for JSON that strict parsers accept: bytes of a name that are
    not UTF-8 (which Python keeps as lone surrogates) become the text \\xNN."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        return name.encode("utf-8", "backslashreplace").decode()


def file_identity(path: str | Path, follow_symlinks: bool = False) -> Identity | None:
    """What changes when a file is replaced or rewritten under the same name; None if it is gone.
    The ctime is set by the kernel when an inode is made or changed (chmod and chown too) and
    cannot be set back, so a copy of the same bytes put there again (cp -p, rsync -t, even on a
    reused inode) differs. Of the entry itself, or with `follow_symlinks` of what it points to."""
    try:
        info = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class FileRefused(ValueError):
    """A file that read_regular_file will not read; the message says why."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing  # nothing at the path


def read_regular_file(path: str | Path, max_bytes: int, follow_symlinks: bool) -> bytes:
    """Read a regular file, refusing FIFOs, sockets, devices, folders, files over `max_bytes`
    and, unless `follow_symlinks`, symlinks.

    O_NOFOLLOW refuses a symlink at the last component; O_NONBLOCK keeps a FIFO from blocking
    the open, and fstat then refuses it. Raises FileRefused.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = 0
        if stat.S_ISLNK(mode) and not follow_symlinks:
            raise FileRefused("is a symbolic link") from None
        if stat.S_ISSOCK(mode):
            raise FileRefused("is a socket, not a regular file") from None
        raise FileRefused(f"cannot open: {exc.strerror}", missing=isinstance(exc, FileNotFoundError)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "folder" if stat.S_ISDIR(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode) else "special file"
            raise FileRefused(f"is a {kind}, not a regular file")
        if info.st_size > max_bytes:
            raise FileRefused(f"{info.st_size} bytes is over the limit of {max_bytes}")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise FileRefused(f"over the limit of {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise FileRefused(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename over it, fsync the folder: readers see
    the old file or the new one, never a partial one, also after a crash."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # Created with the usual mode (0666 less the umask), which the kernel applies: reading the umask
    # means setting it, which would race with the files other threads create meanwhile.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
