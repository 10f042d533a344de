"""The output folder of bulk runs: parts written to a staging folder, put in place when the run
is done, and a `_SUCCESS` summary.

A run writes `part-<run>-<n>.parquet` (or `.jsonl`) files into `<OUT>.incomplete-<run>` beside
OUT. When every file has its rows, a first run renames the staging folder to OUT; a `--resume`
run moves its parts into OUT and then replaces `_SUCCESS`. Readers of OUT (pyarrow, pandas,
Spark) skip names that start with "_", so they see only finished parts; a run that stops
before the end leaves OUT as it was, unless it stops while its parts move in (one at a time on
an object store, and on `--resume`): then `--resume` goes on from the parts that arrived.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from watcher.bulk.rows import SCHEMA
from watcher.bulk.sources import SourceError, open_location

FORMATS = ("parquet", "jsonl")
SUMMARY = "_SUCCESS"
ROWS_PER_PART = 100_000


@dataclass
class RunSummary:
    """What one run did; `_SUCCESS` lists every run that wrote into the folder."""

    run: str
    source: str
    checkpoint: str
    started: str  # ISO 8601, UTC
    files: int = 0  # classified in this run
    answered: int = 0
    failed: int = 0
    faces: int = 0
    skipped: int = 0  # already in the folder (--resume)
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0  # from the start to the first rows back: Ray, actors, model loading
    files_per_second: float = 0.0  # after start-up: the files after the first batch, over the time they took
    failures: dict[str, int] = field(default_factory=dict)  # reason -> files


class OutputFolder:
    """OUT, opened for one run, its staging folder made. Raises SourceError when OUT cannot be
    used: it is a file, it cannot be listed or written beside, or it holds an earlier run's output
    and `resume` is not set."""

    def __init__(self, uri: str, fmt: str, resume: bool) -> None:
        if fmt not in FORMATS:
            raise SourceError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.uri, self.fmt = uri, fmt
        self.fs, self.root = open_location(uri)
        kind = self._kind(self.root)
        if kind == pafs.FileType.File:
            raise SourceError(f"{uri} is a file; the output is a folder")
        # Listed once: parts and a summary of earlier runs are output; other entries (.DS_Store,
        # lost+found) are not.
        listed = self._entries(self.root) if kind == pafs.FileType.Directory else []
        self._earlier = [f for f in listed if f.base_name == SUMMARY or f.base_name.startswith("part-")]
        self.has_output = bool(self._earlier)
        if self.has_output and not resume:
            raise SourceError(
                f"{uri} already holds output: pass --resume to add the files not in it yet, or choose another folder"
            )
        previous = self._read_summary() if self.has_output else {"runs": [], "format": fmt}
        if previous.get("format") != fmt:
            raise SourceError(f"{uri} holds {previous.get('format')} parts; resume it with --format {previous.get('format')}")
        self.previous_runs: list[dict] = previous["runs"]
        self.run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        self.staging = f"{self.root}.incomplete-{self.run}"
        self._parts: list[str] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._check_writable()

    def _check_writable(self) -> None:
        """Write into the staging folder now, so that a place that cannot be written (no permission,
        a bucket that does not exist or a bucket's top as OUT) is refused before any file is classified."""
        probe = f"{self.staging}/_probe"
        try:
            self.fs.create_dir(self.staging, recursive=True)
            with self.fs.open_output_stream(probe) as stream:
                stream.write(b"")
            self.fs.delete_file(probe)
        except OSError as exc:
            self.abandon()
            raise SourceError(f"{self.uri}: cannot write the output beside it, in {self.staging}: {exc}") from None

    def _kind(self, path: str) -> pafs.FileType:
        try:
            return self.fs.get_file_info(path).type
        except OSError as exc:
            raise SourceError(f"{path}: {exc}") from None

    def _entries(self, folder: str) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        except OSError as exc:
            raise SourceError(f"{folder}: cannot list it: {exc}") from None

    def _read_summary(self) -> dict:
        """`_SUCCESS`; where there are parts and none (a run stopped while it moved its parts into
        OUT one object at a time), the parts' format and no earlier runs, so that `--resume` goes on
        from the parts that arrived."""
        if SUMMARY not in (names := [f.base_name for f in self._earlier]):
            return {"runs": [], "format": names[0].rsplit(".", 1)[-1]}
        try:
            with self.fs.open_input_stream(f"{self.root}/{SUMMARY}") as stream:
                return json.loads(stream.read())
        except (OSError, ValueError) as exc:
            raise SourceError(f"{self.uri}: cannot resume: no readable {SUMMARY} ({exc})") from None

    def done_paths(self) -> set[str]:
        """The source paths that already have rows in OUT."""
        done: set[str] = set()
        parts = sorted(f.path for f in self._earlier if f.base_name.startswith("part-") and f.base_name.endswith(f".{self.fmt}"))
        for part in parts:
            try:
                if self.fmt == "parquet":
                    done.update(pq.read_table(part, columns=["path"], filesystem=self.fs).column("path").to_pylist())
                else:
                    with self.fs.open_input_stream(part) as stream:
                        done.update(json.loads(line)["path"] for line in stream.read().splitlines() if line.strip())
            except (OSError, ValueError, KeyError, TypeError) as exc:  # ArrowInvalid and JSON errors are ValueErrors
                raise SourceError(f"{part}: cannot resume: the paths it holds cannot be read ({exc!r})") from None
        return done

    def write(self, rows: pa.Table) -> None:
        """Add rows; they reach a part file of the staging folder every ROWS_PER_PART rows."""
        self._pending.append(rows)
        self._pending_rows += rows.num_rows
        if self._pending_rows >= ROWS_PER_PART:
            self._flush()

    def _flush(self) -> None:
        table = pa.concat_tables(self._pending) if self._pending else SCHEMA.empty_table()
        self._pending, self._pending_rows = [], 0
        name = f"{self.staging}/part-{self.run}-{len(self._parts):05d}.{self.fmt}"
        with self.fs.open_output_stream(name) as stream:
            if self.fmt == "parquet":
                pq.write_table(table, stream)
            else:
                for row in table.to_pylist():
                    stream.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
        self._parts.append(name)

    def finish(self, summary: RunSummary) -> None:
        """Write what is pending (an empty part for a first run without rows, so that the schema is
        on record), then put the parts in place and write `_SUCCESS`."""
        if self._pending or not (self._parts or self.has_output):
            self._flush()
        runs = [*self.previous_runs, asdict(summary)]
        totals = {key: sum(r.get(key, 0) for r in runs) for key in ("files", "answered", "failed", "faces")}
        text = json.dumps({**totals, "format": self.fmt, "runs": runs}, indent=2) + "\n"
        with self.fs.open_output_stream(f"{self.staging}/{SUMMARY}") as stream:
            stream.write(text.encode())
        if not self.has_output and self._kind(self.root) == pafs.FileType.NotFound and _renames_folders(self.fs):
            self.fs.move(self.staging, self.root)
            return
        self.fs.create_dir(self.root, recursive=True)
        for part in self._parts:
            self.fs.move(part, f"{self.root}/{part.rsplit('/', 1)[1]}")
        self.fs.move(f"{self.staging}/{SUMMARY}", f"{self.root}/{SUMMARY}")  # last: it says the parts are there
        self.fs.delete_dir(self.staging)

    def abandon(self) -> None:
        """Remove the staging folder of a run that did not finish."""
        with contextlib.suppress(OSError):  # nothing staged yet
            self.fs.delete_dir(self.staging)


def _renames_folders(filesystem: pafs.FileSystem) -> bool:
    """Whether moving a folder is one rename (an object store moves object by object)."""
    return isinstance(filesystem, pafs.LocalFileSystem)
