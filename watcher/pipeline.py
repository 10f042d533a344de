"""One batch through the commit protocol: classify -> journal (durable) -> results -> moves.

`Pipeline.start` submits a batch's decoding to the worker pool and returns at once; `commit`
waits for it, classifies and commits. Splitting the two lets the service decode the next batch
while it classifies and commits this one.

Used by the service and by `--once --move`. Any exception from the journal, the results file or
a move (other than of a file deleted, or swapped for something else, meanwhile) propagates: the
caller stops, and the next start's `recover` completes the work.
"""

from __future__ import annotations

import os
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from model.checkpoint import Checkpoint
from model.files import Identity, file_identity, fsync_dir, readable_name
from model.inference import finish_batch, start_batch
from model.pool import DecodePool, PendingDecode
from watcher import log
from watcher.config import Config
from watcher.moves import move_no_clobber, unique_name
from watcher.results import ResultStore


def decode_pool(config: Config, **options: object) -> DecodePool:
    """The decode worker pool with the configured processes, time budget and memory limit."""
    batch = config.batch
    return DecodePool(batch.decode_processes, batch.decode_seconds, memory_mb=batch.decode_memory_mb, **options)


@dataclass
class Pipeline:
    """A batch's way from the inbox to done/ or failed/, through the config's rules, the decode
    pool and the results store. Each batch brings its checkpoint: a reload swaps it between
    batches."""

    config: Config
    pool: DecodePool
    store: ResultStore

    def start(self, paths: list[Path], checkpoint: Checkpoint) -> PendingDecode:
        """Submit the batch's decoding to the pool; returns at once."""
        return start_batch(paths, checkpoint, self.pool, self.config.faces, self.config.intake.max_file_bytes)

    def process(self, paths: list[Path], checkpoint: Checkpoint) -> list[dict]:
        """Classify, commit and move one batch; return its journal records."""
        return self.commit(self.start(paths, checkpoint), checkpoint)

    def commit(self, pending: PendingDecode, checkpoint: Checkpoint) -> list[dict]:
        """Wait for a started batch's decoding, classify it, commit and move it; return its journal records."""
        logger = log.get()
        started = time.monotonic()
        outcomes = finish_batch(pending, checkpoint, self.pool)
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        taken = {self.config.done: {readable_name(key) for key in self.store.current}, self.config.failed: set()}
        records, identities = [], []
        for outcome in outcomes:
            now_there = file_identity(outcome.path)
            if now_there is None:
                logger.warning("vanished", file=outcome.path.name)  # removed from the inbox by someone else
                continue
            if now_there != outcome.identity:
                # Replaced or rewritten under the same name since it was read: this answer is not the
                # new file's. Intake hands the new one out again once this batch releases the name.
                logger.info("replaced_while_classified", file=outcome.path.name)
                continue
            folder = self.config.done if outcome.prediction else self.config.failed
            name = unique_name(folder, outcome.path.name, taken[folder])
            taken[folder].add(readable_name(name))
            record = {
                "key": name,
                "status": "done" if outcome.prediction else "failed",
                "time": now,
                "source": str(outcome.path),
                "dest": str(folder / name),
                "sha256": outcome.sha256,
                "identity": list(outcome.identity),
                "checkpoint": checkpoint.version,
            }
            if outcome.prediction:
                record |= outcome.answer()
            else:
                record["reason"] = outcome.error
            records.append(record)
            identities.append(outcome.identity)
        level = self.config.logging.answers

        def log_answers() -> None:  # once they are durable: a line logged is an answer kept
            for record in records:
                _log_answer(record, level)

        self.store.commit(records, on_durable=log_answers)
        for record, identity in zip(records, identities, strict=True):
            _move(Path(record["source"]), Path(record["dest"]), identity, record["key"])
        for folder in {self.config.done, self.config.failed}:
            fsync_dir(folder)
        with suppress(FileNotFoundError):  # an inbox deleted meanwhile (the service waits for a new one)
            fsync_dir(self.config.inbox)
        rotated = self.store.rotate_if_full()
        if rotated:
            logger.info("rotated", number=rotated)
        if records:
            logger.info(
                "batch",
                count=len(records),
                failed=sum(r["status"] == "failed" for r in records),
                ms=round((time.monotonic() - started) * 1000, 1),
                checkpoint=checkpoint.version,
            )
        return records


def _log_answer(record: dict, level: str) -> None:
    logger, file = log.get(), Path(record["source"]).name
    if record["status"] == "done":
        getattr(logger, level)(
            "answered",
            file=file,
            label=record["label"],
            probability=record["probability"],
            faces=len(record["faces"]),
            moved_to=record["dest"],
        )
    else:
        logger.warning("failed", file=file, reason=record["reason"], moved_to=record["dest"])


def _move(source: Path, dest: Path, identity: Identity | None, key: str) -> None:
    """Move a committed file to its destination. Between the identity check and the rename, whoever
    may write into the inbox can swap something else in under the file's name (a folder, a
    symlink): that is never left in done/ or failed/, and never stops the service."""
    logger = log.get()
    try:
        move_no_clobber(source, dest)
    except FileNotFoundError:
        if os.path.lexists(source):
            raise  # the destination folder is gone: not something to go on from
        logger.warning("vanished_before_move", file=source.name, result_kept=key)
        return
    except OSError:
        if file_identity(source) == identity:
            raise  # the file itself cannot be moved: not something to go on from
        logger.warning("replaced_before_move", file=source.name, result_kept=key)  # e.g. a folder we may not rename
        return
    moved = file_identity(dest)
    if moved is None or identity is None or moved[:4] != identity[:4]:  # all but the ctime, which the rename set
        move_no_clobber(dest, source.parent / unique_name(source.parent, source.name))
        logger.warning("replaced_before_move", file=source.name, result_kept=key)
