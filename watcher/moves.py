"""Moving handled files out of the inbox without ever overwriting anything."""

from __future__ import annotations

import ctypes
import errno
import os
import random
from collections.abc import Container
from pathlib import Path

from model.files import readable_name

NAME_MAX = 255
COUNTED = 100  # repeats of one name numbered __2 ... __100; after that, numbers at random
AT_FDCWD, RENAME_NOREPLACE = -100, 1  # <fcntl.h>, <linux/fs.h>
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc 2.28 and later


def unique_name(folder: Path, name: str, taken: Container[str] = ()) -> str:
    """`name` if free in `folder` (and its readable form, model.files.readable_name, not in
    `taken`: two names that read the same would be one key of the results), else `stem__2.ext`,
    `stem__3.ext`, ..., the stem shortened where the name would pass NAME_MAX bytes (an extension
    too long to keep counts as part of the stem)."""
    stem, dot, suffix = name.rpartition(".")
    if not stem or len(os.fsencode(dot + suffix)) > NAME_MAX // 2:
        stem, dot, suffix = name, "", ""
    candidate, n = name, 1
    while readable_name(candidate) in taken or os.path.lexists(folder / candidate):
        # Counting up, then at random: a name sent thousands of times must not cost thousands of lookups.
        n = n + 1 if n < COUNTED else random.randrange(COUNTED, 10**9)
        tail, cut = f"__{n}{dot}{suffix}", stem
        while len(os.fsencode(cut + tail)) > NAME_MAX:  # by characters: never half of one
            cut = cut[:-1]
        candidate = cut + tail
    return candidate


def move_no_clobber(source: Path, destination: Path) -> None:
    """Rename source to destination (same filesystem), refusing to replace an existing entry.

    The kernel refuses it (renameat2 with RENAME_NOREPLACE), so not even another process moving
    into the same folder can be overwritten. Where the C library or the filesystem lacks that,
    a check before the rename, which is enough for the service: it is the only writer of done/
    and failed/ that holds the lock of its results folder.
    """
    if _renameat2 is not None:
        if _renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(destination), RENAME_NOREPLACE) == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: the filesystem has no RENAME_NOREPLACE
            if error == errno.EEXIST:
                raise FileExistsError(error, f"{destination} already exists; not overwriting it with {source}")
            raise OSError(error, os.strerror(error), str(source), None, str(destination))
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, f"{destination} already exists; not overwriting it with {source}")
    os.rename(source, destination)
