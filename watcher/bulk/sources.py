"""What a bulk run reads: the files of a source tree, and their bytes.

A source is a local folder or a URI that pyarrow opens (s3://bucket/prefix, gs://..., with the
usual query options such as ?endpoint_override=HOST:PORT&scheme=http). The tree is walked all the
way down. As in the inbox, hidden names (a file or folder whose name starts with ".") are
skipped, symlinks are never followed, and a symlink or anything else that is not a regular file
fails with the reason, as --once reports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyarrow import fs as pafs

from model.decode import Decoded, ImageError, decode_file, decode_read
from model.faces import Preprocessing
from model.pool import DecodeFunction


class SourceError(ValueError):
    """A source or output location that cannot be used; the message says why."""


def open_location(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a folder or URI and the path within it. Raises SourceError."""
    try:
        if "://" not in uri:
            return pafs.LocalFileSystem(), str(Path(uri).absolute())
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise SourceError(f"{uri}: {exc}") from None
    return filesystem, path.rstrip("/")


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def list_files(filesystem: pafs.FileSystem, root: str) -> list[str]:
    """The paths, relative to `root` and sorted, of the files to classify under it. Raises SourceError."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return _list_local(Path(root))
    try:
        info = filesystem.get_file_info(root)
        if info.type != pafs.FileType.Directory:
            raise SourceError(f"{root}: {'not found' if info.type == pafs.FileType.NotFound else 'not a folder'}")
        found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise SourceError(f"{root}: {exc}") from None
    relative = (f.path[len(root) + 1 :] for f in found if f.type == pafs.FileType.File)
    return sorted(r for r in relative if not _is_hidden(r))


def _list_local(root: Path) -> list[str]:
    if not root.is_dir():
        raise SourceError(f"{root}: {'not a folder' if root.exists() else 'not found'}")
    files: list[str] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:  # types come with the listing; symlinks are not followed
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(Path(entry.path))
                    else:  # a symlink or FIFO too: it fails with its reason, as in the inbox
                        files.append(os.path.relpath(entry.path, root))
        except OSError as exc:
            raise SourceError(f"{folder}: {exc.strerror}") from None
    return sorted(files)


@dataclass(frozen=True)
class RemoteDecode:
    """model.decode.decode_file for a file of a pyarrow filesystem other than the local one: read
    within the byte limit, then what decode_file does. For DecodePool(decode=...): picklable."""

    filesystem: pafs.FileSystem

    def __call__(self, path: Path, prep: Preprocessing, max_bytes: int) -> Decoded:
        return decode_read(lambda: self._read(str(path), max_bytes), prep)

    def _read(self, path: str, max_bytes: int) -> bytes:
        try:
            with self.filesystem.open_input_stream(path) as stream:
                data = stream.read(max_bytes + 1)
        except OSError as exc:
            raise ImageError(f"cannot read: {exc}") from None
        if len(data) > max_bytes:
            raise ImageError(f"over the limit of {max_bytes} bytes")
        return data


def decode_function(filesystem: pafs.FileSystem) -> DecodeFunction:
    """What a decode worker runs per file of `filesystem`: for local files exactly what --once runs."""
    return decode_file if isinstance(filesystem, pafs.LocalFileSystem) else RemoteDecode(filesystem)
