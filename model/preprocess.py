"""The one preprocessing path shared by training, evaluation and serving.

    bytes -> decode (JPEG draft mode) -> EXIF orientation -> RGB -> centre crop to the model's
    aspect ratio -> resize to the model's input -> uint8 CHW tensor            (load_image)
    uint8 NCHW batch -> float, scaled to [0, 1], minus mean, over std          (normalize)

Training decodes each file once with `load_image` and caches the uint8 tensors; augmentation
works on those, and evaluation and serving feed them to `normalize` unchanged. So what the
model sees at serving time is exactly what it was validated on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# Refuse images with more pixels than this before decoding any of them (decompression bombs).
MAX_PIXELS = 80_000_000
# Transparent pixels are composited onto this colour.
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """A file that cannot be turned into a model input; the message says why."""


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: input height and width, and per-channel normalization."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"height": self.height, "width": self.width, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(int(d["height"]), int(d["width"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))


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


def _centre_box(width: int, height: int, aspect: float) -> tuple[int, int, int, int]:
    """The largest centred box of the given width/height ratio."""
    if width / height > aspect:
        w = round(height * aspect)
        left = (width - w) // 2
        return (left, 0, left + w, height)
    h = round(width / aspect)
    top = (height - h) // 2
    return (0, top, width, top + h)


def load_image(data: bytes, height: int, width: int) -> torch.Tensor:
    """Decode image bytes into a uint8 tensor of shape (3, height, width). Raises ImageError."""
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{img.width}x{img.height} pixels is over the limit of {MAX_PIXELS}")
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale while that still leaves >= 2x the target.
            img.draft("RGB", (2 * max(height, width), 2 * max(height, width)))
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            box = _centre_box(img.width, img.height, width / height)
            img = img.resize((width, height), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
            arr = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unrecognized format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"not a readable image: {exc}") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def normalize(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalized float32, channels-last for faster CPU convolutions."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
    out = (batch.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last)


def preprocess(data: bytes, spec: InputSpec) -> torch.Tensor:
    """Image bytes -> the normalized (1, 3, H, W) model input: load_image then normalize."""
    return normalize(load_image(data, spec.height, spec.width).unsqueeze(0), spec)
