"""Labeled image folders: find the files, split them, and cut each file's main face into a chip
once, into an in-memory cache."""

from __future__ import annotations

import random
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from model.decode import Decoded
from model.faces import FaceRules, Preprocessing
from model.pool import DecodePool, usable_cpus
from model.preprocess import to_batch
from model.progress import Progress
from train.metrics import summarize_groups

CHUNK = 512  # files per decoding task: few round trips, a smooth progress bar
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class TrainingError(Exception):
    """Labeled data that cannot be trained on or scored, said in one sentence."""


# Training takes each labeled picture's largest face, and a picture without a face found whole.
TRAINING_RULES = FaceRules(max_faces=1, no_face="answer")


@dataclass
class Dataset:
    """Face chips (uint8, N x 3 x H x W), their class indices, file paths and how each face was
    found (model.faces.Face.how)."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[Path]
    hows: list[str]

    def subset(self, index: list[int]) -> Dataset:
        idx = torch.tensor(index, dtype=torch.long)
        return Dataset(self.images[idx], self.labels[idx], [self.paths[i] for i in index], [self.hows[i] for i in index])


def source_of(path: Path) -> str:
    """The file-name prefix before the first '_' (aaf_..., scut_...), or 'unprefixed'."""
    return path.name.split("_", 1)[0] if "_" in path.name else "unprefixed"


RACES = ("white", "black", "asian", "indian", "other")  # UTKFace's race field, 0-4
# Age bands for accuracy by age, where a file name tells the age (UTKFace, All-Age-Faces).
AGE_BANDS = ("age under 18", "age 18-29", "age 30-44", "age 45-59", "age 60+")
AGE_BAND_STARTS = (18, 30, 45, 60)  # where each band after the first begins


def _utkface_fields(path: Path) -> list[str] | None:
    """`[utk_]<age>_<gender>_<race>_...` split at '_', or None for another name."""
    parts = path.name.removeprefix("utk_").split("_")
    if len(parts) >= 4 and parts[0].isdigit() and parts[1] in ("0", "1") and parts[2] in ("0", "1", "2", "3", "4"):
        return parts
    return None


def race_of(path: Path) -> str | None:
    """UTKFace's race field, by name (RACES); None for a file of another source."""
    fields = _utkface_fields(path)
    return RACES[int(fields[2])] if fields else None


def age_of(path: Path) -> int | None:
    """The age that UTKFace's (`[utk_]<age>_...`) or All-Age-Faces' (`[aaf_]<serial>A<age>`) file
    names tell; None for any other name."""
    fields = _utkface_fields(path)
    if fields:
        return int(fields[0])
    serial, _, age = path.stem.removeprefix("aaf_").partition("A")
    return int(age) if serial.isdigit() and age.isdigit() else None


def groups_of(path: Path) -> list[str]:
    """The groups a file name tells, for accuracy by group: UTKFace's race, IMFDB's actor
    (`imfdb_<actor>_...`), and the age band (`age 60+`) where the age is in the name."""
    groups = []
    if race := race_of(path):
        groups.append(race)
    elif path.name.startswith("imfdb_") and len(parts := path.name.split("_")) >= 3:
        groups.append(parts[1])
    if (age := age_of(path)) is not None:
        groups.append(AGE_BANDS[bisect_right(AGE_BAND_STARTS, age)])
    return groups


def summarize_file_groups(answers: dict[Path, int | None], label_of: dict[Path, int], class_names: list[str]) -> dict[str, dict]:
    """Accuracy by group (groups_of) of the files in `answers`: the class answered for each, or None
    where no face was found (counted wrong). A file that could not be read is left out of
    `answers`, and so out of every group's figures, as it is out of the overall ones."""
    paths = list(answers)
    return summarize_groups([label_of[p] for p in paths], [answers[p] for p in paths], [groups_of(p) for p in paths], class_names)


# Every source the same share of an epoch: the in-the-wild ones (UTKFace, IMFDB) are small next to
# CelebA, and are what the model is most often wrong on.
SOURCE_EXPONENT = 0.0


def sampling_weights(paths: list[Path], labels: list[int], source_exponent: float = SOURCE_EXPONENT) -> torch.Tensor:
    """Per-image weights for drawing an epoch, so that no source and no group dominates it: each
    source's share of an epoch goes with its size to the power `source_exponent` (0: every source
    the same share, small ones drawn several times over; 1: as in the data), and within a source
    every class, and every race where the name tells it, has the same share."""
    cells: dict[tuple[str, str | None, int], list[int]] = defaultdict(list)
    for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
        cells[(source_of(path), race_of(path), label)].append(i)
    per_source: dict[str, int] = defaultdict(int)
    cells_of: dict[str, int] = defaultdict(int)
    for (source, _, _), index in cells.items():
        per_source[source] += len(index)
        cells_of[source] += 1
    weights = torch.zeros(len(paths), dtype=torch.float64)
    for (source, _, _), index in cells.items():
        weights[index] = per_source[source] ** source_exponent / cells_of[source] / len(index)
    return weights / weights.sum()


def find_labeled_images(root: str | Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """root/<class>/* for each class; a missing or empty class folder is an error. A symlink is
    taken as its target (the decoder never follows links, as the inbox must not; labeled data is
    the owner's own), and the target's name is what source_of sees."""
    root = Path(root)
    if not root.is_dir():
        raise TrainingError(f"data folder {root} does not exist")
    found = []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            raise TrainingError(f"class folder {folder} is missing (expected {', '.join(class_names)} under {root})")
        listed = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        files = sorted({p.resolve() if p.is_symlink() else p.absolute() for p in listed})  # a link beside its target: once
        if not files:
            raise TrainingError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        found += [(p, label) for p in files]
    return found


def load_dataset(items: list[tuple[Path, int]], prep: Preprocessing) -> tuple[Dataset, list[tuple[Path, str]]]:
    """Decode every file once and cut its main face into a chip with the serving preprocessing, on
    a decode worker pool with one process per core; return the dataset and the skipped files (with
    prep.rules.no_face "fail", also the pictures without a face)."""
    progress = Progress(len(items), "finding faces", min_total=1)
    paths = [path for path, _ in items]
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    decoded: list[Decoded] = []
    with DecodePool(usable_cpus()) as pool:
        for pending in [pool.start(chunk, prep) for chunk in chunks]:
            decoded += pool.wait(pending)
            progress.advance(len(pending.paths))
    keep = [i for i, d in enumerate(decoded) if d.faces]
    skipped = [(items[i][0], str(d.error)) for i, d in enumerate(decoded) if not d.faces]
    chips = [decoded[i].faces[0].chip for i in keep]
    images = to_batch(chips) if keep else torch.empty(0, 3, prep.chip.height, prep.chip.width, dtype=torch.uint8)
    labels = torch.tensor([items[i][1] for i in keep], dtype=torch.long)
    return Dataset(images, labels, [items[i][0] for i in keep], [decoded[i].faces[0].how for i in keep]), skipped


def split(dataset: Dataset, seed: int, val_fraction: float, test_fraction: float) -> tuple[Dataset, Dataset, Dataset]:
    """Seeded split, stratified by (source, class) so each part has the same mix."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, (path, label) in enumerate(zip(dataset.paths, dataset.labels.tolist(), strict=True)):
        groups[(source_of(path), label)].append(i)
    rng = random.Random(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for key in sorted(groups):
        index = groups[key]
        rng.shuffle(index)
        n_test, n_val = round(len(index) * test_fraction), round(len(index) * val_fraction)
        parts[2].extend(index[:n_test])
        parts[1].extend(index[n_test : n_test + n_val])
        parts[0].extend(index[n_test + n_val :])
    return tuple(dataset.subset(sorted(p)) for p in parts)  # type: ignore[return-value]
