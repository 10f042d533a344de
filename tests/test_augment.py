"""Training augmentation: shapes and ranges, faces moved to one spread of sizes, and the glasses
drawn over the eyes."""

import math
from pathlib import Path

import pytest
import torch

from train import augment as augment_module
from train.augment import DEFAULT_EYES, EYES, OWN_ZOOM, TARGET_EYE_LINE, TARGET_HALF_EYES, _geometry, _glasses, augment, eyes_of


def grey_batch(n: int = 8, size: int = 64) -> torch.Tensor:
    return torch.full((n, 3, size, size), 128, dtype=torch.uint8)


def test_augment_keeps_shape_and_type():
    batch = torch.randint(0, 256, (16, 3, 64, 48), dtype=torch.uint8)
    out = augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8


def test_strength_zero_only_mirrors():
    batch = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment(batch, torch.Generator().manual_seed(0), strength=0.0)
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


@pytest.mark.parametrize("moved", [True, False])
def test_geometry_spreads_every_source_over_the_same_face_sizes(monkeypatch, moved):
    """A dot on each eye of tight (CelebA) and loose (AAF) faces. Moved images end up with their
    eyes on the target eye line, half the target eye distance apart; the others keep their source's
    eye line and zoom only by OWN_ZOOM."""
    monkeypatch.setattr(augment_module, "MOVED_SHARE", 1.0 if moved else 0.0)
    size, n = 128, 64
    eyes = torch.tensor([EYES["unprefixed"]] * (n // 2) + [EYES["aaf"]] * (n // 2))
    x = torch.zeros(n, 1, size, size)
    for i, (line, half) in enumerate(eyes.tolist()):
        for centre in (0.5 - half, 0.5 + half):
            x[i, :, int(line * size) - 1 : int(line * size) + 2, int(centre * size) - 1 : int(centre * size) + 2] = 1.0
    out = _geometry(x, torch.Generator().manual_seed(0), 1.0, eyes)
    jitter, stretch = 0.04 + 1 / size, 1.11  # the random shift, and aspect changes of up to e^0.1
    for (mid_x, mid_y, half), (line, source_half) in zip(eye_spots(out), eyes.tolist(), strict=True):
        assert abs(mid_x - 0.5) < jitter
        if moved:
            assert TARGET_EYE_LINE[0] - jitter < mid_y < TARGET_EYE_LINE[1] + jitter
            assert TARGET_HALF_EYES[0] / stretch - 1 / size < half < TARGET_HALF_EYES[1] * stretch + 1 / size
        else:
            assert abs(mid_y - line) < jitter
            low, high = (source_half * z for z in OWN_ZOOM)
            assert low / stretch - 1 / size < half < high * stretch + 1 / size


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
    out = _glasses(x.clone(), torch.tensor([DEFAULT_EYES] * 8), torch.Generator().manual_seed(0), s=0.0)
    assert torch.equal(out, x)


def test_eyes_of_uses_each_source_and_a_default():
    eyes = eyes_of([Path("123.jpg"), Path("aaf_01A30.jpg"), Path("scut_AF1.jpg"), Path("other_1.jpg")])
    expected = torch.tensor([EYES["unprefixed"], EYES["aaf"], EYES["scut"], DEFAULT_EYES])
    assert torch.equal(eyes, expected)
