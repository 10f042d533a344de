"""python -m train.photos DIR [DIR ...]: how well faces are found and answered in whole photos.

Pastes the labeled faces of each DIR (female/, male/) at 8-30 % of the width into generated
1600x1200 backgrounds, one to three a picture, and classifies the pictures exactly as served.
Reports the share of faces found, the accuracy in the photos (a face not found counts as wrong)
against the same faces given as crops, and how many generated pictures without a face were given
one. Files that cannot be read are skipped and listed.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import model
from model import checkpoint as ckpt
from model.decode import open_upright
from model.faces import FaceRules
from model.inference import Outcome, classify_in_batches
from model.pool import DecodePool, usable_cpus
from train import DefaultsHelp
from train.data import TrainingError, find_labeled_images

Box = tuple[int, int, int, int]  # left, top, width, height


def background(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A picture without a face: smooth colour noise with a few blurred shapes on it."""
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (size[1] // 40 + 1, size[0] // 40 + 1, 3), np.uint8)
    img = Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(3, 9)):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        w, h = rng.randrange(20, size[0] // 3), rng.randrange(20, size[1] // 3)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x, y, x + w, y + h), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(1, 6)))


def compose(faces: list[Image.Image], rng: random.Random, size: tuple[int, int] = (1600, 1200)) -> tuple[Image.Image, list[Box]]:
    """`faces` pasted side by side, each 8-30 % of the width (less where three must fit), on a background."""
    img = background(size, rng)
    slot = size[0] // len(faces)
    boxes = []
    for i, face in enumerate(faces):
        width = min(round(size[0] * rng.uniform(0.08, 0.30)), slot - 8)
        height = round(width * face.height / face.width)
        face = face.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        left = i * slot + rng.randrange(0, slot - width + 1)
        top = rng.randrange(0, max(1, size[1] - height))
        img.paste(face, (left, top))
        boxes.append((left, top, width, height))
    return img, boxes


def _jpeg(img: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


def _inside(point: tuple[float, float], box: Box) -> bool:
    return box[0] <= point[0] <= box[0] + box[2] and box[1] <= point[1] <= box[1] + box[3]


def measure(folder: Path, checkpoint: ckpt.Checkpoint, pool: DecodePool, pictures: int, seed: int) -> dict:
    rng = random.Random(seed)
    items = find_labeled_images(folder, checkpoint.class_names)
    rng.shuffle(items)
    rules = FaceRules()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layouts, paths, used, unreadable = [], [], 0, {}
        for i in range(pictures):
            group = items[used : used + 1 + i % 3] or items[: 1 + i % 3]
            used += len(group)
            shown = []
            for item in group:
                try:
                    shown.append((item, open_upright(item[0])))
                except (OSError, ValueError, Image.DecompressionBombError) as exc:  # as train.evaluate, skipped and listed
                    unreadable[item[0]] = f"{item[0]}: {type(exc).__name__}: {exc}"
            if not shown:
                continue
            img, boxes = compose([picture for _, picture in shown], rng)
            paths.append(_jpeg(img, work / f"photo{i:04d}.jpg"))
            layouts.append([(item, box) for (item, _), box in zip(shown, boxes, strict=True)])
        if not paths:
            raise TrainingError(f"{folder}: no readable image to paste")
        empty = [_jpeg(background((1600, 1200), rng), work / f"empty{i:04d}.jpg") for i in range(pictures)]

        def classify(files: list[Path], batch_size: int) -> list[Outcome]:
            return [o for batch in classify_in_batches(files, checkpoint, pool, rules, batch_size) for o in batch]

        crop_paths = sorted({p for layout in layouts for (p, _), _ in layout})
        crops = dict(zip(crop_paths, classify(crop_paths, 256), strict=True))
        outcomes = classify(paths, 64)
        given_a_face = sum(bool(o.faces) for o in classify(empty, 64))
    faces = found = right_in_photo = right_as_crop = 0
    for layout, outcome in zip(layouts, outcomes, strict=True):
        for (path, label), box in layout:
            faces += 1
            crop = crops[path].prediction
            right_as_crop += crop is not None and crop.label == checkpoint.class_names[label]
            centre = [f for f in outcome.faces if _inside((f.box[0] + f.box[2] / 2, f.box[1] + f.box[3] / 2), box)]
            if centre:
                found += 1
                right_in_photo += centre[0].prediction.label == checkpoint.class_names[label]
    return {
        "pictures": len(paths),
        "unreadable": list(unreadable.values()),
        "faces": faces,
        "found": found / faces,
        "accuracy_in_photos": right_in_photo / faces,
        "accuracy_as_crops": right_as_crop / faces,
        "empty_pictures": len(empty),
        "empty_pictures_given_a_face": given_a_face / len(empty),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.photos",
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelp,
        epilog="example: python -m train.photos ../shared/data/other/portraits --pictures 200\n"
        "exit status: 0 done; 1 a folder without a readable image; 2 usage or checkpoint error",
    )
    p.add_argument("folders", nargs="+", type=Path, help="labeled folders (female/, male/) whose faces are pasted")
    p.add_argument("--checkpoint", type=Path, default=model.DEFAULT_CHECKPOINT, help="checkpoint to measure")
    p.add_argument("--pictures", type=int, default=200, help="generated pictures per folder, and as many without a face")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated pictures")
    args = p.parse_args(argv)
    if args.pictures < 1:
        p.error("--pictures must be at least 1")
    try:
        checkpoint = ckpt.load(args.checkpoint)
    except ckpt.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for folder in args.folders:
        try:
            find_labeled_images(folder, checkpoint.class_names)
        except TrainingError as exc:
            p.error(str(exc))
    with DecodePool(usable_cpus()) as pool:
        for folder in args.folders:
            try:
                r = measure(folder, checkpoint, pool, args.pictures, args.seed)
            except TrainingError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            for line in r["unreadable"]:
                print(f"  unreadable, skipped: {line}")
            print(
                f"{folder}: {r['faces']} faces in {r['pictures']} pictures: found {r['found']:.1%}, "
                f"right {r['accuracy_in_photos']:.1%} in the photos against {r['accuracy_as_crops']:.1%} as crops; "
                f"{r['empty_pictures_given_a_face']:.1%} of {r['empty_pictures']} pictures without a face given one"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
