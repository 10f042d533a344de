"""Batched training augmentation on cached uint8 face chips.

Makes the model robust to what real photos vary in: how far the detector's landmarks, and so the
alignment, can be off (scale, shift, aspect, rotation), mirror images, lighting and coloured
light, grey images, blur and low resolution, sensor noise, partial occlusion, and glasses (in
CelebA they go mostly with men, while women with glasses are common elsewhere). Works on whole
batches with tensor ops, so it costs little next to the forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.faces import ChipSpec


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def eyes_of(chip: ChipSpec) -> tuple[float, float]:
    """Where the chip's template puts the eyes: the eye line and half the distance between the
    eyes, as fractions of the chip's height and width."""
    (left_x, left_y), (right_x, right_y) = chip.landmarks[:2]
    return (left_y + right_y) / 2, (right_x - left_x) / 2


def _glasses(x: torch.Tensor, eyes: torch.Tensor, gen: torch.Generator, s: float) -> torch.Tensor:
    """Spectacles or sunglasses over the eyes of a quarter of the images, whatever their class:
    oval or rounded-rectangle lenses, a frame of 1-3 pixels in black, brown or metal, a bridge,
    short temple arms, and for some tinted lenses. `eyes` is (N, 2): eye line, half eye distance."""
    n, _, h, w = x.shape
    pick = torch.nonzero(torch.rand(n, generator=gen) < 0.25 * s).flatten()
    k = len(pick)
    if not k:
        return x

    def col(values: torch.Tensor) -> torch.Tensor:  # per-image values against the (k, h, w) pixel grid
        return values.view(k, 1, 1)

    cy = col((eyes[pick, 0] + _uniform(k, -0.03, 0.03, gen)) * h)
    half = col(eyes[pick, 1] * _uniform(k, 0.9, 1.1, gen) * w)
    a = half * col(_uniform(k, 0.65, 0.9, gen))  # lens half-width, pixels
    b = a * col(_uniform(k, 0.55, 0.85, gen))  # lens half-height
    power = col(torch.where(torch.rand(k, generator=gen) < 0.5, 2.0, 4.0))  # oval or rounded rectangle
    thick = (half * col(_uniform(k, 0.08, 0.2, gen))).clamp(min=1.0)
    ys = (torch.arange(h) + 0.5).view(1, h, 1)
    xs = (torch.arange(w) + 0.5).view(1, 1, w)

    def band(distance: torch.Tensor) -> torch.Tensor:  # 1 within thick/2 of a line, fading over a pixel
        return (thick / 2 + 0.5 - distance).clamp(0, 1)

    frame, lens = torch.zeros(k, h, w), torch.zeros(k, h, w)
    for side in (-1, 1):
        cx = w / 2 + side * half
        r = (((xs - cx).abs() / a) ** power + ((ys - cy).abs() / b) ** power) ** (1 / power)
        frame = torch.maximum(frame, band((r - 1).abs() * (a * b).sqrt()))
        lens = torch.maximum(lens, (r < 1).float())
    bar = band((ys - (cy - 0.3 * b)).abs())
    inner = (xs - w / 2).abs()
    frame = torch.maximum(frame, bar * (inner < half - a + 0.5))  # the bridge
    frame = torch.maximum(frame, bar * (inner > half + a - 0.5) * (inner < half + 1.6 * a))  # temple arms
    shade = torch.rand(k, generator=gen)
    colour = torch.where(  # black, brown or metal
        col(shade < 0.6).unsqueeze(1),
        torch.rand(k, 1, 1, 1, generator=gen) * 0.15,
        torch.where(
            col(shade < 0.8).unsqueeze(1),
            torch.tensor([0.35, 0.22, 0.12]).view(1, 3, 1, 1) * _uniform(k, 0.5, 1.2, gen).view(k, 1, 1, 1),
            _uniform(k, 0.5, 0.85, gen).view(k, 1, 1, 1).expand(k, 3, 1, 1),
        ),
    )
    tint = col(torch.where(torch.rand(k, generator=gen) < 0.3, _uniform(k, 0.6, 0.95, gen), torch.zeros(k)))
    alpha = torch.maximum(frame, lens * tint).unsqueeze(1)
    x[pick] = x[pick] * (1 - alpha) + colour * alpha
    return x


# Alignment jitter: the chip's scale (zoom > 1: tighter), shift (fraction of the chip) and
# rotation (degrees) vary by up to these, as landmarks found on real photos do.
ZOOM = (0.88, 1.14)
SHIFT = 0.05
ROTATION = 10.0


def _geometry(x: torch.Tensor, gen: torch.Generator, s: float, fill: torch.Tensor) -> torch.Tensor:
    """`fill` (per channel, in [0, 1]) beyond the edges, as the chip itself is cut (ChipSpec.fill)."""
    n = x.shape[0]
    zoom = torch.exp(s * _uniform(n, *map(math.log, ZOOM), gen))
    aspect = torch.exp(_uniform(n, -0.06 * s, 0.06 * s, gen))
    angle = _uniform(n, -ROTATION * s, ROTATION * s, gen) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    sx, sy = aspect / zoom * flip, 1 / (aspect * zoom)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)  # output to input coordinates in [-1, 1], about the chip's centre
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    theta[:, :, 2] = _uniform(2 * n, -2 * SHIFT * s, 2 * SHIFT * s, gen).view(n, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill = fill.view(1, -1, 1, 1)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _colour(x: torch.Tensor, gen: torch.Generator, s: float) -> torch.Tensor:
    """Saturation, white balance, contrast and brightness are one affine colour map per image
    (applied in a single batched matmul), then gamma."""
    n = x.shape[0]
    saturation = _uniform(n, 1 - 0.6 * s, 1 + 0.5 * s, gen).clamp(min=0)
    saturation[torch.rand(n, generator=gen) < 0.15 * s] = 0.0  # some photos are greyscale
    luma = torch.tensor([0.299, 0.587, 0.114]).expand(3, 3)
    sat = saturation.view(n, 1, 1)
    mix = sat * torch.eye(3) + (1 - sat) * luma  # towards grey
    mix = _uniform(3 * n, 1 - 0.15 * s, 1 + 0.15 * s, gen).view(n, 3, 1) * mix  # white balance, coloured light
    contrast = _uniform(n, 1 - 0.4 * s, 1 + 0.4 * s, gen).clamp(min=0.1)
    brightness = _uniform(n, 1 - 0.4 * s, 1 + 0.4 * s, gen).clamp(min=0.1)
    mean = (mix @ x.mean(dim=(2, 3)).unsqueeze(2)).mean(dim=(1, 2))  # of the image after mixing
    # ((mix x - mean) * contrast + mean) * brightness
    offset = (brightness * (1 - contrast) * mean).view(n, 1, 1).expand(n, 3, 1)
    y = torch.baddbmm(offset, (brightness * contrast).view(n, 1, 1) * mix, x.reshape(n, 3, -1)).view_as(x)
    gamma = torch.exp(_uniform(n, -0.35 * s, 0.35 * s, gen)).view(n, 1, 1, 1)
    return y.clamp_(0, 1).pow_(gamma)


def _degrade(x: torch.Tensor, gen: torch.Generator, s: float) -> torch.Tensor:
    n, _, h, w = x.shape
    low = torch.rand(n, generator=gen) < 0.3 * s  # low resolution / blur: down- then up-sample
    if low.any():
        scale = float(_uniform(1, 0.3, 0.75, gen))
        small = F.interpolate(x[low], size=(max(8, round(h * scale)), max(8, round(w * scale))), mode="bilinear", antialias=True)
        x[low] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    noisy = torch.rand(n, generator=gen) < 0.2 * s
    x[noisy] += torch.randn((int(noisy.sum()), *x.shape[1:]), generator=gen) * 0.03
    occlude = torch.rand(n, generator=gen) < 0.2 * s  # a hand, a microphone, a sticker
    for i in torch.nonzero(occlude).flatten().tolist():
        eh, ew = int(_uniform(1, 0.15, 0.4, gen) * h), int(_uniform(1, 0.15, 0.4, gen) * w)
        top, left = int(torch.randint(0, h - eh + 1, (1,), generator=gen)), int(torch.randint(0, w - ew + 1, (1,), generator=gen))
        x[i, :, top : top + eh, left : left + ew] = torch.rand(3, 1, 1, generator=gen)
    return x.clamp(0, 1)


def augment(batch: torch.Tensor, gen: torch.Generator, chip: ChipSpec, strength: float = 1.0) -> torch.Tensor:
    """uint8 (N, 3, H, W) chips, cut as `chip` says -> augmented uint8 batch of the same shape,
    ready for `normalize`. The glasses go where `chip` puts the eyes.

    `strength` scales every range and probability: 0 leaves only the mirror flips, 1 is the
    default, larger values vary more."""
    eyes = torch.tensor(eyes_of(chip)).expand(len(batch), 2)
    x = _glasses(batch.float() / 255.0, eyes, gen, strength)
    fill = torch.tensor(chip.fill) / 255.0
    x = _degrade(_colour(_geometry(x, gen, strength, fill), gen, strength), gen, strength)
    return (x * 255.0).round().to(torch.uint8)
