"""The rows of a bulk run, and the callable class that makes them on Ray Data's workers.

One row per face, the largest first (`face` 0 is the file's main face, whose label --once
writes); a file without one has a single row with `error` set and `face` null. The schema is
fixed, so a batch in which every file failed still has every column with its type.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from pyarrow import fs as pafs

from model import DEFAULT_MAX_BYTES, DEFAULT_MEMORY_MB
from model import checkpoint as ckpt
from model.faces import FaceRules
from model.inference import Outcome, classify_batch
from model.pool import DEFAULT_TIME_BUDGET, DecodeFunction, DecodePool
from watcher.bulk.sources import decode_function

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # relative to the source
        pa.field("face", pa.int16()),  # 0 the largest face; null when the file failed
        pa.field("faces", pa.int16(), nullable=False),  # how many faces the file has
        pa.field("label", pa.string()),
        pa.field("probability", pa.float64()),  # the model's probability for `label`
        pa.field("box_left", pa.int32()),  # the face's box in the picture's own (upright) pixels
        pa.field("box_top", pa.int32()),
        pa.field("box_width", pa.int32()),
        pa.field("box_height", pa.int32()),
        pa.field("score", pa.float32()),  # the detector's; 0 for a whole picture taken as the face
        pa.field("how", pa.string()),  # detected, weak_detection or whole_image (see model.faces.Face)
        pa.field("error", pa.string()),  # why the file has no answer
        pa.field("sha256", pa.string()),  # of the file's bytes, when they could be read
        pa.field("checkpoint", pa.string(), nullable=False),  # the version that answered
    ]
)


def to_rows(paths: Sequence[str], outcomes: Sequence[Outcome], version: str) -> pa.Table:
    """The rows of classified files (`paths` as they are to be written, one per outcome)."""
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}

    def add(path: str, outcome: Outcome, face: int | None) -> None:
        answer = outcome.faces[face] if face is not None else None
        box = answer.box if answer else (None,) * 4
        values = {
            "path": path,
            "face": face,
            "faces": len(outcome.faces),
            "label": answer and answer.prediction.label,
            "probability": answer and answer.prediction.probability,
            "box_left": box[0],
            "box_top": box[1],
            "box_width": box[2],
            "box_height": box[3],
            "score": answer and answer.score,
            "how": answer and answer.how,
            "error": outcome.error,
            "sha256": outcome.sha256,
            "checkpoint": version,
        }
        for name, value in values.items():
            columns[name].append(value)

    for path, outcome in zip(paths, outcomes, strict=True):
        for face in range(len(outcome.faces)) or [None]:
            add(path, outcome, face)
    return pa.table(columns, schema=SCHEMA)


class Classifier:
    """Files -> rows, for `Dataset.map_batches`: a batch with a `path` column (relative to `root`
    on `filesystem`) becomes a pyarrow table of SCHEMA. Each instance keeps the model resident and
    decodes through a DecodePool of its own, so a file that crashes or stalls the decoder fails
    alone, as in the service. For your own Ray pipeline:

        ds.map_batches(Classifier, fn_constructor_kwargs={"checkpoint": ckpt.read_bytes(path)},
                       concurrency=4, batch_size=64)
    """

    def __init__(
        self,
        checkpoint: bytes,
        root: str = "",
        filesystem: pafs.FileSystem | None = None,
        rules: FaceRules = FaceRules(),  # noqa: B008 (frozen)
        precision: str = "auto",
        decode_processes: int = 1,
        decode_seconds: float = DEFAULT_TIME_BUDGET,
        decode_memory_mb: int = DEFAULT_MEMORY_MB,
        max_bytes: int = DEFAULT_MAX_BYTES,
        torch_threads: int = 1,
        decode: DecodeFunction | None = None,
    ) -> None:
        """`checkpoint`: the file's bytes (model.checkpoint.read_bytes), so that workers on other
        machines need no copy of it. `decode` replaces what the decode processes run per file."""
        torch.set_num_threads(torch_threads)
        self.checkpoint = ckpt.loads(checkpoint, "given to the bulk classifier", precision)
        self.root, self.rules, self.max_bytes = root, rules, max_bytes
        filesystem = filesystem or pafs.LocalFileSystem()
        self.pool = DecodePool(
            decode_processes, decode_seconds, decode=decode or decode_function(filesystem), memory_mb=decode_memory_mb
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """`batch["path"]`: the paths as written; `batch["key"]`, where given, their exact bytes
        (os.fsencode: a file name need not be valid UTF-8, which a string column must be)."""
        paths = [str(p) for p in batch["path"]]
        keys = [os.fsdecode(bytes(k)) for k in batch["key"]] if "key" in batch else paths
        files = [Path(f"{self.root}/{k}" if self.root else k) for k in keys]
        outcomes = classify_batch(files, self.checkpoint, self.pool, self.rules, self.max_bytes)
        return to_rows(paths, outcomes, self.checkpoint.version)
