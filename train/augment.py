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


def _geometry(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    zoom = torch.exp(_uniform(n, math.log(0.75), math.log(1.3), gen))  # >1 tighter crop, <1 looser
    aspect = torch.exp(_uniform(n, -0.1, 0.1, gen))
    angle = _uniform(n, -15, 15, gen) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    sx, sy = aspect / zoom * flip, 1 / (aspect * zoom)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    theta[:, :, 2] = _uniform(2 * n, -0.08, 0.08, gen).view(n, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _colour(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    saturation = _uniform(n, 0.4, 1.5, gen)
    saturation[torch.rand(n, generator=gen) < 0.15] = 0.0  # some photos are greyscale
    x = grey + (x - grey) * saturation.view(n, 1, 1, 1)
    channel_gain = _uniform(3 * n, 0.9, 1.1, gen).view(n, 3, 1, 1)  # white balance
    x = x * channel_gain
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(n, 0.6, 1.4, gen).view(n, 1, 1, 1) + mean  # contrast
    x = x * _uniform(n, 0.6, 1.4, gen).view(n, 1, 1, 1)  # brightness
    gamma = torch.exp(_uniform(n, -0.35, 0.35, gen)).view(n, 1, 1, 1)
    return x.clamp(0, 1) ** gamma


def _degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    low = torch.rand(n, generator=gen) < 0.3  # low resolution / blur: down- then up-sample
    if low.any():
        scale = float(_uniform(1, 0.3, 0.75, gen))
        small = F.interpolate(x[low], size=(max(8, round(h * scale)), max(8, round(w * scale))), mode="bilinear", antialias=True)
        x[low] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    noisy = (torch.rand(n, generator=gen) < 0.2).view(n, 1, 1, 1)
    x = x + noisy * torch.randn(x.shape, generator=gen) * 0.03
    occlude = torch.rand(n, generator=gen) < 0.2  # a hand, a microphone, a sticker
    for i in torch.nonzero(occlude).flatten().tolist():
        eh, ew = int(_uniform(1, 0.15, 0.4, gen) * h), int(_uniform(1, 0.15, 0.4, gen) * w)
        top, left = int(torch.randint(0, h - eh + 1, (1,), generator=gen)), int(torch.randint(0, w - ew + 1, (1,), generator=gen))
        x[i, :, top : top + eh, left : left + ew] = torch.rand(3, 1, 1, generator=gen)
    return x.clamp(0, 1)


def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> augmented uint8 batch of the same shape, ready for `normalize`."""
    x = batch.float() / 255.0
    x = _degrade(_colour(_geometry(x, gen), gen), gen)
    return (x * 255.0).round().to(torch.uint8)
