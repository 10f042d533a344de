"""Run `python -m watcher ARGS` with one step of the commit protocol made to fail.

    python tests/fault_runner.py STEP KIND -- ARGS...

STEP: journal_append, results_replace, fsync, move, rotate. KIND: exit (the process dies on the
spot with status 70), enospc (OSError ENOSPC), or error (RuntimeError). The step fails on its
first call once a batch is being committed.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fail(kind: str) -> None:
    if kind == "exit":
        os._exit(70)
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise RuntimeError("injected fault")


def install(step: str, kind: str) -> None:
    # Imported here, not at the top: the decode workers import this script as their __main__,
    # and they should not load torch for nothing.
    from model import files
    from watcher import pipeline, results

    armed = {"on": False}
    real_commit = results.ResultStore.commit

    def commit(self, records, **options):
        armed["on"] = True  # faults only inside a batch commit, not during start-up recovery
        if step == "journal_append":
            data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
            self._journal_file.write(data[: len(data) // 2])  # a torn append: some whole lines, one cut
            self._journal_file.flush()
            fail(kind)
        return real_commit(self, records, **options)

    results.ResultStore.commit = commit

    if step == "results_replace":
        real = results.write_atomic

        def replace(path, data):
            if armed["on"]:
                fail(kind)
            return real(path, data)

        results.write_atomic = replace
    if step == "fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if armed["on"]:
                fail(kind)
            return real_fsync(fd)

        results.os.fsync = fsync  # the journal's fsync
        files.os.fsync = fsync
    if step == "move":
        real_move = pipeline.move_no_clobber
        count = {"n": 0}

        def move(source, dest):
            count["n"] += 1
            if count["n"] == 2:  # the first file moved, then the fault
                fail(kind)
            return real_move(source, dest)

        pipeline.move_no_clobber = move
    if step == "rotate":
        real_write = results.write_atomic

        def write(path, data):
            if ".1." in path.name:  # the journal renamed, its numbered results file not yet written
                fail(kind)
            return real_write(path, data)

        results.write_atomic = write


if __name__ == "__main__":
    step, kind, sep, *args = sys.argv[1:]
    assert sep == "--"
    install(step, kind)
    from watcher.__main__ import main

    sys.exit(main(args))
