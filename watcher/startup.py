"""Start-up shared by the service and `--once --move`: the paths checked, one instance per journal
and per inbox (locks), the checkpoint loaded, the results recovered and the moves that a crash
interrupted completed."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from model import checkpoint as ckpt
from model.files import file_identity, fsync_dir
from watcher import log
from watcher.config import Config, check_service_paths
from watcher.moves import move_no_clobber
from watcher.results import ResultStore

LOCK_NAME = ".gender-watcher.lock"  # beside the journal (instance_lock)
INBOX_LOCK_NAME = ".gender-watcher.{inbox}.lock"  # beside the inbox, in the folder that holds it


class StartupError(RuntimeError):
    """Start-up cannot go on; the message says why."""


@contextmanager
def instance_lock(config: Config) -> Iterator[None]:
    """Exclusive locks held for the life of the service or a --once --move pass: one instance per
    journal, and one per inbox (two configurations with different results folders on one inbox
    would answer its files twice).

    The journal's lock file lives beside it, in a folder that only the service writes; the inbox
    will not do: whoever may write into it could delete or replace the file, or hold a lock on
    it and so keep the service from ever starting again. The inbox's lock lives beside the inbox,
    in the folder that holds it, and counts only when it is a regular file of the service's own
    user: one that someone else made there cannot keep the service out (it is named in a
    warning), nor can a folder the service may not write into (a warning, too)."""
    with ExitStack() as held:
        held.callback(os.close, _lock(config.journal.parent / LOCK_NAME, f"is working {config.journal}"))
        inbox_lock = config.inbox.parent / INBOX_LOCK_NAME.format(inbox=config.inbox.name)
        try:
            held.callback(os.close, _lock(inbox_lock, f"is serving the inbox {config.inbox}", own_only=True))
        except _LockNotTaken as exc:
            log.get().warning(
                "inbox_lock_not_taken",
                lock=str(inbox_lock),
                reason=str(exc),
                risk="a second service on this inbox would not be refused",
            )
        yield


class _LockNotTaken(Exception):
    """The inbox's lock file cannot be used; the message says why."""


def _lock(path: Path, holder_is: str, own_only: bool = False) -> int:
    """Open, lock and fill in (pid) the lock file at `path`; the open descriptor holds the lock.
    Raises StartupError where another instance holds it; where the file cannot be used, also
    StartupError, or _LockNotTaken with `own_only` (see instance_lock)."""
    refuse = _LockNotTaken if own_only else StartupError
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise refuse(f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"the lock file {path} is not a regular file")
        if own_only and info.st_uid != os.geteuid():
            raise refuse(f"the lock file {path} belongs to user {info.st_uid}, not to this service's")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise StartupError(f"another gender-watcher (pid {holder}) {holder_is} (lock {path})") from None
        with suppress(OSError):  # the pid only informs (a full disk): the lock is what counts
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_store(config: Config) -> ResultStore:
    """Recover the results and finish moves that a crash interrupted."""
    store = ResultStore(config.results, config.journal, config.rotation.max_bytes)
    moved = complete_moves(store.recover())
    if moved:
        log.get().info("recovered", moved=moved)
    return store


def complete_moves(records: list[dict]) -> int:
    """After a crash: move the files whose result is durable but which are still in the inbox.
    Only the very file that was classified (its identity recorded) is moved: the same photo
    dropped again under the same name later is a new arrival, which intake takes."""
    moved = 0
    for record in records:
        source, dest = Path(record["source"]), Path(record["dest"])
        if not os.path.lexists(source) or os.path.lexists(dest):
            continue
        identity = file_identity(source)
        if identity is None or list(identity) != record.get("identity"):
            continue
        move_no_clobber(source, dest)
        moved += 1
    if moved:
        for folder in {Path(r["source"]).parent for r in records} | {Path(r["dest"]).parent for r in records}:
            fsync_dir(folder)
    return moved


@contextmanager
def serving(config: Config, inbox_may_be_missing: bool = False) -> Iterator[tuple[ckpt.Checkpoint, ResultStore]]:
    """The checkpoint and the recovered results store, with the instance locks held until the
    end, when the store is closed. Raises StartupError, ckpt.CheckpointError, ConfigError (the
    paths) or JournalError (recovery) with the reason."""
    check_service_paths(config, inbox_may_be_missing=inbox_may_be_missing)
    with instance_lock(config):
        checkpoint = ckpt.load(config.checkpoint, config.batch.precision)
        store = open_store(config)
        try:
            yield checkpoint, store
        finally:
            store.close()
