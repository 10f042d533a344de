"""A dependency-free progress bar for long loops; silent unless stderr is a terminal.

Log lines written through `stderr_lines` while a bar is on screen wipe it first and draw it again
below them, so the two never share a line.
"""

from __future__ import annotations

import sys
import time


class Progress:
    shown: Progress | None = None  # the bar now on the terminal's last line, if any

    def __init__(self, total: int, label: str, min_total: int = 200) -> None:
        self.total, self.label, self.done = total, label, 0
        self.enabled = sys.stderr.isatty() and total >= min_total
        self.start, self.last = time.monotonic(), float("-inf")  # the first advance is drawn at once
        self.line = ""

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and self.done < self.total):
            return
        self.last = now
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(now - self.start, 1e-9)
        self.line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:.0f}/s {note}"
        sys.stderr.write(f"\r{self.line}\x1b[K")
        if self.done >= self.total:
            sys.stderr.write("\n")
            Progress.shown = None
        else:
            Progress.shown = self
        sys.stderr.flush()


class _StderrLines:
    """A file for whole lines to stderr (what structlog's PrintLogger writes): the bar on screen,
    if any, is wiped before them and drawn again after them."""

    def __init__(self) -> None:
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            lines, _, self.pending = self.pending.rpartition("\n")
            bar = Progress.shown
            sys.stderr.write(("\r\x1b[K" if bar else "") + lines + "\n" + (bar.line + "\x1b[K" if bar else ""))
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


stderr_lines = _StderrLines()
