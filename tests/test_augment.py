"""Training augmentation: shapes and ranges, and the glasses drawn over the eyes."""

from pathlib import Path

import torch

from train.augment import DEFAULT_EYES, EYES, _glasses, augment, eyes_of


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
