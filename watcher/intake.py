"""Which inbox entries are ready to be classified.

The directory listing is the truth; watch events are hints that make it fast. A file is ready:
- on a close-after-write event or when renamed into the inbox (the writer is done), or
- when its size and mtime have not changed for `settle` seconds of watching (writers inotify
  cannot see, lost events, files already there at start), or for UNCLOSED_SETTLE seconds where
  the watch saw it created and not yet closed: a writer that pauses (a slow upload) still holds
  it open, and only a hard link is created without a close. Only the service's own monotonic
  clock counts: an mtime in the future (a camera's clock, `rsync -t` from a machine ahead) or a
  step of the system clock does not hold a file back.
Names that are hidden or temporary (.*, *.part, *.crdownload, *.tmp, ... see WAITING_SUFFIXES)
wait until renamed. Sub-folders are left alone. Symlinks, FIFOs, sockets and devices are ready
at once, without waiting to settle: the pipeline quarantines them in failed/ without reading them.

The inbox is watched with inotify (watcher.inotify). The watch thread only records hints and
calls `wake`; all decisions are made by the service's main loop through `take`.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watcher import log
from watcher.inotify import CHANGED, CLOSED, OPENED, FolderWatch

# Firefox and curl write .part, Chrome and Edge .crdownload, some tools .partial.
WAITING_SUFFIXES = (".part", ".partial", ".crdownload", ".tmp", "~")
MISSING_RECHECK = 1.0  # seconds between looks for an inbox that is missing
UNCLOSED_SETTLE = 60.0  # seconds unchanged before a file created under the watch, never closed, is taken


def is_waiting_name(name: str) -> bool:
    return name.startswith(".") or name.endswith(WAITING_SUFFIXES)


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
        problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        """`rescan_seconds`: how often a full listing is due; `watch`: with inotify hints;
        `problem`: why the folder found at the inbox's path cannot be served (None: it can), asked
        whenever a folder appears there."""
        self.inbox, self.settle, self.rescan_seconds, self.wake = inbox, settle, rescan_seconds, wake
        self.problem = problem
        self._use_watch = watch
        self._lock = threading.Lock()
        self._hints: dict[str, str] = {}
        # name -> (size, mtime_ns, first seen so, seconds it must stay so)
        self._candidates: dict[str, tuple[int, int, float, float]] = {}
        self._taken: set[str] = set()
        self._watch: FolderWatch | None = None
        self._watched: tuple[int, int] | None = None  # (device, inode) of the folder listed last
        self._last_rescan = 0.0
        self._look_again = False  # set by the watch thread
        self._watch_gone = False  # set by the watch thread: the watched folder went away
        self._watch_failed = False  # the last try to watch the folder failed: said once, not at each retry
        self.missing = False  # no usable inbox: looked for every MISSING_RECHECK seconds
        self._missing_why: tuple[str, str | None] | None = None  # the log event said for it

    # -- watch thread ----------------------------------------------------------------------
    def hint(self, hints: dict[str, str]) -> None:
        """Names that may be ready: CLOSED (written and closed, or renamed in), OPENED or CHANGED."""
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
            identity = (info.st_dev, info.st_ino)
            if identity != self._watched and (problem := self.problem()):
                self._set_missing("inbox_unusable", problem)
                return
            if identity != self._watched or self._watch_gone or (self._use_watch and self._watch is None):
                self._watch_folder(identity)  # a new folder, a dead watch, or one that could not be set up
            with os.scandir(self.inbox) as entries:
                names = [e.name for e in entries]
        except (FileNotFoundError, NotADirectoryError):
            self._set_missing("inbox_missing", None)
            return
        except OSError as exc:  # no permission to list it, an I/O error: wait for it as for a missing one
            self._set_missing("inbox_unreadable", exc.strerror or str(exc))
            return
        if self.missing:
            log.get().info("inbox_back", inbox=str(self.inbox))
            self.missing, self._missing_why = False, None
        with self._lock:
            for name in names:
                self._hints.setdefault(name, CHANGED)
        self.wake()

    def _set_missing(self, event: str, reason: str | None) -> None:
        """No usable inbox: stop watching, look again every MISSING_RECHECK s; say so once per cause."""
        if self._missing_why != (event, reason):
            why = {"reason": reason} if reason else {}
            log.get().error(event, inbox=str(self.inbox), **why, action=f"looking again every {MISSING_RECHECK:g} s")
            self._missing_why = (event, reason)
        self.missing = True
        self.stop()
        self._watched = None

    def _watch_folder(self, identity: tuple[int, int]) -> None:
        if self._watched is not None and (identity != self._watched or self._watch_gone):
            log.get().warning("inbox_replaced", inbox=str(self.inbox), action="watching the new folder")
        self.stop()
        self._watch_gone = False
        self._watched = identity
        if self._use_watch:
            try:
                self._watch = FolderWatch(self.inbox, self.hint, self.look_again)
                self._watch_failed = False
            except OSError as exc:  # out of inotify watches or descriptors: the full listings go on
                if not self._watch_failed:
                    action = f"finding files by a full listing every {self.rescan_seconds:g} s, trying to watch at each"
                    log.get().warning("inbox_watch_failed", inbox=str(self.inbox), reason=str(exc), action=action)
                self._watch_failed = True  # the next listing tries again (see rescan)

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
            elif kind == OPENED:
                self._candidates[name] = (-1, -1, now, max(UNCLOSED_SETTLE, self.settle))  # or its writer's close
            else:
                self._candidates.setdefault(name, (-1, -1, now, self.settle))
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
        size, mtime, since, quiet = self._candidates[name]
        if (info.st_size, info.st_mtime_ns) != (size, mtime):
            self._candidates[name] = (info.st_size, info.st_mtime_ns, now, quiet)
            return None
        return True if now - since >= quiet else None

    def _is_file_like(self, name: str) -> bool:
        try:
            return not stat.S_ISDIR(os.lstat(self.inbox / name).st_mode)
        except FileNotFoundError:
            return False

    def release(self, paths: list[Path]) -> None:
        """The pipeline is done with these; their names may be taken again. Each is looked at once
        more: one still in the inbox was changed while it was classified (rewritten, or only
        touched or chmod-ed, which sends no event), and its answer was not kept."""
        names = {p.name for p in paths}
        self._taken -= names
        with self._lock:
            for name in names:
                self._hints.setdefault(name, CHANGED)
        self.wake()

    def waiting(self) -> bool:
        """Whether some candidates need another look."""
        return bool(self._candidates)
