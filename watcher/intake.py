"""Which inbox entries are ready to be classified.

The directory listing is the truth; watch events are hints that make it fast. A file is ready:
- on a close-after-write event or when renamed into the inbox (the writer is done), or
- when its size and mtime have not changed for `settle` seconds of watching (writers inotify
  cannot see, lost events, files already there at start). Only the service's own monotonic
  clock counts: an mtime in the future (a camera's clock, `rsync -t` from a machine ahead) or a
  step of the system clock does not hold a file back.
Names that are hidden or temporary (.*, *.part, *.crdownload, *.tmp, ... see WAITING_SUFFIXES)
wait until renamed. Sub-folders are
left alone. Symlinks, FIFOs, sockets and devices are ready at once, without waiting to settle: the
pipeline quarantines them in failed/ without reading them.

The inbox is watched with inotify directly, not through watchdog's observer: asked only for
close-after-write, moved-in and created, the kernel sends one event per arriving file and none
for the service's own reads and moves out of the inbox, where watchdog's observer (every event
type, three threads per event) took almost as much CPU per file as the forward pass. The watch
thread only records hints and calls `wake`; all decisions are made by the service's main loop
through `take`.
"""

from __future__ import annotations

import ctypes
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from watcher import log

# Firefox and curl write .part, Chrome and Edge .crdownload, some tools .partial.
WAITING_SUFFIXES = (".part", ".partial", ".crdownload", ".tmp", "~")
CLOSED, CHANGED = "closed", "changed"

# inotify(7)
IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_Q_OVERFLOW, IN_ISDIR = 0x8, 0x80, 0x100, 0x4000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, length of the NUL-padded name that follows


def is_waiting_name(name: str) -> bool:
    return name.startswith(".") or name.endswith(WAITING_SUFFIXES)


def parse_events(data: bytes) -> tuple[dict[str, str], bool]:
    """inotify events as read -> ({name: CLOSED or CHANGED}, whether the kernel dropped events).
    Sub-folders are left out; a file both created and closed in one read is CLOSED."""
    hints: dict[str, str] = {}
    overflow, offset = False, 0
    while offset < len(data):
        _, mask, _, length = EVENT_HEADER.unpack_from(data, offset)
        name = os.fsdecode(data[offset + EVENT_HEADER.size : offset + EVENT_HEADER.size + length].rstrip(b"\0"))
        offset += EVENT_HEADER.size + length
        overflow |= bool(mask & IN_Q_OVERFLOW)
        if name and not mask & IN_ISDIR and hints.get(name) != CLOSED:
            hints[name] = CHANGED if mask & IN_CREATE else CLOSED
    return hints, overflow


class InboxWatch:
    """A thread that reads the inbox's inotify events and passes them on as hints, one call per
    read: `on_hints({name: CLOSED or CHANGED})`, or `on_overflow()` when the kernel dropped events."""

    def __init__(self, folder: Path, on_hints: Callable[[dict[str, str]], None], on_overflow: Callable[[], None]) -> None:
        self.on_hints, self.on_overflow = on_hints, on_overflow
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        if libc.inotify_add_watch(self._fd, os.fsencode(folder), IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE) < 0:
            errno = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(errno, f"inotify_add_watch {folder}: {os.strerror(errno)}")
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="inbox-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Until stopped. Owns the inotify descriptor and the pipe's read end, and closes them."""
        try:
            while self._stop_r not in select.select([self._fd, self._stop_r], [], [])[0]:
                try:
                    hints, overflow = parse_events(os.read(self._fd, 1 << 16))
                    if overflow:
                        self.on_overflow()
                    if hints:
                        self.on_hints(hints)
                except BlockingIOError:
                    continue
                except Exception as exc:  # keep watching: the rescans cover what this pass missed
                    log.get().error("inbox_watch_error", reason=f"{type(exc).__name__}: {exc}")
        finally:
            os.close(self._fd)
            os.close(self._stop_r)

    def stop(self) -> None:
        with suppress(OSError):  # the thread has ended already
            os.write(self._stop_w, b"!")
        self._thread.join(timeout=5)
        os.close(self._stop_w)


class Intake:
    def __init__(self, inbox: Path, settle: float, wake: Callable[[], None] = lambda: None) -> None:
        self.inbox, self.settle, self.wake = inbox, settle, wake
        self._lock = threading.Lock()
        self._hints: dict[str, str] = {}
        self._candidates: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, first seen so)
        self._taken: set[str] = set()
        self._watch: InboxWatch | None = None

    # -- watch thread ----------------------------------------------------------------------
    def hint(self, hints: dict[str, str]) -> None:
        """Names that may be ready: CLOSED (written and closed, or renamed in) or CHANGED."""
        with self._lock:
            for name, kind in hints.items():
                if self._hints.get(name) != CLOSED:
                    self._hints[name] = kind
        self.wake()

    # -- main loop -------------------------------------------------------------------------
    def start(self, watch: bool = True) -> None:
        if watch:
            self._watch = InboxWatch(self.inbox, self.hint, self.rescan)
        self.rescan()

    def stop(self) -> None:
        if self._watch:
            self._watch.stop()
            self._watch = None

    def rescan(self) -> None:
        """Consider every entry of the inbox (the listing is the truth)."""
        with os.scandir(self.inbox) as entries:
            names = [e.name for e in entries]
        with self._lock:
            for name in names:
                self._hints.setdefault(name, CHANGED)
        self.wake()

    def take(self, now: float | None = None) -> list[Path]:
        """Entries that are ready now, each handed out once until `release`d."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hints, self._hints = self._hints, {}
        ready, later = [], {}
        for name, kind in hints.items():
            if name in self._taken:
                later[name] = kind  # a new file under a name still in the pipeline: look after release
            elif is_waiting_name(name):
                self._candidates.pop(name, None)
            elif kind == CLOSED:
                self._candidates.pop(name, None)
                ready.append(name)  # closed after writing, or renamed in: complete
            else:
                self._candidates.setdefault(name, (-1, -1, now))
        if later:
            with self._lock:
                self._hints = later | self._hints
        for name in list(self._candidates):
            verdict = self._settled(name, now)
            if verdict is not None:
                del self._candidates[name]
                if verdict:
                    ready.append(name)
        ready = [n for n in dict.fromkeys(ready) if self._is_file_like(n)]
        self._taken.update(ready)
        return [self.inbox / n for n in sorted(ready)]

    def _settled(self, name: str, now: float) -> bool | None:
        """True: ready; False: gone or not for us; None: look again later."""
        try:
            info = os.lstat(self.inbox / name)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(info.st_mode):
            return False
        if not stat.S_ISREG(info.st_mode):
            return True
        size, mtime, since = self._candidates[name]
        if (info.st_size, info.st_mtime_ns) != (size, mtime):
            self._candidates[name] = (info.st_size, info.st_mtime_ns, now)
            return None
        return True if now - since >= self.settle else None

    def _is_file_like(self, name: str) -> bool:
        try:
            return not stat.S_ISDIR(os.lstat(self.inbox / name).st_mode)
        except FileNotFoundError:
            return False

    def release(self, paths: list[Path]) -> None:
        """The pipeline is done with these (moved out); their names may be taken again."""
        self._taken.difference_update(p.name for p in paths)

    def waiting(self) -> bool:
        """Whether some candidates need another look."""
        return bool(self._candidates)
