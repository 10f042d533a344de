"""Turning files into labels: decoding and face finding on the worker pool, then batched forward
passes over every face of the batch.

Shared by `watcher` (one-shot pass, service and bulk runs), `train.evaluate` and `train.photos`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model import DEFAULT_MAX_BYTES
from model.checkpoint import Checkpoint, model_input
from model.faces import FaceRules
from model.files import Identity
from model.pool import DecodePool, PendingDecode
from model.preprocess import to_batch


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float  # the model's probability for `label`


@dataclass(frozen=True)
class FaceAnswer:
    """One face of a file and the model's answer for it."""

    box: tuple[int, int, int, int]  # left, top, width, height in the picture's own (upright) pixels
    score: float  # the detector's; 0 for a whole picture taken as the face
    how: str  # see model.faces.Face
    prediction: Prediction

    def to_dict(self) -> dict:
        return {
            "box": list(self.box),
            "score": self.score,
            "how": self.how,
            "label": self.prediction.label,
            "probability": self.prediction.probability,
        }


@dataclass(frozen=True)
class Outcome:
    """What became of one file: its faces, largest first, or the error that stopped it. sha256 of
    its bytes when read."""

    path: Path
    faces: list[FaceAnswer]
    error: str | None
    sha256: str | None
    identity: Identity | None  # of the file before it was read (model.files.file_identity)

    @property
    def prediction(self) -> Prediction | None:
        """The answer for the file as a whole: its main (largest) face's."""
        return self.faces[0].prediction if self.faces else None

    def answer(self) -> dict:
        """The answer as the journal and --details record it: the main face's label and probability,
        and every face; {} for a file without one."""
        if self.prediction is None:
            return {}
        faces = [face.to_dict() for face in self.faces]
        return {"label": self.prediction.label, "probability": self.prediction.probability, "faces": faces}


# A face whose logit margin (best class minus the other) is at least this is answered from one
# pass: its mirror image would have to move the margin by more than twice as much to change the
# answer, which it did for none of the 7,496 held-out faces with the shipped checkpoint.
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
    paths: Sequence[Path], checkpoint: Checkpoint, pool: DecodePool, rules: FaceRules, max_bytes: int = DEFAULT_MAX_BYTES
) -> PendingDecode:
    """Submit the files' reading, hashing, decoding and face finding to `pool`; returns at once."""
    return pool.start(list(paths), checkpoint.preprocessing(rules), max_bytes)


def finish_batch(pending: PendingDecode, checkpoint: Checkpoint, pool: DecodePool) -> list[Outcome]:
    """Wait for the decoding, then classify every face of the batch in one forward pass."""
    decoded = pool.wait(pending)
    chips = [face.chip for d in decoded for face in d.faces or []]
    predictions = iter(predict(checkpoint, to_batch(chips)) if chips else [])
    return [
        Outcome(
            path,
            [FaceAnswer(tuple(round(v) for v in f.box), f.score, f.how, next(predictions)) for f in d.faces or []],
            d.error,
            d.sha256,
            d.identity,
        )
        for path, d in zip(pending.paths, decoded, strict=True)
    ]


def classify_batch(
    paths: Sequence[Path], checkpoint: Checkpoint, pool: DecodePool, rules: FaceRules, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Outcome]:
    """Read, decode and find faces in parallel on `pool`, then classify every face in one forward pass."""
    return finish_batch(start_batch(paths, checkpoint, pool, rules, max_bytes), checkpoint, pool)


# Batches whose decoding is under way ahead of the one the model is on: several queued keep the
# decode workers busy whenever the model leaves a core free.
LOOKAHEAD = 4


def classify_in_batches(
    paths: Sequence[Path],
    checkpoint: Checkpoint,
    pool: DecodePool,
    rules: FaceRules,
    batch_size: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    ahead: int = LOOKAHEAD,
) -> Iterator[list[Outcome]]:
    """classify_batch over `paths`, `batch_size` at a time and in order, with the decoding of the
    next `ahead` batches under way while the model runs on one. For a fixed list of files
    (--once, evaluation); the service forms its batches as files arrive."""
    batches = (paths[i : i + batch_size] for i in range(0, len(paths), batch_size))
    started = (start_batch(batch, checkpoint, pool, rules, max_bytes) for batch in batches)
    in_flight = deque(itertools.islice(started, ahead))
    while in_flight:
        pending = in_flight.popleft()
        in_flight.extend(itertools.islice(started, 1))
        yield finish_batch(pending, checkpoint, pool)
