"""A dependency-free progress bar for long loops; silent unless stderr is a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, min_total: int = 200) -> None:
        self.total, self.label, self.done = total, label, 0
        self.enabled = sys.stderr.isatty() and total >= min_total
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and self.done < self.total):
            return
        self.last = now
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(now - self.start, 1e-9)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:.0f}/s {note}\x1b[K"
        )
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
