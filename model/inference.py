"""Turning files into labels: decoding on the worker pool, then batched forward passes.

Shared by `watcher` (one-shot pass and service) and `train.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import Checkpoint
from model.decode import DEFAULT_MAX_BYTES, DecodePool, PendingDecode
from model.preprocess import normalize, to_tensor


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float  # the model's probability for `label`


@dataclass(frozen=True)
class Outcome:
    """What became of one file: a prediction, or the error that stopped it. sha256 of its bytes when read."""

    path: Path
    prediction: Prediction | None
    error: str | None
    sha256: str | None


@torch.inference_mode()
def predict(checkpoint: Checkpoint, images: Sequence[torch.Tensor]) -> list[Prediction]:
    """One forward pass over uint8 (3, H, W) images, in the float type of the checkpoint's weights."""
    if not images:
        return []
    logits = checkpoint.model(normalize(torch.stack(list(images)), checkpoint.spec).to(checkpoint.dtype))
    probs = torch.softmax(logits.float(), dim=1)
    best = probs.argmax(dim=1)
    return [Prediction(checkpoint.class_names[int(i)], round(float(p[i]), 4)) for i, p in zip(best, probs, strict=True)]


def start_batch(
    paths: Sequence[Path], checkpoint: Checkpoint, pool: DecodePool, max_bytes: int = DEFAULT_MAX_BYTES
) -> PendingDecode:
    """Submit the files' reading, hashing and decoding to `pool`; returns at once."""
    return pool.start(list(paths), checkpoint.spec.height, checkpoint.spec.width, max_bytes)


def finish_batch(pending: PendingDecode, checkpoint: Checkpoint, pool: DecodePool) -> list[Outcome]:
    """Wait for the decoding, then classify the readable images in one forward pass."""
    decoded = pool.wait(pending)
    predictions = iter(predict(checkpoint, [to_tensor(pixels) for pixels, _, _ in decoded if pixels is not None]))
    return [
        Outcome(path, next(predictions) if pixels is not None else None, error, digest)
        for path, (pixels, error, digest) in zip(pending.paths, decoded, strict=True)
    ]


def classify_batch(
    paths: Sequence[Path], checkpoint: Checkpoint, pool: DecodePool, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Outcome]:
    """Read and decode files in parallel on `pool`, then classify them in one forward pass."""
    return finish_batch(start_batch(paths, checkpoint, pool, max_bytes), checkpoint, pool)
