"""Batched training augmentation on cached uint8 images.

Makes the model robust to what real photos vary in: looser and tighter crops (scale, shift,
aspect), small rotations, mirror images, lighting and colour, grey images, blur and low
resolution, sensor noise and partial occlusion. Works on whole batches with tensor ops, so it
costs little next to the forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def _geometry(x: torch.Tensor, gen: torch.Generator, s: float) -> torch.Tensor:
    n = x.shape[0]
    zoom = torch.exp(_uniform(n, s * math.log(0.75), s * math.log(1.3), gen))  # >1 tighter crop, <1 looser
    aspect = torch.exp(_uniform(n, -0.1 * s, 0.1 * s, gen))
    angle = _uniform(n, -15 * s, 15 * s, gen) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    sx, sy = aspect / zoom * flip, 1 / (aspect * zoom)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    theta[:, :, 2] = _uniform(2 * n, -0.08 * s, 0.08 * s, gen).view(n, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _colour(x: torch.Tensor, gen: torch.Generator, s: float) -> torch.Tensor:
    """Saturation, white balance, contrast and brightness are one affine colour map per image
    (applied in a single batched matmul), then gamma."""
    n = x.shape[0]
    saturation = _uniform(n, 1 - 0.6 * s, 1 + 0.5 * s, gen).clamp(min=0)
    saturation[torch.rand(n, generator=gen) < 0.15 * s] = 0.0  # some photos are greyscale
    luma = torch.tensor([0.299, 0.587, 0.114]).expand(3, 3)
    sat = saturation.view(n, 1, 1)
    mix = sat * torch.eye(3) + (1 - sat) * luma  # towards grey
    mix = _uniform(3 * n, 1 - 0.1 * s, 1 + 0.1 * s, gen).view(n, 3, 1) * mix  # white balance
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


def augment(batch: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> augmented uint8 batch of the same shape, ready for `normalize`.

    `strength` scales every range and probability: 0 leaves only the mirror flips, 1 is the
    default, larger values vary more."""
    x = batch.float() / 255.0
    x = _degrade(_colour(_geometry(x, gen, strength), gen, strength), gen, strength)
    return (x * 255.0).round().to(torch.uint8)
