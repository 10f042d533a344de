"""Turning files into labels: safe reading, parallel decoding, batched forward passes.

Shared by `watcher` (one-shot pass and service) and `train.evaluate`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import Checkpoint
from model.preprocess import ImageError, load_image, normalize

DEFAULT_MAX_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float  # the model's probability for `label`


def read_image_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a regular file, refusing symlinks, FIFOs, devices, folders and oversized files.

    O_NOFOLLOW refuses a symlink at the last component; O_NONBLOCK keeps a FIFO from blocking
    the open, and fstat then refuses it. Raises ImageError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise ImageError("is a symbolic link") from None
        raise ImageError(f"cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "folder" if stat.S_ISDIR(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode) else "special file"
            raise ImageError(f"is a {kind}, not a regular file")
        if info.st_size > max_bytes:
            raise ImageError(f"{info.st_size} bytes is over the limit of {max_bytes}")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise ImageError(f"over the limit of {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Outcome:
    """What became of one file: a prediction, or the error that stopped it. sha256 of its bytes when read."""

    path: Path
    prediction: Prediction | None
    error: str | None
    sha256: str | None


def load_file(path: str | Path, height: int, width: int, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    return load_image(read_image_bytes(path, max_bytes), height, width)


@torch.inference_mode()
def predict(checkpoint: Checkpoint, images: Sequence[torch.Tensor]) -> list[Prediction]:
    """One forward pass over uint8 (3, H, W) images."""
    if not images:
        return []
    logits = checkpoint.model(normalize(torch.stack(list(images)), checkpoint.spec))
    probs = torch.softmax(logits.float(), dim=1)
    best = probs.argmax(dim=1)
    return [Prediction(checkpoint.class_names[int(i)], round(float(p[i]), 4)) for i, p in zip(best, probs, strict=True)]


def classify_batch(
    paths: Sequence[Path], checkpoint: Checkpoint, pool: Executor, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Outcome]:
    """Read and decode files in parallel on `pool`, then classify them in one forward pass."""
    spec = checkpoint.spec

    def decode(path: Path) -> tuple[torch.Tensor | None, str | None, str | None]:
        digest = None
        try:
            data = read_image_bytes(path, max_bytes)
            digest = hashlib.sha256(data).hexdigest()
            return load_image(data, spec.height, spec.width), None, digest
        except ImageError as exc:
            return None, str(exc), digest

    decoded = list(pool.map(decode, paths))
    predictions = iter(predict(checkpoint, [image for image, _, _ in decoded if image is not None]))
    return [
        Outcome(path, next(predictions) if image is not None else None, error, digest)
        for path, (image, error, digest) in zip(paths, decoded, strict=True)
    ]
