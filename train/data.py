"""Labeled image folders: find the files, split them, decode each once into an in-memory cache."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from model.decode import Decoded, DecodePool
from model.preprocess import to_batch
from model.progress import Progress

CHUNK = 512  # files per decoding task: few round trips, a smooth progress bar
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Dataset:
    """Decoded images (uint8, N x 3 x H x W), their class indices and file paths."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[Path]

    def subset(self, index: list[int]) -> Dataset:
        idx = torch.tensor(index, dtype=torch.long)
        return Dataset(self.images[idx], self.labels[idx], [self.paths[i] for i in index])


def source_of(path: Path) -> str:
    """The file-name prefix before the first '_' (aaf_..., scut_...), or 'unprefixed'."""
    return path.name.split("_", 1)[0] if "_" in path.name else "unprefixed"


def find_labeled_images(root: str | Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """root/<class>/* for each class; a missing or empty class folder is an error. A symlink is
    taken as its target (the decoder never follows links, as the inbox must not; labeled data is
    the owner's own), and the target's name is what source_of sees."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"data folder {root} does not exist")
    found = []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            raise SystemExit(f"class folder {folder} is missing (expected {', '.join(class_names)} under {root})")
        listed = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        files = sorted({p.resolve() if p.is_symlink() else p.absolute() for p in listed})  # a link beside its target: once
        if not files:
            raise SystemExit(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        found += [(p, label) for p in files]
    return found


def load_dataset(items: list[tuple[Path, int]], height: int, width: int) -> tuple[Dataset, list[tuple[Path, str]]]:
    """Decode every file once with the serving preprocessing, on a decode worker pool with one
    process per core; return the dataset and the skipped files."""
    progress = Progress(len(items), "decoding", min_total=1)
    paths = [path for path, _ in items]
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    decoded: list[Decoded] = []
    with DecodePool(os.cpu_count() or 1) as pool:
        for pending in [pool.start(chunk, height, width) for chunk in chunks]:
            decoded += pool.wait(pending)
            progress.advance(len(pending.paths))
    keep = [i for i, d in enumerate(decoded) if d.pixels is not None]
    skipped = [(items[i][0], str(d.error)) for i, d in enumerate(decoded) if d.pixels is None]
    images = to_batch([decoded[i].pixels for i in keep]) if keep else torch.empty(0, 3, height, width, dtype=torch.uint8)
    labels = torch.tensor([items[i][1] for i in keep], dtype=torch.long)
    return Dataset(images, labels, [items[i][0] for i in keep]), skipped


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
