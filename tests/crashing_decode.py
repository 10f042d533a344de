"""Stand-ins for model.decode.decode_file, for DecodePool(decode=...): a worker that dies on files
named crash* (what a segfault in a C library looks like to the pool), and one that never finishes
files named hang* (a hostile image, or a worker stopped with SIGSTOP)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from model.decode import Decoded, decode_file
from model.faces import Preprocessing


def decode_or_die(path: Path, prep: Preprocessing, max_bytes: int) -> Decoded:
    if path.name.startswith("crash"):
        os._exit(139)
    return decode_file(path, prep, max_bytes)


def decode_or_hang(path: Path, prep: Preprocessing, max_bytes: int) -> Decoded:
    if path.name.startswith("hang"):
        time.sleep(3600)
    return decode_file(path, prep, max_bytes)
