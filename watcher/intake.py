"""Which inbox entries are ready to be classified.

The directory listing is the truth; watch events are hints that make it fast. A file is ready:
- on a close-after-write event or when renamed into the inbox (the writer is done), or
- when its size and mtime are unchanged for `settle` seconds and its mtime is at least that old
  (writers watchdog cannot see, lost events, files already there at start).
Names that are hidden or temporary (.*, *.part, *.tmp, *~) wait until renamed. Sub-folders are
left alone. Symlinks, FIFOs, sockets and devices are ready at once, without being opened: the
pipeline quarantines them in failed/.

The watchdog observer thread only records hints and calls `wake`; all decisions are made by the
service's main loop through `take`.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

WAITING_SUFFIXES = (".part", ".tmp", "~")
# watchdog holds every IN_MOVED_FROM for `delay` (0.5 s) to pair it with its IN_MOVED_TO, and
# all events queued behind it wait as well: each of our own moves out of the inbox would add
# half a second to the next arrivals. Both halves of a rename inside one folder come in the
# same read, so a short hold still pairs them.
InotifyMoveEventGrouper.delay = 0.02
CLOSED, CHANGED = "closed", "changed"


def is_waiting_name(name: str) -> bool:
    return name.startswith(".") or name.endswith(WAITING_SUFFIXES)


class _Hints(FileSystemEventHandler):
    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def on_closed(self, event: FileSystemEvent) -> None:
        self.intake.hint(event.src_path, CLOSED)

    def on_moved(self, event: FileSystemEvent) -> None:
        self.intake.hint(event.dest_path, CLOSED)

    def on_created(self, event: FileSystemEvent) -> None:
        self.intake.hint(event.src_path, CHANGED)

    def on_modified(self, event: FileSystemEvent) -> None:
        self.intake.hint(event.src_path, CHANGED)


class Intake:
    def __init__(self, inbox: Path, settle: float, wake: Callable[[], None] = lambda: None) -> None:
        self.inbox, self.settle, self.wake = inbox, settle, wake
        self._lock = threading.Lock()
        self._hints: dict[str, str] = {}
        self._candidates: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, first seen so)
        self._taken: set[str] = set()
        self._observer = None

    # -- observer thread -------------------------------------------------------------------
    def hint(self, path: str | bytes, kind: str) -> None:
        path = os.fsdecode(path)
        if os.path.dirname(path) != str(self.inbox):
            return
        with self._lock:
            if self._hints.get(os.path.basename(path)) != CLOSED:
                self._hints[os.path.basename(path)] = kind
        self.wake()

    # -- main loop -------------------------------------------------------------------------
    def start(self, watch: bool = True) -> None:
        if watch:
            # Full events: a file renamed in from an unwatched folder arrives as a move (complete),
            # not as a create (which would wait for settle_seconds).
            self._observer = InotifyObserver(generate_full_events=True)
            self._observer.schedule(_Hints(self), str(self.inbox), recursive=False)
            self._observer.start()
        self.rescan()

    def stop(self) -> None:
        if self._observer:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def rescan(self) -> None:
        """Consider every entry of the inbox (the listing is the truth)."""
        with os.scandir(self.inbox) as entries:
            names = [e.name for e in entries]
        with self._lock:
            for name in names:
                self._hints.setdefault(name, CHANGED)

    def take(self, now: float | None = None) -> list[Path]:
        """Entries that are ready now, each handed out once until `release`d."""
        now = time.time() if now is None else now
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
        return True if now - since >= self.settle and now - info.st_mtime >= self.settle else None

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
