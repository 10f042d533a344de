import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.decode import MAX_PIXELS, ImageError, decode_picture
from model.preprocess import InputSpec, normalize, to_batch
from tests.conftest import image_bytes

H, W = 64, 64


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)


def check(data: bytes) -> torch.Tensor:
    """The picture as decoded, upright RGB, (3, height, width)."""
    pixels, _ = decode_picture(data, max(H, W))
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
    return to_tensor(pixels)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgb_jpeg_and_png():
    check(image_bytes())
    check(image_bytes(fmt="PNG"))


def test_greyscale_becomes_three_equal_channels():
    out = check(save(Image.new("L", (50, 60), 77), "PNG"))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert int(out[0, 10, 10]) == 77


def test_cmyk_jpeg():
    out = check(save(Image.new("CMYK", (50, 60), (0, 255, 255, 0)), "JPEG"))  # pure red in CMYK
    r, g, b = (int(c) for c in out[:, 30, 30])
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    img.info["transparency"] = 0
    out = check(save(img, "PNG", transparency=0))
    assert out.min() == 255  # fully transparent black -> white background


def test_rgba_and_la():
    check(save(Image.new("RGBA", (30, 30), (10, 20, 30, 128)), "PNG"))
    check(save(Image.new("LA", (30, 30), (100, 255)), "PNG"))


def test_16bit_png_uses_the_full_range():
    arr = np.full((40, 40), 40000, dtype=np.uint16)
    arr[:, :20] = 10000
    out = check(save(Image.fromarray(arr), "PNG"))
    assert int(out[0, 20, 30]) == 255 and 50 < int(out[0, 20, 2]) < 80  # scaled, not clipped


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (80, 40), "black")
    img.paste((255, 255, 255), (0, 0, 40, 40))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    rotated_on_disk = check(save(img, "JPEG", exif=exif, quality=95))
    upright = check(save(img.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95))
    assert (rotated_on_disk.float() - upright.float()).abs().mean() < 3
    assert rotated_on_disk[:, :10].float().mean() > 200  # white half is now on top


def test_tiny_and_huge():
    check(image_bytes(size=(1, 1)))
    # a big JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale that leaves the longer side as asked
    big = save(Image.new("RGB", (6000, 4000), (90, 90, 90)), "JPEG")
    assert [(p.shape, scale) for p, scale in (decode_picture(big, side) for side in (1500, 960, 750, 64))] == [
        ((1000, 1500, 3), 1 / 4),
        ((1000, 1500, 3), 1 / 4),
        ((500, 750, 3), 1 / 8),
        ((500, 750, 3), 1 / 8),
    ]


def test_animated_gif_takes_the_first_frame():
    frames = [Image.new("P", (20, 20), i) for i in (1, 2)]
    data = io.BytesIO()
    frames[0].save(data, "GIF", save_all=True, append_images=frames[1:])
    check(data.getvalue())


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, I am text\n" * 10, "unrecognized"),
        (bytes(range(256)) * 20, "unrecognized"),
        (image_bytes(size=(200, 200))[:300], "readable"),
    ],
)
def test_unreadable_input_says_why(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_picture(data, H)


def test_decompression_bomb_is_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 100
    data = save(Image.new("1", (side, side)), "PNG")  # tiny file, enormous pixel count
    assert len(data) < 2_000_000
    with pytest.raises(ImageError, match="over the limit"):
        decode_picture(data, H)


def test_to_batch_stacks_without_changing_pixels_and_is_channels_last():
    arrays = [np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8) for i in range(3)]
    batch = to_batch(arrays)
    assert torch.equal(batch, torch.stack([to_tensor(a) for a in arrays]))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    spec = InputSpec(H, W, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert torch.equal(normalize(batch, spec), normalize(batch.contiguous(), spec))


def test_normalize_is_the_per_channel_formula_in_channels_last_memory():
    spec = InputSpec(5, 7, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    batch = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    out = normalize(batch, spec)
    assert torch.allclose(out, (batch / 255.0 - mean) / std, atol=1e-5)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)


def test_only_the_supported_formats_are_opened():
    """An EPS file under a .jpg name is refused before Pillow could hand it to Ghostscript."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    with pytest.raises(ImageError, match="unrecognized"):
        decode_picture(eps, H)
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"):
        check(image_bytes(fmt=fmt))
