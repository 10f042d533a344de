"""Hot reload of the checkpoint: notice a change, load and check it off the main loop, hand it over.

The checkpoint's folder is watched (inotify), so a change wakes the main loop at once; a slow
poll is the fallback. The main loop calls `step` each turn: it looks at the file when due (one
stat), and a file is loaded only once it has held still between two looks; loading and the
canary forward pass run in a background thread, so batches keep flowing. `step` hands back a
loaded model, which the loop swaps in between batches, and when it wants to be asked again. A
file that fails any check is refused (logged here) and the old model keeps serving.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from model import checkpoint as ckpt
from model.files import Identity, file_identity
from watcher import log
from watcher.inotify import FolderWatch

RECHECK_SECONDS = 0.5  # a changed checkpoint must hold still this long before it is loaded


def load_checked(path: Path, precision: str, serving: ckpt.Checkpoint) -> ckpt.Checkpoint:
    """ckpt.load (which also runs a canary forward pass) for a reload: a checkpoint that would
    change the answers' vocabulary under the running service is refused too."""
    checkpoint = ckpt.load(path, precision)
    if checkpoint.class_names != serving.class_names:
        raise ckpt.CheckpointError(
            f"checkpoint {path}: class names {checkpoint.class_names} differ from the serving model's {serving.class_names}"
        )
    return checkpoint


def _folder_identity(folder: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def signature(path: Path) -> Identity | None:
    """What tells one checkpoint file (through any symlinks) from its replacement, a chmod-ed one
    included (a refused file made readable is tried again): model.files.file_identity."""
    return file_identity(path, follow_symlinks=True)


class Reloader:
    def __init__(
        self,
        path: Path,
        precision: str,
        serving: ckpt.Checkpoint,
        wake: Callable[[], None] = lambda: None,
        poll_seconds: float = 5.0,
        loaded_signature: Identity | None = None,
    ) -> None:
        """`loaded_signature`: the file's signature taken before `serving` was read from it, so that
        a file replaced while the service started is loaded too; by default, the file's now."""
        self.path, self.precision, self.wake = path, precision, wake
        self.serving = serving
        self.poll_seconds = poll_seconds
        self._next_look = time.monotonic() + poll_seconds
        self._last_seen = signature(path)
        self._loaded_signature = loaded_signature or self._last_seen
        self._thread: threading.Thread | None = None
        self._result: ckpt.Checkpoint | Exception | None = None
        self._watch: FolderWatch | None = None
        self._watching = False  # asked to watch (the folder may be missing for a while)
        self._watched_folder: tuple[int, int] | None = None
        self.hinted = False  # set by the watch thread: the file may have changed

    def start_watching(self) -> None:
        """Watch the checkpoint's folder. An inotify watch follows the folder itself, so when the
        folder is deleted or swapped for another (a release-style `mv`), `poll` watches anew."""
        self._watching, self._watched_folder = True, _folder_identity(self.path.parent)
        if self._watched_folder is None:
            return  # no folder to watch yet: polls look for it
        try:
            self._watch = FolderWatch(self.path.parent, self._on_hints, self._on_look_again)
        except OSError as exc:  # gone again, no permission, out of inotify watches: polls go on
            log.get().warning("checkpoint_watch_failed", folder=str(self.path.parent), reason=str(exc))
            self._watched_folder = None  # the next poll tries again

    def _on_hints(self, names: dict[str, str]) -> None:
        if self.path.name in names:
            self._on_look_again()

    def _on_look_again(self, gone: bool = False) -> None:
        """Watch thread: the file may have changed, or the folder itself went away (`gone`: its
        watch is dead even where a new folder gets the same inode, so the next poll watches anew)."""
        if gone:
            self._watched_folder = None
        self.hinted = True
        self.wake()

    def stop_watching(self) -> None:
        self._watching = False
        if self._watch:
            self._watch.stop()
            self._watch = None

    def step(self, now: float, sighup: bool = False) -> tuple[ckpt.Checkpoint | None, float]:
        """One turn of the main loop: look at the file when due, at once after a hint from the
        watch or on SIGHUP (which loads even an unchanged file), and collect a finished load.
        Returns the checkpoint to swap in, or None, and the time (monotonic) to be asked again."""
        if self.hinted:
            self.hinted = False
            self._next_look = min(self._next_look, now + RECHECK_SECONDS)
        if sighup or now >= self._next_look:
            if self.poll(force=sighup):
                log.get().info("reload_start", path=str(self.path), reason="SIGHUP" if sighup else "changed")
            elif sighup and self.loading:  # say why a SIGHUP did nothing
                log.get().info("reload_already_running", path=str(self.path))
            elif sighup:
                self._refused("file not found or not accessible")
            self._next_look = now + (RECHECK_SECONDS if self.changing else self.poll_seconds)
        old, result = self.serving, self.collect()
        if isinstance(result, ckpt.Checkpoint):
            log.get().info("reload", old=old.version, new=result.version)
            return result, self._next_look
        if result is not None:
            self._refused(str(result))
        return None, self._next_look

    def _refused(self, reason: str) -> None:
        log.get().error("reload_refused", path=str(self.path), reason=reason, serving=self.serving.version)

    @property
    def loading(self) -> bool:
        """A load has started and its result has not been collected yet."""
        return self._thread is not None

    @property
    def changing(self) -> bool:
        """A change was seen that has not been loaded (or refused) yet: look again soon. A missing
        file is not a change: the slow poll looks for it."""
        return self._last_seen not in (None, self._loaded_signature)

    def poll(self, force: bool = False) -> bool:
        """Start a background load if the file changed and held still since the last poll (or if forced)."""
        if self._watching and _folder_identity(self.path.parent) != self._watched_folder:
            self.stop_watching()
            self.start_watching()
        seen = signature(self.path)
        stable, self._last_seen = seen == self._last_seen, seen
        if self._thread is not None or seen is None:
            return False
        if not force and (not stable or seen == self._loaded_signature):
            return False
        self._loaded_signature = seen  # refused files are not retried until they change again
        self._thread = threading.Thread(target=self._load, name="checkpoint-reload", daemon=True)
        self._thread.start()
        return True

    def _load(self) -> None:
        try:
            self._result = load_checked(self.path, self.precision, self.serving)
        except Exception as exc:  # anything wrong with the file is a refusal, never a crash
            self._result = exc
        self.wake()

    def collect(self) -> ckpt.Checkpoint | Exception | None:
        """The finished load: a new checkpoint to swap in, the error that refused it, or None."""
        if self._thread is None or self._result is None:  # the thread sets its result before it wakes the loop
            return None
        self._thread = None
        result, self._result = self._result, None
        if isinstance(result, ckpt.Checkpoint):
            self.serving = result
        return result
