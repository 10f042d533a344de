"""A hostile corpus through the running service: each entry is classified or quarantined with its
reason, the service stays up, memory stays bounded, nothing outside its folders is touched."""

import io
import os
import random
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.harness import ServiceProcess, drop
from model.decode import MAX_PIXELS, ImageError, decode_picture
from tests.conftest import image_bytes


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def hostile_corpus() -> tuple[dict[str, bytes], set[str]]:
    """name -> bytes, and the names that must end in failed/."""
    rng = random.Random(0)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))
    big = io.BytesIO()
    noise.save(big, "JPEG", quality=98)
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = io.BytesIO()
    Image.new("RGB", (60, 40), (120, 80, 60)).save(rotated, "JPEG", exif=exif)
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0] + [200, 100, 50] * 255)
    gif = io.BytesIO()
    frames = [Image.new("P", (30, 30), i) for i in (1, 2, 3)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    cmyk = io.BytesIO()
    Image.new("CMYK", (50, 50), (10, 200, 30, 5)).save(cmyk, "JPEG")
    good = image_bytes()
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": image_bytes(size=(300, 300))[:400],
        "random.jpg": bytes(rng.randrange(256) for _ in range(5000)),
        "text.jpg": b"Dear operator,\nthis is not a photo.\n",
        "bomb.png": png(Image.new("1", (10000, 10000))),
        "too-big.jpg": big.getvalue(),
    }
    fine = {
        "with spaces.jpg": good,
        "ünïcødé-фото-写真.jpg": good,
        "new\nline.jpg": good,
        "-leading-dash.jpg": good,
        ("l" * 251) + ".jpg": good,
        "cmyk.jpg": cmyk.getvalue(),
        "sixteen.png": png(Image.fromarray(np.full((40, 40), 30000, dtype=np.uint16))),
        "palette.png": png(palette, transparency=0),
        "animated.gif": gif.getvalue(),
        "exif-rotated.jpg": rotated.getvalue(),
        "grey.jpg": png(Image.new("L", (40, 40), 128)),
    }
    return bad | fine, set(bad)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_hostile_corpus(tmp_path, tiny_checkpoint):
    svc = ServiceProcess(tmp_path, tiny_checkpoint, intake={"max_file_bytes": 200_000, "settle_seconds": 0.3})
    try:
        svc.start()
        corpus, must_fail = hostile_corpus()
        assert len(corpus["too-big.jpg"]) > 200_000
        passwd = Path("/etc/passwd").read_bytes()
        outside = tmp_path / "outside.jpg"
        outside.write_bytes(image_bytes())
        for name, data in corpus.items():
            drop(svc.inbox, name, data)
        os.symlink("/etc/passwd", svc.inbox / "passwd.jpg")
        os.symlink(outside, svc.inbox / "link-to-photo.jpg")
        os.mkfifo(svc.inbox / "fifo.jpg")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(svc.inbox / "sock.jpg"))
        drop(svc.inbox, os.fsdecode(b"caf\xe9.jpg"), image_bytes())  # a name that is not valid UTF-8
        (svc.inbox / "x.jpg").mkdir()
        must_fail |= {"passwd.jpg", "link-to-photo.jpg", "fifo.jpg", "sock.jpg"}
        total = len(corpus) + 5
        svc.wait_handled(total, timeout=60)
        drop(svc.inbox, "after.jpg", image_bytes())  # still answering
        svc.wait_handled(total + 1, timeout=30)
        assert svc.proc.poll() is None
        assert rss_mb(svc.proc.pid) < 800

        records = {r["source"].rsplit("/", 1)[1]: r for r in svc.journal_records()}
        failed = {name for name, r in records.items() if r["status"] == "failed"}
        assert failed == must_fail
        assert all(records[n]["reason"] for n in failed)
        logged = {e["file"] for e in svc.events("failed")}
        assert logged == must_fail
        assert "over the limit" in records["too-big.jpg"]["reason"] and "over the limit" in records["bomb.png"]["reason"]
        assert records["sock.jpg"]["reason"] == "is a socket, not a regular file"
        assert set(os.listdir(svc.failed)) == must_fail
        assert os.path.islink(svc.failed / "passwd.jpg")  # the link itself was moved, never followed
        assert (svc.inbox / "x.jpg").is_dir() and outside.exists()
        assert Path("/etc/passwd").read_bytes() == passwd
        assert len(os.listdir(svc.done)) == len(corpus) - len(must_fail & set(corpus)) + 2
        assert svc.stop() == 0
    finally:
        svc.close()


@pytest.mark.parametrize("side", [9_000, 14_000, 40_000])  # from 179 megapixels on, Pillow would refuse first
def test_a_picture_over_the_pixel_limit_says_its_size_whatever_its_size(side):
    header = png(Image.new("L", (1, 1)))
    ihdr = struct.pack(">II", side, side) + header[24:29]  # width, height, then depth, colour, methods
    data = header[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + header[33:]
    with pytest.raises(ImageError, match=f"^{side}x{side} pixels is over the limit of {MAX_PIXELS}$"):
        decode_picture(data, 640)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_a_damaged_exif_block_leaves_the_picture_readable(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (60, 40), (200, 100, 50)).save(buffer, fmt, exif=b"Exif\x00\x00" + b"\x00" * 32)
    rgb, scale = decode_picture(buffer.getvalue(), 640)
    assert rgb.shape == (40, 60, 3) and scale == 1.0  # as it is, not turned


@pytest.mark.parametrize(("fmt", "expected"), [("PNG", 640 / 6400), ("JPEG", 1 / 8)])
def test_a_narrow_picture_is_scaled_by_its_longer_side(fmt, expected):
    buffer = io.BytesIO()
    Image.new("RGB", (201, 6400), (90, 120, 150)).save(buffer, fmt)
    rgb, scale = decode_picture(buffer.getvalue(), 640)
    assert scale == pytest.approx(expected) and rgb.shape[0] == round(6400 * expected)


def test_a_16_bit_picture_is_reduced_before_it_is_converted():
    buffer = io.BytesIO()
    Image.fromarray(np.full((1600, 2000), 40000, dtype=np.uint16)).save(buffer, "PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    rgb, scale = decode_picture(buffer.getvalue(), 640)
    assert rgb.shape == (534, 667, 3) and scale == pytest.approx(667 / 2000) and (rgb == 255).all()
