"""Shared fixtures: a tiny random-weight checkpoint, image makers, the shared data location."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model import checkpoint as ckpt
from model.faces import ChipSpec, DetectorSpec, FaceRules, Preprocessing
from model.network import GenderNet
from model.preprocess import InputSpec

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "faces").is_dir(), reason=f"shared face data not found at {SHARED_DATA} (see shared/data/README.md)"
)
TINY_ARCH = {"stem_width": 4, "widths": [8, 8]}
TINY_SPEC = InputSpec(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
TINY_CHIP = ChipSpec(TINY_SPEC.height, TINY_SPEC.width)


def make_tiny_checkpoint(path: Path, seed: int = 0, head_scale: float = 1.0) -> str:
    """Random weights; a large head_scale pushes probabilities away from 0.5, so that answers
    do not flip with the tiny float differences between batch sizes."""
    torch.manual_seed(seed)
    model = GenderNet(**TINY_ARCH).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(head_scale)
    meta = {"note": f"random weights, seed {seed}"}
    return ckpt.save(path, model, TINY_ARCH, TINY_SPEC, ["female", "male"], meta, TINY_CHIP, DetectorSpec())


# The generated test images hold no faces: unless a test is about faces, every picture is answered
# whole (the `faces.no_face: answer` setting), so that the plumbing tests see answers.
ANSWER_EVERY_PICTURE = FaceRules(no_face="answer")


def tiny_preprocessing(rules: FaceRules = ANSWER_EVERY_PICTURE) -> Preprocessing:
    return Preprocessing(TINY_CHIP, DetectorSpec(), rules)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    make_tiny_checkpoint(path)
    return path


def image_bytes(
    size: tuple[int, int] = (40, 50), colour: tuple[int, int, int] = (200, 120, 90), fmt: str = "JPEG", mode: str = "RGB", **save
) -> bytes:
    img = Image.new(mode, size, colour if mode == "RGB" else None)
    if mode == "RGB":
        # a little structure, so decoders and resizers have something to do
        for x in range(0, size[0], 7):
            for y in range(size[1]):
                img.putpixel((x, y), (colour[2], colour[0], colour[1]))
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def strictly_valid(data: bytes) -> object:
    """JSON as a strict parser (Perl's JSON::PP) reads it: UTF-8, and no escaped lone surrogates."""
    value = json.loads(data.decode("utf-8"))
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return value


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def slow_jpeg(scans: int, side: int = 4000) -> bytes:
    """A small progressive JPEG that takes long to decode: one of its AC scans repeated `scans`
    times (each repeat is re-applied to every block; about 0.6 ms per repeat at 4000 px here)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 90, 60)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    segments, i = [], 2
    while data[i + 1] != 0xD9:  # up to the end-of-image marker
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if data[i + 1] == 0xDA:  # start of scan: entropy-coded data runs to the next marker
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        segments.append(data[i:end])
        i = end
    scan = min((s for s in segments[1:] if s[1] == 0xDA), key=len)  # a small scan, not the first (DC) one
    return b"\xff\xd8" + b"".join(segments) + scan * scans + b"\xff\xd9"
