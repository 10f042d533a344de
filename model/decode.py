"""Reading and decoding image files: the first part of the one preprocessing path.

    bytes -> decode (JPEG draft mode: no larger than detection needs) -> EXIF orientation -> RGB
          -> uint8 HWC array and its scale                                   (decode_picture)
          -> every face's chip (model.faces.find_faces)                      (decode_file)

`model.pool.DecodePool` runs `decode_file` in worker processes for the service, `--once`,
evaluation and training. This module is free of torch, so those workers start quickly and stay
small; `model.preprocess` turns the chips into model input.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from model import DEFAULT_MAX_BYTES
from model.faces import NO_FACE, Face, Preprocessing, find_faces
from model.files import FileRefused, Identity, file_identity, read_regular_file

# Refuse images with more pixels than this before decoding any of them (decompression bombs).
MAX_PIXELS = 80_000_000
# decode_picture checks MAX_PIXELS itself, right after opening, with the size in the reason;
# Pillow's own check would refuse the largest ones first, as if they were damaged.
Image.MAX_IMAGE_PIXELS = None
# The only formats opened: Pillow would otherwise also run, say, Ghostscript on an EPS file
# uploaded under a .jpg name. (JPEG includes MPO, the variant of many cameras.)
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
DRAFT_FORMATS = ("JPEG", "MPO")  # decoded at reduced scale by draft(), not shrunk afterwards
# Modes that Image.reduce works on directly; 16-bit greyscale becomes 32-bit first (I), others RGB.
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F")
# Transparent pixels are composited onto this colour.
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """A file that cannot be turned into a model input; the message says why."""


def read_image_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read an image file as model.files.read_regular_file does, never through a symlink. Raises ImageError."""
    try:
        return read_regular_file(path, max_bytes, follow_symlinks=False)
    except FileRefused as exc:
        raise ImageError(str(exc)) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greyscale: scale the real range into 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / top if top > 255.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


def exif_upright(img: Image.Image) -> Image.Image:
    """Turned as its EXIF orientation says; as it is where the EXIF block cannot be read (Pillow
    raises on a damaged one in a PNG or WebP, whose pixels are fine)."""
    try:
        return ImageOps.exif_transpose(img)
    except (SyntaxError, ValueError, OSError, struct.error, KeyError, TypeError):
        return img


def open_upright(path: str | Path) -> Image.Image:
    """The picture at `path` in RGB as it is shown (EXIF orientation applied, as decode_picture
    does), read in full so that the file is closed: for pictures made of or drawn over answers."""
    with Image.open(path) as img:
        return exif_upright(img).convert("RGB")


def decode_picture(data: bytes, longest_side: int) -> tuple[np.ndarray, float]:
    """Decode image bytes into a uint8 RGB array, upright (EXIF), and the scale it was decoded at:
    a JPEG larger than needed is decoded at 1/2, 1/4 or 1/8 of its size, but its longer side no
    smaller than `longest_side`; any other picture twice that size or more is shrunk by a whole
    factor (a box filter) as soon as it is decoded, before the copies that converting it takes,
    so that a worker never holds much more than one full-size decode. Raises ImageError."""
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{img.width}x{img.height} pixels is over the limit of {MAX_PIXELS}")
            full_side = max(img.size)
            reduce = longest_side / full_side
            if reduce < 1:  # draft keeps both sides at least the requested ones: ask in the picture's own shape
                img.draft("RGB", (math.ceil(img.width * reduce), math.ceil(img.height * reduce)))
            img.load()
            if img.format not in DRAFT_FORMATS and (factor := max(img.size) // longest_side) >= 2:
                if img.mode.startswith("I;16"):
                    img = img.convert("I")
                img = (img if img.mode in REDUCIBLE_MODES else _to_rgb(img)).reduce(factor)
            # Of the longer side: draft and reduce round each side up, which on the short side of a
            # narrow picture is a large share of it.
            scale = max(img.size) / full_side
            img = exif_upright(img)
            return np.array(_to_rgb(img), dtype=np.uint8), scale  # a writable copy
    except (ImageError, MemoryError):  # MemoryError: the worker's limit, reported as such
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unrecognized format)") from None
    except Exception as exc:  # a damaged file can make Pillow raise almost anything (struct.error, ...)
        kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
        raise ImageError(f"not a readable image: {kind}: {exc}") from exc


def decode_faces(data: bytes, prep: Preprocessing) -> list[Face]:
    """Image bytes -> the chips of its faces, largest first. Raises ImageError, also for no face."""
    rgb, scale = decode_picture(data, prep.detector.far_side)
    faces = find_faces(rgb, scale, prep.chip, prep.detector, prep.rules)
    if not faces:
        raise ImageError(NO_FACE)
    return faces


class Decoded(NamedTuple):
    """One file's decoding result: its faces, or the reason there are none."""

    faces: list[Face] | None
    error: str | None
    sha256: str | None  # of the bytes read, when they could be read
    identity: Identity | None  # of the inbox entry before it was read (model.files.file_identity)


def decode_file(path: Path, prep: Preprocessing, max_bytes: int = DEFAULT_MAX_BYTES) -> Decoded:
    """Read, hash and decode one file; a failure is a reason, never an exception. Runs in a worker."""
    identity = file_identity(path)  # before the read: what was read is this entry's, or intake sees a change
    return decode_read(lambda: read_image_bytes(path, max_bytes), prep, identity)


def decode_read(read: Callable[[], bytes], prep: Preprocessing, identity: Identity | None = None) -> Decoded:
    """Hash and decode the bytes `read` returns (it raises ImageError for a file it will not read);
    a failure is a reason, never an exception. What decode_file does with a reader of any kind."""
    try:
        data = read()
    except ImageError as exc:
        return Decoded(None, str(exc), None, identity)
    except MemoryError:  # the worker's limit: the pool says so
        raise
    except Exception as exc:  # a storage library's own error (pyarrow's ArrowInvalid, ...)
        return Decoded(None, f"cannot read: {type(exc).__name__}: {exc}", None, identity)
    digest = hashlib.sha256(data).hexdigest()
    try:
        return Decoded(decode_faces(data, prep), None, digest, identity)
    except ImageError as exc:
        return Decoded(None, str(exc), digest, identity)
    except MemoryError:
        raise
    except Exception as exc:  # a fault while finding faces (OpenCV, a shape no rule foresaw): this file alone fails
        return Decoded(None, f"faces could not be looked for: {type(exc).__name__}: {exc}", digest, identity)
