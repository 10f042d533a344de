"""Turning files into labels: safe reading, parallel decoding, batched forward passes.

Shared by `watcher` (one-shot pass and service) and `train.evaluate`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import torch

from model import PRECISIONS
from model.checkpoint import Checkpoint
from model.preprocess import ImageError, load_image, normalize

DEFAULT_MAX_BYTES = 50 * 1024 * 1024


@functools.cache
def cpu_has_fast_bfloat16() -> bool:
    """Whether the CPU has AMX (Intel Sapphire Rapids and later), where oneDNN runs bfloat16
    convolutions several times faster than float32. Elsewhere bfloat16 would be slower."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def uses_bfloat16(precision: str = "auto", device_type: str = "cpu") -> bool:
    """'float32', 'bfloat16', or 'auto': bfloat16 on a GPU or a CPU with AMX, float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    return precision == "bfloat16" or (precision == "auto" and (device_type != "cpu" or cpu_has_fast_bfloat16()))


def autocast(precision: str = "auto", device_type: str = "cpu") -> torch.autocast:
    """Mixed precision for the forward pass (see uses_bfloat16); the weights stay float32."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=uses_bfloat16(precision, device_type))


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
def predict(checkpoint: Checkpoint, images: Sequence[torch.Tensor], precision: str = "auto") -> list[Prediction]:
    """One forward pass over uint8 (3, H, W) images."""
    if not images:
        return []
    with autocast(precision):
        logits = checkpoint.model(normalize(torch.stack(list(images)), checkpoint.spec))
    probs = torch.softmax(logits.float(), dim=1)
    best = probs.argmax(dim=1)
    return [Prediction(checkpoint.class_names[int(i)], round(float(p[i]), 4)) for i, p in zip(best, probs, strict=True)]


def _decode(path: Path, height: int, width: int, max_bytes: int) -> tuple[torch.Tensor | None, str | None, str | None]:
    digest = None
    try:
        data = read_image_bytes(path, max_bytes)
        digest = hashlib.sha256(data).hexdigest()
        return load_image(data, height, width), None, digest
    except ImageError as exc:
        return None, str(exc), digest


@dataclass
class PendingBatch:
    """Files whose reading and decoding is under way on a pool."""

    paths: list[Path]
    futures: list[Future]


def start_batch(
    paths: Sequence[Path], checkpoint: Checkpoint, pool: Executor, max_bytes: int = DEFAULT_MAX_BYTES
) -> PendingBatch:
    """Submit each file's reading, hashing and decoding to `pool`; returns at once."""
    spec = checkpoint.spec
    return PendingBatch(list(paths), [pool.submit(_decode, p, spec.height, spec.width, max_bytes) for p in paths])


def finish_batch(pending: PendingBatch, checkpoint: Checkpoint, precision: str = "auto") -> list[Outcome]:
    """Wait for the decoding, then classify the readable images in one forward pass."""
    decoded = [f.result() for f in pending.futures]
    predictions = iter(predict(checkpoint, [image for image, _, _ in decoded if image is not None], precision))
    return [
        Outcome(path, next(predictions) if image is not None else None, error, digest)
        for path, (image, error, digest) in zip(pending.paths, decoded, strict=True)
    ]


def classify_batch(
    paths: Sequence[Path], checkpoint: Checkpoint, pool: Executor, max_bytes: int = DEFAULT_MAX_BYTES, precision: str = "auto"
) -> list[Outcome]:
    """Read and decode files in parallel on `pool`, then classify them in one forward pass."""
    return finish_batch(start_batch(paths, checkpoint, pool, max_bytes), checkpoint, precision)
