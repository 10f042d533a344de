"""Running a source through the classifier on Ray Data: a local Ray started for the run, or an
existing cluster joined with `address`.

    listing (here) -> blocks of `batch_size` paths -> Classifier actors (read, decode, find faces,
    classify) -> rows back here -> OutputFolder

The listing and the writing run in this process, not as Ray tasks, so actors that take every
CPU cannot starve them. Ray re-runs the batch of an actor that dies, on a restarted actor, at
most RETRIES times; rows of a file seen twice are kept once, and a file left without rows fails
the run.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import structlog
from pyarrow import fs as pafs

from model import checkpoint as ckpt
from model.files import readable_name
from model.pool import usable_cpus
from model.progress import Progress
from watcher import log
from watcher.bulk.output import OutputFolder, RunSummary
from watcher.bulk.rows import Classifier
from watcher.bulk.sources import list_files, open_location
from watcher.config import Config

RETRIES = 3  # restarts of a dead actor, and re-runs of the batch it was on
DEFAULT_OBJECT_STORE_MB = 256  # a local Ray's object store: paths and rows only pass through it


class EngineError(RuntimeError):
    """Ray failed the run, or a file was left without rows."""


@dataclass(frozen=True)
class BulkRun:
    """What to run: where from and to, and how."""

    source: str
    output: str
    config: Config  # face rules, batch size and the decode budget, as for --once
    checkpoint: Path
    workers: int | None = None  # actors; default one per CPU
    batch_size: int | None = None  # default config.batch.max_size
    address: str | None = None  # an existing Ray cluster; default a local Ray for the run
    fmt: str = "parquet"
    resume: bool = False
    object_store_mb: int = DEFAULT_OBJECT_STORE_MB


def start_ray(address: str | None, object_store_mb: int) -> None:
    """Join the cluster at `address`, or start a local Ray with every CPU here and a capped
    object store. Ray's usage statistics stay off unless RAY_USAGE_STATS_ENABLED says otherwise."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own C++ logs would print an error-level notice at each actor's start (its constructor
    # arguments are in the object store); its failures reach us as exceptions.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    chosen = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ)
    if not address and not chosen and "ray" not in sys.modules:  # Ray reads these once, when imported
        # Token authentication on, as Ray has it by default, but with a token for this run only:
        # Ray would otherwise write one into the home folder (~/.ray/auth_token).
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    import ray

    common = {"logging_level": logging.ERROR, "log_to_driver": False, "configure_logging": True}
    on_sigterm = signal.getsignal(signal.SIGTERM)  # ray.init sets one that exits at once, without cleaning up
    if address:
        ray.init(address=address, **common)
    else:
        # "local": a new Ray even where RAY_ADDRESS or a `ray start` on this machine names another
        ray.init(
            address="local", num_cpus=usable_cpus(), object_store_memory=object_store_mb << 20, include_dashboard=False, **common
        )
    signal.signal(signal.SIGTERM, on_sigterm)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is drawn here, from the rows that arrive
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices (progress bars off, ...) are not ours to show


def run(job: BulkRun) -> RunSummary:
    """Classify every file of the source that the output does not hold yet. The checkpoint,
    source and output are checked first; then Ray is started (start_ray) unless it is up
    already. Raises SourceError, CheckpointError or EngineError."""
    logger = log.get()
    started = time.monotonic()
    checkpoint_bytes = ckpt.read_bytes(job.checkpoint)
    version = ckpt.loads(checkpoint_bytes, str(job.checkpoint), job.config.batch.precision).version
    source_fs, source_root = open_location(job.source)
    output = OutputFolder(job.output, job.fmt, job.resume)
    try:  # from here on a run that does not finish removes its staging folder
        done = output.done_paths()
        todo, twins = _one_per_name(p for p in list_files(source_fs, source_root) if readable_name(p) not in done)
        summary = RunSummary(
            output.run, job.source, version, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), skipped=len(done)
        )
        for twin in twins:
            reason = "another file's name reads the same: rename one of them"
            summary.files, summary.failed = summary.files + 1, summary.failed + 1
            summary.failures[reason] = summary.failures.get(reason, 0) + 1
            logger.warning("failed", file=readable_name(twin), file_hex=os.fsencode(twin).hex(), reason=reason)
        if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
            start_ray(job.address, job.object_store_mb)  # first: it sets the environment Ray reads when imported
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = job.workers or cpus
        logger.info("bulk_start", source=job.source, files=len(todo), skipped=len(done), workers=workers, checkpoint=version)
        progress = Progress(len(todo), "classifying")
        first_rows_at, first_files = 0.0, 0
        for rows in _classified(todo, job, checkpoint_bytes, source_fs, source_root, workers, min(1.0, cpus / workers)):
            output.write(rows)
            progress.advance(_count(rows, summary, logger))
            if not first_rows_at:
                first_rows_at, first_files = time.monotonic(), summary.files
        if summary.files != len(todo) + len(twins):
            raise EngineError(f"{len(todo) + len(twins) - summary.files} of {len(todo)} files came back without rows")
        now = time.monotonic()
        summary.wall_seconds = round(now - started, 2)
        if first_rows_at:
            summary.startup_seconds = round(first_rows_at - started, 2)
            summary.files_per_second = round((summary.files - first_files) / max(now - first_rows_at, 1e-9), 1)
        output.finish(summary)
    except BaseException:
        output.abandon()
        raise
    logger.info(
        "bulk_done",
        files=summary.files,
        answered=summary.answered,
        failed=summary.failed,
        seconds=summary.wall_seconds,
        files_per_second=summary.files_per_second,
        output=job.output,
    )
    return summary


def _one_per_name(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """The paths whose readable form (the rows' `path`) is the first of its kind, and the others:
    a name not in UTF-8 can read the same as another file's, and rows tell files apart by it."""
    kept: dict[str, str] = {}
    twins = []
    for path in paths:
        name = readable_name(path)
        if name in kept:
            twins.append(path)
        else:
            kept[name] = path
    return list(kept.values()), twins


def _classified(
    todo: list[str], job: BulkRun, checkpoint: bytes, filesystem: pafs.FileSystem, root: str, workers: int, actor_cpus: float
) -> Iterator[pa.Table]:
    """The rows of `todo`, a batch at a time as the actors finish them; a file's rows that come
    back a second time (a batch re-run after its actor died) are dropped."""
    import ray

    if not todo:
        return
    config = job.config
    # Batches no larger than a fair share, so that a small run still keeps every actor busy.
    size = max(1, min(job.batch_size or config.batch.max_size, -(-len(todo) // workers)))
    paths = pa.table({"path": [readable_name(p) for p in todo], "key": [os.fsencode(p) for p in todo]})
    dataset = ray.data.from_arrow([paths.slice(i, size) for i in range(0, len(todo), size)])
    classifier_args = {
        "checkpoint": checkpoint,
        "root": root,
        "filesystem": filesystem,
        "rules": config.faces,
        "precision": config.batch.precision,
        "decode_seconds": config.batch.decode_seconds,
        "decode_memory_mb": config.batch.decode_memory_mb,
        "max_bytes": config.intake.max_file_bytes,
    }
    with warnings.catch_warnings():  # Ray takes finite restarts only as ray_remote_args, which it warns about
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*", category=DeprecationWarning)
        rows = dataset.map_batches(
            Classifier,
            fn_constructor_kwargs=classifier_args,
            batch_size=size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=actor_cpus,
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
        )
    seen: set[str] = set()
    try:
        for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
            files = set(batch.column("path").to_pylist())
            if again := files & seen:
                batch = batch.filter(pc.invert(pc.is_in(batch["path"], pa.array(sorted(again)))))
            seen |= files
            if batch.num_rows:
                yield batch
    except ray.exceptions.RayError as exc:
        raise EngineError(f"Ray stopped the run: {_last_line(exc)}") from None


def _count(rows: pa.Table, summary: RunSummary, logger: structlog.typing.FilteringBoundLogger) -> int:
    """Add a batch's rows to the summary, log its failed files; how many files it holds."""
    failed = rows.filter(pc.is_null(rows["face"]))
    files = pc.count_distinct(rows["path"]).as_py()
    summary.files += files
    summary.failed += failed.num_rows
    summary.answered += files - failed.num_rows
    summary.faces += rows.num_rows - failed.num_rows
    for path, reason in zip(failed["path"].to_pylist(), failed["error"].to_pylist(), strict=True):
        summary.failures[reason] = summary.failures.get(reason, 0) + 1
        logger.warning("failed", file=path, reason=reason)
    return files


def _last_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]


def stop_ray() -> None:
    """Shut down what start_ray started (a cluster joined is only left)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
