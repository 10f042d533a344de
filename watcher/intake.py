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
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED = 0x400, 0x800, 0x8000  # the watched folder itself went away
MISSING_RECHECK = 1.0  # seconds between looks for an inbox that is missing
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, length of the NUL-padded name that follows


def is_waiting_name(name: str) -> bool:
    return name.startswith(".") or name.endswith(WAITING_SUFFIXES)


def parse_events(data: bytes) -> tuple[dict[str, str], bool, bool]:
    """inotify events as read -> ({name: CLOSED or CHANGED}, whether the folder needs a full look,
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
            hints[name] = CHANGED if mask & IN_CREATE else CLOSED
    return hints, look_again or gone, gone


class InboxWatch:
    """A thread that reads the inbox's inotify events and passes them on as hints, one call per
    read: `on_hints({name: CLOSED or CHANGED})`, or `on_look_again(gone)` when the kernel dropped
    events or the folder itself went away."""

    def __init__(self, folder: Path, on_hints: Callable[[dict[str, str]], None], on_look_again: Callable[[bool], None]) -> None:
        self.on_hints, self.on_look_again = on_hints, on_look_again
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
        if libc.inotify_add_watch(self._fd, os.fsencode(folder), mask) < 0:
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
                    hints, look_again, gone = parse_events(os.read(self._fd, 1 << 16))
                    if look_again:
                        self.on_look_again(gone)
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
    """Ready files of the inbox, and the inbox itself: its schedule of full listings (`rescan_at`),
    its watch, re-armed when the folder is replaced (deleted and made again, renamed away), and
    waiting, not failing, while it is missing."""

    def __init__(
        self,
        inbox: Path,
        settle: float,
        rescan_seconds: float = float("inf"),
        watch: bool = False,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        """`rescan_seconds`: how often a full listing is due; `watch`: with inotify hints."""
        self.inbox, self.settle, self.rescan_seconds, self.wake = inbox, settle, rescan_seconds, wake
        self._use_watch = watch
        self._lock = threading.Lock()
        self._hints: dict[str, str] = {}
        self._candidates: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, first seen so)
        self._taken: set[str] = set()
        self._watch: InboxWatch | None = None
        self._watched: tuple[int, int] | None = None  # (device, inode) of the folder listed last
        self._last_rescan = 0.0
        self._look_again = False  # set by the watch thread
        self._watch_gone = False  # set by the watch thread: the watched folder went away
        self.missing = False

    # -- watch thread ----------------------------------------------------------------------
    def hint(self, hints: dict[str, str]) -> None:
        """Names that may be ready: CLOSED (written and closed, or renamed in) or CHANGED."""
        with self._lock:
            for name, kind in hints.items():
                if self._hints.get(name) != CLOSED:
                    self._hints[name] = kind
        self.wake()

    def look_again(self, gone: bool = False) -> None:
        """Events were lost, or the folder itself went away (`gone`: watch it anew): list it at once."""
        self._look_again = True
        self._watch_gone |= gone
        self.wake()

    # -- main loop -------------------------------------------------------------------------
    def stop(self) -> None:
        if self._watch:
            self._watch.stop()
            self._watch = None

    @property
    def rescan_at(self) -> float:
        """When the main loop should call `rescan` next (time.monotonic)."""
        if self._look_again:
            return 0.0
        return self._last_rescan + (MISSING_RECHECK if self.missing else self.rescan_seconds)

    def rescan(self, now: float | None = None) -> None:
        """Consider every entry of the inbox (the listing is the truth); first, watch the folder
        anew if it is not the one watched, or note that it is missing."""
        self._last_rescan = time.monotonic() if now is None else now
        self._look_again = False
        try:
            info = os.stat(self.inbox)
            if not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError
            if (info.st_dev, info.st_ino) != self._watched or self._watch_gone:
                self._watch_folder((info.st_dev, info.st_ino))
            with os.scandir(self.inbox) as entries:
                names = [e.name for e in entries]
        except (FileNotFoundError, NotADirectoryError):
            if not self.missing:
                log.get().error("inbox_missing", inbox=str(self.inbox), action=f"looking again every {MISSING_RECHECK:g} s")
                self.missing = True
                self.stop()
                self._watched = None
            return
        if self.missing:
            log.get().info("inbox_back", inbox=str(self.inbox))
            self.missing = False
        with self._lock:
            for name in names:
                self._hints.setdefault(name, CHANGED)
        self.wake()

    def _watch_folder(self, identity: tuple[int, int]) -> None:
        if self._watched is not None:
            log.get().warning("inbox_replaced", inbox=str(self.inbox), action="watching the new folder")
        self.stop()
        self._watch_gone = False
        if self._use_watch:
            self._watch = InboxWatch(self.inbox, self.hint, self.look_again)
        self._watched = identity

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
