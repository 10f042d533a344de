"""The one-shot pass: classify every image file in a folder and write one results file.

Without --move it only reads the folder. With --move it is the service's pipeline run once over
the inbox (see watcher.service).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from model import checkpoint as ckpt
from model.files import readable_name, write_atomic
from model.inference import Outcome, classify_in_batches
from model.pool import DecodePool
from model.progress import Progress
from watcher import log, startup
from watcher.config import Config
from watcher.intake import is_waiting_name
from watcher.pipeline import Pipeline
from watcher.results import encode_results


def candidate_files(folder: Path) -> list[Path]:
    """Entries of `folder` that are meant as images: everything but hidden names and sub-folders."""
    return list_folder(folder)[0]


def list_folder(folder: Path) -> tuple[list[Path], int]:
    """candidate_files, and how many (not hidden) sub-folders the listing passed over."""
    with os.scandir(folder) as entries:  # the entries' types come with the listing: no stat per file
        shown = [e for e in entries if not e.name.startswith(".")]
    names = sorted(e.name for e in shown if not e.is_dir(follow_symlinks=False))
    return [folder / name for name in names], len(shown) - len(names)


def details_line(outcome: Outcome, version: str) -> str:
    """--details: one JSON line for a file, with every face or the reason there is none."""
    line = {"file": readable_name(outcome.path.name), "checkpoint": version, "sha256": outcome.sha256}
    line |= outcome.answer() or {"error": outcome.error}
    return json.dumps(line, ensure_ascii=False) + "\n"


def classify_folder(folder: Path, output: Path, config: Config, pool: DecodePool, details: Path | None = None) -> int:
    """Write {name: label} (the main face's label) for every image with a face in `folder` to
    `output`, and with `details` one JSON line per file; 1 if any file failed."""
    logger = log.get()
    checkpoint = ckpt.load(config.checkpoint, config.batch.precision)
    torch.set_num_threads(config.batch.torch_threads)
    # `--once .` may write its results (and details) into the folder itself: those are not images
    own_files = {t.name for t in (output, details) if t is not None and t.absolute().parent.resolve() == folder.resolve()}
    listed, subfolders = list_folder(folder)
    files = [f for f in listed if f.name not in own_files]
    logger.info("once_start", folder=str(folder), files=len(files), subfolders_skipped=subfolders, checkpoint=checkpoint.version)
    if subfolders and not files:
        logger.warning(
            "only_subfolders", folder=str(folder), hint="--once classifies the files of DIR itself, not of its sub-folders"
        )
    results: dict[str, str] = {}
    failures = 0
    progress = Progress(len(files), "classifying")
    size, max_bytes = config.batch.max_size, config.intake.max_file_bytes
    lines: list[str] = []
    for outcomes in classify_in_batches(files, checkpoint, pool, config.faces, size, max_bytes):
        for outcome in outcomes:
            lines.append(details_line(outcome, checkpoint.version))
            if outcome.prediction:
                results[outcome.path.name] = outcome.prediction.label
            else:
                failures += 1
                logger.warning("failed", file=outcome.path.name, reason=outcome.error)
        progress.advance(len(outcomes))
    write_atomic(output, encode_results(dict(sorted(results.items()))))
    if details is not None:
        write_atomic(details, "".join(lines).encode())
    logger.info("once_done", classified=len(results), failed=failures, output=str(output))
    return 1 if failures else 0


def _settled(path: Path, now: float, settle: float) -> bool:
    """Not modified within the last `settle` seconds (a future mtime counts as settled); a file
    gone since the listing is not."""
    try:
        age = now - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return not 0 <= age < settle


def drain_inbox(config: Config, pool: DecodePool) -> int:
    """--once --move: the service's pipeline over the inbox, once. Files modified within the last
    `intake.settle_seconds` may still be being written and wait for the next pass; an mtime in
    the future says nothing about that, so such a file is taken."""
    logger = log.get()
    torch.set_num_threads(config.batch.torch_threads)
    failures = handled = 0
    with startup.serving(config) as (checkpoint, store):
        now, settle = time.time(), config.intake.settle_seconds
        ready = [p for p in candidate_files(config.inbox) if not is_waiting_name(p.name) and _settled(p, now, settle)]
        logger.info("once_start", folder=str(config.inbox), files=len(ready), checkpoint=checkpoint.version)
        size, flow = config.batch.max_size, Pipeline(config, pool, store)
        for start in range(0, len(ready), size):
            records = flow.process(ready[start : start + size], checkpoint)
            handled += len(records)
            failures += sum(r["status"] == "failed" for r in records)
    logger.info("once_done", handled=handled, failed=failures, results=str(config.results))
    return 1 if failures else 0
