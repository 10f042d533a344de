"""Training augmentation: shapes and ranges, the alignment jitter, and the glasses drawn over the
chip's eyes."""

import math

import pytest
import torch

import train.augment
from model.faces import ChipSpec
from train.augment import SHIFT, ZOOM, _geometry, _glasses, augment, eyes_of

CHIP = ChipSpec(64, 64)
EYES = eyes_of(CHIP)


def grey_batch(n: int = 8, size: int = 64) -> torch.Tensor:
    return torch.full((n, 3, size, size), 128, dtype=torch.uint8)


def test_augment_keeps_shape_and_type():
    batch = torch.randint(0, 256, (16, 3, 64, 48), dtype=torch.uint8)
    out = augment(batch, torch.Generator().manual_seed(0), ChipSpec(64, 48))
    assert out.shape == batch.shape and out.dtype == torch.uint8


def test_strength_zero_only_mirrors():
    batch = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment(batch, torch.Generator().manual_seed(0), ChipSpec(32, 32), strength=0.0)
    for original, augmented in zip(batch, out, strict=True):
        assert torch.equal(augmented, original) or torch.equal(augmented, original.flip(2))


def eye_spots(x: torch.Tensor) -> list[tuple[float, float, float]]:
    """For each image with two bright spots, one each side of the middle: (x, y) of their
    midpoint and half their distance, as fractions of the image."""
    size = x.shape[-1]
    ys, xs = ((torch.arange(size) + 0.5) / size).view(size, 1), ((torch.arange(size) + 0.5) / size).view(1, size)
    found = []
    for image in x[:, 0]:
        (x0, y0), (x1, y1) = [
            (float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())) for w in (image * (xs < 0.5), image * (xs >= 0.5))
        ]
        found.append(((x0 + x1) / 2, (y0 + y1) / 2, math.hypot(x1 - x0, y1 - y0) / 2))
    return found


def test_geometry_jitters_the_alignment_within_its_ranges():
    """A dot on each eye of the chip: after the jitter the eyes' midpoint moves by at most the
    shift (and the rotation about the centre), and half their distance changes by at most the zoom."""
    size, n = 128, 64
    line, half = EYES
    grey = CHIP.fill[0] / 255
    x = torch.full((n, 1, size, size), grey)  # the dots on the grey that also fills the chip beyond the picture
    for centre in (0.5 - half, 0.5 + half):
        x[:, :, int(line * size) - 1 : int(line * size) + 2, int(centre * size) - 1 : int(centre * size) + 2] = 1.0
    out = _geometry(x, torch.Generator().manual_seed(0), 1.0, torch.tensor([grey]))
    stretch = 1.07  # aspect changes of up to e^0.06
    spots = eye_spots((out - grey).clamp(min=0))
    for mid_x, mid_y, found_half in spots:
        reach = SHIFT + abs(line - 0.5) * 0.2 + 2 / size  # the shift, and a rotation of 10 degrees about the centre
        assert abs(mid_x - 0.5) < reach and abs(mid_y - line) < reach
        assert half / ZOOM[1] / stretch - 1 / size < found_half < half / ZOOM[0] * stretch + 1 / size
    assert len({round(h, 3) for _, _, h in spots}) > n // 2  # and it does vary


def test_glasses_sit_on_the_eye_line():
    x = grey_batch().float() / 255
    eyes = torch.tensor([[0.3, 0.2]] * 4 + [[0.6, 0.15]] * 4)
    out = _glasses(x.clone(), eyes, torch.Generator().manual_seed(0), s=4.0)  # probability 1: every image
    changed = (out - x).abs().sum(dim=(1, 3)) > 0  # (N, rows)
    for i, (line, _) in enumerate(eyes.tolist()):
        rows = torch.nonzero(changed[i]).flatten().float() / 64
        assert len(rows), f"image {i} got no glasses"
        assert abs(float(rows.mean()) - line) < 0.08 and float(rows.max() - rows.min()) < 0.3


def test_no_glasses_at_strength_zero():
    x = grey_batch().float() / 255
    out = _glasses(x.clone(), torch.tensor([EYES] * 8), torch.Generator().manual_seed(0), s=0.0)
    assert torch.equal(out, x)


def test_the_glasses_follow_the_eyes_of_the_chip_the_faces_were_cut_with(monkeypatch):
    lower = ChipSpec(64, 64, tuple((x, y + 0.1) for x, y in CHIP.landmarks))
    assert eyes_of(lower) == pytest.approx((EYES[0] + 0.1, EYES[1]))
    given = []

    def glasses(x, eyes, gen, s):
        given.append(eyes)
        return x

    monkeypatch.setattr(train.augment, "_glasses", glasses)
    batch = grey_batch(3)
    for chip in (CHIP, lower):
        augment(batch, torch.Generator().manual_seed(0), chip)
    assert [tuple(e[0].tolist()) for e in given] == [pytest.approx(EYES), pytest.approx(eyes_of(lower))]
    assert all(len(e) == 3 for e in given)
