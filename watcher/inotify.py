"""A folder's inotify events as hints, read by a thread of its own (inotify(7) through libc).

Asked only for close-after-write, moved-in and created (and the folder itself going away), the
kernel sends one or two events per arriving file (created, then closed; or moved in) and none
for a process's own reads of the folder or moves out of it, so a busy inbox costs little. The
thread only passes hints on; whoever made the watch decides what they mean (watcher.intake for
the inbox, watcher.reload for the checkpoint's folder).
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from watcher import log

# Hints: CLOSED written and closed, or moved in (complete); OPENED created, its writer not done
# yet; CHANGED anything else worth a look (a listing's names, a name released by the pipeline).
CLOSED, OPENED, CHANGED = "closed", "opened", "changed"
IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_Q_OVERFLOW, IN_ISDIR = 0x8, 0x80, 0x100, 0x4000, 0x40000000
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED = 0x400, 0x800, 0x8000  # the watched folder itself went away
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, length of the NUL-padded name that follows


def parse_events(data: bytes) -> tuple[dict[str, str], bool, bool]:
    """inotify events as read -> ({name: CLOSED or OPENED}, whether the folder needs a full look,
    whether the watched folder itself is gone). A full look: the kernel dropped events, or the
    folder was deleted or renamed; a gone folder's watch is dead even where a new folder gets
    the same inode number. Sub-folders are left out; a file both created and closed in one read
    is CLOSED."""
    hints: dict[str, str] = {}
    look_again, gone, offset = False, False, 0
    while offset < len(data):
        _, mask, _, length = EVENT_HEADER.unpack_from(data, offset)
        name = os.fsdecode(data[offset + EVENT_HEADER.size : offset + EVENT_HEADER.size + length].rstrip(b"\0"))
        offset += EVENT_HEADER.size + length
        gone |= bool(mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED))
        look_again |= bool(mask & IN_Q_OVERFLOW)
        if name and not mask & IN_ISDIR and hints.get(name) != CLOSED:
            hints[name] = OPENED if mask & IN_CREATE else CLOSED
    return hints, look_again or gone, gone


class FolderWatch:
    """A thread that reads a folder's inotify events and passes them on as hints, one call per
    read: `on_hints({name: CLOSED or OPENED})`, or `on_look_again(gone)` when the kernel dropped
    events or the folder itself went away. Raises OSError when the watch cannot be set up (out
    of inotify watches or descriptors, no permission)."""

    def __init__(self, folder: Path, on_hints: Callable[[dict[str, str]], None], on_look_again: Callable[[bool], None]) -> None:
        self.folder, self.on_hints, self.on_look_again = folder, on_hints, on_look_again
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
        try:
            if libc.inotify_add_watch(self._fd, os.fsencode(folder), mask) < 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"inotify_add_watch {folder}: {os.strerror(errno)}")
            self._stop_r, self._stop_w = os.pipe()
        except BaseException:  # out of descriptors is when this fails: never leak one
            os.close(self._fd)
            raise
        self._thread = threading.Thread(target=self._run, name=f"watch-{folder.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Until stopped. Owns the inotify descriptor and the pipe's read end, and closes them."""
        try:
            while self._stop_r not in select.select([self._fd, self._stop_r], [], [])[0]:
                try:
                    hints, look_again, gone = parse_events(os.read(self._fd, 1 << 16))
                    if look_again:
                        self.on_look_again(gone)
                    if hints:
                        self.on_hints(hints)
                except BlockingIOError:
                    continue
                except Exception as exc:  # keep watching: full listings and polls cover what this read missed
                    log.get().error("folder_watch_error", folder=str(self.folder), reason=f"{type(exc).__name__}: {exc}")
        finally:
            os.close(self._fd)
            os.close(self._stop_r)

    def stop(self) -> None:
        with suppress(OSError):  # the thread has ended already
            os.write(self._stop_w, b"!")
        self._thread.join(timeout=5)
        os.close(self._stop_w)
