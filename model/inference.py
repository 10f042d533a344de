"""Turning files into labels: decoding on the worker pool, then batched forward passes.

Shared by `watcher` (one-shot pass and service) and `train.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.checkpoint import Checkpoint
from model.decode import DEFAULT_MAX_BYTES, DecodePool, PendingDecode
from model.preprocess import normalize, to_batch


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


def model_input(checkpoint: Checkpoint, batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> what the checkpoint's model takes: normalized, channels-last, in the
    float type of its weights."""
    return normalize(batch, checkpoint.spec).to(checkpoint.dtype)


def mirror_averaged_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits for a batch of model inputs, each averaged with those of its
    mirror image, in one forward pass over both. A face seen either way round is the same face;
    the average is 0.1-0.3 points more accurate on held-out faces (train/SWEEP.md), for a forward
    pass twice as large. Training's evaluation and serving both classify through here."""
    both = model(torch.cat([x, x.flip(3)])).float()
    return (both[: len(x)] + both[len(x) :]) / 2


@torch.inference_mode()
def predict(checkpoint: Checkpoint, batch: torch.Tensor) -> list[Prediction]:
    """Classify a uint8 (N, 3, H, W) batch: one forward pass over it and its mirror image."""
    logits = mirror_averaged_logits(checkpoint.model, model_input(checkpoint, batch))
    probs = torch.softmax(logits, dim=1)
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
    readable = [pixels for pixels, _, _ in decoded if pixels is not None]
    predictions = iter(predict(checkpoint, to_batch(readable)) if readable else [])
    return [
        Outcome(path, next(predictions) if pixels is not None else None, error, digest)
        for path, (pixels, error, digest) in zip(pending.paths, decoded, strict=True)
    ]


def classify_batch(
    paths: Sequence[Path], checkpoint: Checkpoint, pool: DecodePool, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Outcome]:
    """Read and decode files in parallel on `pool`, then classify them in one forward pass."""
    return finish_batch(start_batch(paths, checkpoint, pool, max_bytes), checkpoint, pool)
