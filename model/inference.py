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
from model.files import Identity
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
    identity: Identity | None  # of the file before it was read (model.files.file_identity)


def model_input(checkpoint: Checkpoint, batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> what the checkpoint's model takes: normalized, channels-last, in the
    float type of its weights."""
    return normalize(batch, checkpoint.spec).to(checkpoint.dtype)


# A face whose logit margin (best class minus the other) is at least this is answered from one
# pass: its mirror image would have to move the margin by more than twice as much to change the
# answer, which it did for none of the 7,496 held-out faces with the shipped checkpoint and for 1
# with the previous one (train/SWEEP.md).
MIRROR_MARGIN = 2.0


def mirror_averaged_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits for a batch of model inputs; where the answer is close (margin
    under MIRROR_MARGIN), averaged with the logits of the mirror image. A face seen either way round
    is the same face, and the average is 0.1-0.3 points more accurate on held-out faces; 3-12 % of
    them need the second pass. Training's evaluation and serving both classify through here."""
    logits = model(x).float()
    top2 = logits.topk(2, dim=1).values
    close = top2[:, 0] - top2[:, 1] < MIRROR_MARGIN
    if close.any():
        logits[close] = (logits[close] + model(x[close].flip(3)).float()) / 2
    return logits


@torch.inference_mode()
def predict(checkpoint: Checkpoint, batch: torch.Tensor) -> list[Prediction]:
    """Classify a uint8 (N, 3, H, W) batch (see mirror_averaged_logits)."""
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
    readable = [d.pixels for d in decoded if d.pixels is not None]
    predictions = iter(predict(checkpoint, to_batch(readable)) if readable else [])
    return [
        Outcome(path, next(predictions) if d.pixels is not None else None, d.error, d.sha256, d.identity)
        for path, d in zip(pending.paths, decoded, strict=True)
    ]


def classify_batch(
    paths: Sequence[Path], checkpoint: Checkpoint, pool: DecodePool, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Outcome]:
    """Read and decode files in parallel on `pool`, then classify them in one forward pass."""
    return finish_batch(start_batch(paths, checkpoint, pool, max_bytes), checkpoint, pool)
