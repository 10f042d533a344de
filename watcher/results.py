"""The rolling results file and the append-only journal behind it.

The journal (JSON lines, one record per handled file) is the source of truth; the results file
{"name.jpg": "female", ...} is derived from it and rewritten atomically after each batch. Each
entry is encoded once, when it is added; the file is written whole each time, which its size
limit (`rotation.max_bytes`) keeps cheap. When the results file reaches that limit, both become
numbered files (process_results.1.json and journal.1.jsonl, then .2, ...) and fresh ones begin;
the results file is never missing meanwhile.
Commit order: see RELIABILITY.md. `encode_results` is the file's format, also for `--once`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from model.files import fsync_dir, readable_name, write_atomic
from watcher import log

# A journal record is about 12 times the size of a results entry; a journal that grows past this
# many times max_bytes is mostly failed files, and rolls over by itself, so that one start-up never
# reads an unbounded journal.
JOURNAL_SHARE = 16


def numbered(path: Path, n: int) -> Path:
    """process_results.json -> process_results.<n>.json"""
    return path.with_name(f"{path.stem}.{n}{path.suffix}")


def rotated_numbers(path: Path) -> list[int]:
    pattern = re.compile(re.escape(path.stem) + r"\.(\d+)" + re.escape(path.suffix) + "$")
    return sorted(int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.match(p.name)))


class ResultStore:
    def __init__(self, results: Path, journal: Path, max_bytes: int) -> None:
        self.results, self.journal, self.max_bytes = results, journal, max_bytes
        self.current: dict[str, str] = {}
        self._entries = bytearray()  # self.current as the lines of the results file, without the braces
        self._journal_file = None

    def recover(self) -> list[dict]:
        """Finish an interrupted rotation, cut a torn journal tail, rebuild the results file from
        the journal. Returns the current journal's records (for completing unfinished moves).
        Raises JournalError where the journal cannot be read, or lacks answers that the results
        file holds (it was cut or replaced: rebuilding would drop them)."""
        rotated = self._finish_rotation()
        records, torn = _read_records(self.journal)
        # Mid-rotation the results file holds the numbered journal's answers (or none yet).
        self._check_results_covered(_labels(records) if rotated is None else rotated)
        if torn:
            _cut_torn_tail(self.journal, torn)
        self.current, self._entries = {}, bytearray()
        self._add(_labels(records))
        self._journal_file = open(self.journal, "ab")  # noqa: SIM115 (kept open for appends)
        fsync_dir(self.journal.parent)
        return records

    def _finish_rotation(self) -> dict[str, str] | None:
        """Complete a rotation that a crash interrupted, and return the labels of the journal it
        numbered; None where there was none. Its first step, renaming the journal to
        journal.N.jsonl, is its commit point: a newest numbered journal with no current journal is
        one, and its numbered results file, if missing, is made from the numbered journal."""
        journals = rotated_numbers(self.journal)
        if not journals or self.journal.exists():
            return None
        records, _torn = _read_records(numbered(self.journal, journals[-1]))
        if not numbered(self.results, journals[-1]).exists():
            write_atomic(numbered(self.results, journals[-1]), encode_results(_labels(records)))
        return _labels(records)

    def _check_results_covered(self, labels: dict[str, str]) -> None:
        """Each batch reaches the journal before the results file, so every answer in the results
        file is in the journal; one that is not was lost from the journal afterwards."""
        try:
            shown = json.loads(self.results.read_bytes())
        except (OSError, ValueError):
            return  # missing or damaged: it is derived, and rebuilt from the journal
        known = {readable_name(key) for key in labels}  # the results file's keys are readable names
        lacking = [key for key in shown if key not in known] if isinstance(shown, dict) else []
        if lacking:
            raise JournalError(
                f"{self.journal} lacks {len(lacking)} of the answers in {self.results} (the first: {lacking[0]!r}): "
                f"the journal was cut short, emptied or replaced since. Restore it, or move {self.results.name} "
                "away to go on from the journal as it is"
            )

    def commit(self, records: list[dict], on_durable: Callable[[], None] = lambda: None) -> None:
        """Append records and fsync: from here on they are durable, and `on_durable` is called.
        Then rewrite the results file."""
        if not records:
            return
        try:
            self._journal_file.write(b"".join(_json(r) + b"\n" for r in records))
            self._journal_file.flush()
            os.fsync(self._journal_file.fileno())
        except OSError as exc:  # name the file: "No space left on device" alone does not say where
            raise OSError(exc.errno, exc.strerror, str(self.journal)) from exc
        on_durable()
        self._add(_labels(records))

    def _add(self, labels: dict[str, str]) -> None:
        """Add labels and rewrite the results file: the bytes of json.dumps(current, indent=1)."""
        if labels.keys() & self.current.keys():  # a name labelled again replaces its entry: encode all anew
            self._entries = bytearray(_entry_lines(self.current | labels))
        elif labels:
            self._entries += (b",\n" if self._entries else b"") + _entry_lines(labels)
        self.current.update(labels)
        write_atomic(self.results, _enclose(self._entries))

    def rotate_if_full(self) -> int | None:
        """Roll both files over once the results file reaches max_bytes, or the journal JOURNAL_SHARE
        times that (it holds failed files too, which the results file does not); returns the new number."""
        journal_bytes = os.fstat(self._journal_file.fileno()).st_size
        if self.results.stat().st_size < self.max_bytes and journal_bytes < JOURNAL_SHARE * self.max_bytes:
            return None
        n = max(rotated_numbers(self.results) + rotated_numbers(self.journal) + [0]) + 1
        self._journal_file.close()
        os.rename(self.journal, numbered(self.journal, n))  # the commit point (see _finish_rotation)
        fsync_dir(self.journal.parent)
        # The full results file is written under its number, then replaced by an empty one
        # atomically: a reader always finds a complete results file at its name.
        write_atomic(numbered(self.results, n), _enclose(self._entries))
        self.current, self._entries = {}, bytearray()
        self._add({})
        self._journal_file = open(self.journal, "ab")  # noqa: SIM115
        fsync_dir(self.journal.parent)  # the new journal's name is durable before any record in it
        return n

    def close(self) -> None:
        if self._journal_file:
            with suppress(OSError):  # bytes still buffered were never committed (a failed append)
                self._journal_file.close()
            self._journal_file = None


class JournalError(ValueError):
    """A journal line that cannot be read, or a journal that lacks answers the results file
    holds: the service will not start on it (nothing is lost by waiting; guessing could drop or
    repeat answers)."""


def _read_records(journal: Path) -> tuple[list[dict], bytes]:
    """A journal's records, and its torn last line (no newline: a write cut short, never
    committed), b"" where there is none. Raises JournalError for a line that is not a record."""
    if not journal.exists():
        return [], b""
    data = journal.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    records = []
    for number, line in enumerate(good.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(exact_names(record).get("key"), str):
                raise ValueError("not an object with a 'key'")
            records.append(record)
        except (ValueError, TypeError, AttributeError) as exc:
            nul = f", and {line.count(0)} NUL bytes as a power cut leaves" if 0 in line else ""
            raise JournalError(
                f"{journal}, line {number}: not a journal record ({exc}{nul}); repair or remove that line to start"
            ) from None
    return records, data[len(good) :]


def _cut_torn_tail(journal: Path, torn: bytes) -> None:
    """Cut the torn last line off the journal, its bytes kept beside it (nothing is deleted that
    someone may want to read), and say so."""
    kept = journal.with_name(f"{journal.name}.torn-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    write_atomic(kept, torn)
    os.truncate(journal, journal.stat().st_size - len(torn))
    log.get().warning(
        "journal_tail_cut",
        journal=str(journal),
        bytes=len(torn),
        kept_in=str(kept),
        reason="a last line without its newline: a write cut short; its files are answered again",
    )


def exact_names(record: dict) -> dict:
    """A journal record as it was before _json: its names with their exact bytes."""
    for field in NAME_FIELDS:
        if f"{field}_hex" in record:
            record[field] = os.fsdecode(bytes.fromhex(record.pop(f"{field}_hex")))
    return record


def _labels(records: list[dict]) -> dict[str, str]:
    """{key: label} of the classified files among journal records, a later label replacing an earlier one."""
    return {r["key"]: r["label"] for r in records if r.get("label")}


def encode_results(labels: dict[str, str]) -> bytes:
    """{name: label} as the results file holds it: json.dumps(labels, indent=1) and a newline."""
    return _enclose(_entry_lines(labels))


def _enclose(entries: bytes | bytearray) -> bytes:
    return b"{\n" + entries + b"\n}\n" if entries else b"{}\n"


def _entry_lines(labels: dict[str, str]) -> bytes:
    return b",\n".join(b" " + _json(k) + b": " + _json(v) for k, v in labels.items())


# Journal fields that hold file names or paths; one that is not valid UTF-8 is written readable,
# with its exact bytes beside it in hex (`<field>_hex`), from which reading restores it.
NAME_FIELDS = ("key", "source", "dest")


def _json(value: str | dict) -> bytes:
    """Valid UTF-8 JSON of a results key or value, or of a journal record (see NAME_FIELDS)."""
    if isinstance(value, str):
        value = readable_name(value)
    else:
        value = dict(value)
        for field in NAME_FIELDS:
            if field in value and (readable := readable_name(value[field])) != value[field]:
                value[field], value[f"{field}_hex"] = readable, os.fsencode(value[field]).hex()
    return json.dumps(value, ensure_ascii=False).encode()
