"""Reading and decoding image files: the first part of the one preprocessing path.

    bytes -> decode (JPEG draft mode: no larger than detection needs) -> EXIF orientation -> RGB
          -> uint8 HWC array and its scale                                   (decode_picture)
          -> every face's chip (model.faces.find_faces)                      (decode_files)

`DecodePool` runs `decode_files` in worker processes for the service, `--once`, evaluation and
training. This module is free of torch, so those workers start quickly and stay small;
`model.preprocess` turns the chips into model input.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from model import DEFAULT_MAX_BYTES
from model.faces import NO_FACE, Face, Preprocessing, find_faces
from model.files import FileRefused, Identity, file_identity, read_regular_file

# Refuse images with more pixels than this before decoding any of them (decompression bombs).
MAX_PIXELS = 80_000_000
# The only formats opened: Pillow would otherwise also run, say, Ghostscript on an EPS file
# uploaded under a .jpg name. (JPEG includes MPO, the variant of many cameras.)
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
# Transparent pixels are composited onto this colour.
BACKGROUND = (255, 255, 255)
CRASHED = "the decoder crashed on this file"


class ImageError(ValueError):
    """A file that cannot be turned into a model input; the message says why."""


def read_image_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read an image file as model.files.read_regular_file does, never through a symlink. Raises ImageError."""
    try:
        return read_regular_file(path, max_bytes, follow_symlinks=False)
    except FileRefused as exc:
        raise ImageError(str(exc)) from None


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


def decode_picture(data: bytes, longest_side: int) -> tuple[np.ndarray, float]:
    """Decode image bytes into a uint8 RGB array, upright (EXIF), and the scale it was decoded at:
    a JPEG larger than needed is decoded at 1/2, 1/4 or 1/8 of its size, but its longer side no
    smaller than `longest_side`. Raises ImageError."""
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{img.width}x{img.height} pixels is over the limit of {MAX_PIXELS}")
            full_width = img.width
            reduce = longest_side / max(img.width, img.height)
            if reduce < 1:  # draft keeps both sides at least the requested ones: ask in the picture's own shape
                img.draft("RGB", (math.ceil(img.width * reduce), math.ceil(img.height * reduce)))
            scale = img.width / full_width
            img = ImageOps.exif_transpose(img)
            return np.array(_to_rgb(img), dtype=np.uint8), scale  # a writable copy
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unrecognized format)") from None
    except Exception as exc:  # a damaged file can make Pillow raise almost anything (struct.error, ...)
        kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
        raise ImageError(f"not a readable image: {kind}: {exc}") from exc


def decode_faces(data: bytes, prep: Preprocessing) -> list[Face]:
    """Image bytes -> the chips of its faces, largest first. Raises ImageError, also for no face."""
    rgb, scale = decode_picture(data, prep.detector.far_side)
    faces = find_faces(rgb, scale, prep.chip, prep.detector, prep.rules)
    if not faces:
        raise ImageError(NO_FACE)
    return faces


class Decoded(NamedTuple):
    """One file's decoding result: its faces, or the reason there are none."""

    faces: list[Face] | None
    error: str | None
    sha256: str | None  # of the bytes read, when they could be read
    identity: Identity | None  # of the inbox entry before it was read (model.files.file_identity)


def decode_files(paths: list[Path], prep: Preprocessing, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Decoded]:
    """Read, hash and decode files; each failure is a reason, never an exception. Runs in a worker."""
    decoded: list[Decoded] = []
    for path in paths:
        identity, digest = file_identity(path), None
        try:
            data = read_image_bytes(path, max_bytes)
            digest = hashlib.sha256(data).hexdigest()
            decoded.append(Decoded(decode_faces(data, prep), None, digest, identity))
        except ImageError as exc:
            decoded.append(Decoded(None, str(exc), digest, identity))
    return decoded


def _worker_setup(parent: int) -> None:
    """In each worker: leave signals to the parent, which stops the pool itself once the batch in
    hand is done, and have the kernel kill the worker when the parent dies (even by SIGKILL), so
    no orphan outlives the service."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


@dataclass
class PendingDecode:
    """Files whose decoding is under way: one task (a slice of the paths) per worker."""

    paths: list[Path]
    prep: Preprocessing
    max_bytes: int
    tasks: list[tuple[list[Path], Future, ProcessPoolExecutor]]


class DecodePool:
    """Worker processes that read, hash and decode files.

    Processes, not threads: most of the per-image work holds the GIL, so threads barely add
    up. Workers are spawned fresh (not forked from a process with live threads) and import only
    this module. A worker that dies, e.g. a decoder crash on a hostile file, breaks the pool;
    `wait` then starts a new one and retries that task's files one by one, so only the file
    that kills a worker again fails (with CRASHED).
    """

    def __init__(self, workers: int, heartbeat: Callable[[], object] | None = None, heartbeat_seconds: float = 5.0) -> None:
        """`heartbeat` is called every `heartbeat_seconds` while `wait` waits for a slow batch (the
        service pings systemd's watchdog with it: a folder of huge PNGs can take minutes)."""
        self.workers = workers
        self.heartbeat, self.heartbeat_seconds = heartbeat, heartbeat_seconds
        self._last_beat = time.monotonic()
        self._executor: ProcessPoolExecutor | None = self._start()

    @property
    def running(self) -> bool:
        """Whether the worker processes are up (see `stop_workers`)."""
        return self._executor is not None

    def stop_workers(self) -> None:
        """Let the workers exit once their tasks are done, so an idle service gives their memory
        back; the next `start` spawns new ones (about 0.2 s on 2 cores)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _start(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(
            self.workers, multiprocessing.get_context("spawn"), initializer=_worker_setup, initargs=(os.getpid(),)
        )
        for future in [executor.submit(int) for _ in range(self.workers)]:
            future.result()  # all workers up now, not during the first batch
        return executor

    def _submit(self, paths: list[Path], prep: Preprocessing, max_bytes: int) -> tuple[Future, ProcessPoolExecutor]:
        if self._executor is None:
            self._executor = self._start()
        try:
            return self._executor.submit(decode_files, paths, prep, max_bytes), self._executor
        except BrokenProcessPool:
            self._restart(self._executor)
            return self._executor.submit(decode_files, paths, prep, max_bytes), self._executor

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        """Replace `broken` unless that happened already (tasks of one broken pool fail together)."""
        if broken is self._executor:
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start()

    def start(self, paths: list[Path], prep: Preprocessing, max_bytes: int = DEFAULT_MAX_BYTES) -> PendingDecode:
        """Submit the files, split evenly over the workers; returns at once."""
        share = -(-len(paths) // self.workers) or 1
        slices = [paths[i : i + share] for i in range(0, len(paths), share)]
        return PendingDecode(paths, prep, max_bytes, [(s, *self._submit(s, prep, max_bytes)) for s in slices])

    def wait(self, pending: PendingDecode) -> list[Decoded]:
        """The results of `start`, in the order of its paths."""
        return [d for task in pending.tasks for d in self._result(*task, pending)]

    def _result(self, paths: list[Path], future: Future, executor: ProcessPoolExecutor, pending: PendingDecode) -> list[Decoded]:
        try:
            return self._outcome(future)
        except BrokenProcessPool:
            self._restart(executor)
        decoded: list[Decoded] = []
        for path in paths:  # one by one, so that only the file that kills a worker fails
            future, executor = self._submit([path], pending.prep, pending.max_bytes)
            try:
                decoded += self._outcome(future)
            except BrokenProcessPool:
                self._restart(executor)
                decoded.append(Decoded(None, CRASHED, None, file_identity(path)))
        return decoded

    def _outcome(self, future: Future) -> list[Decoded]:
        """The future's result; meanwhile a heartbeat every `heartbeat_seconds`, counted across
        waits, so that many waits of a little under the interval each still beat."""
        while self.heartbeat is not None:
            left = self._last_beat + self.heartbeat_seconds - time.monotonic()
            if left <= 0:
                self.heartbeat()
                self._last_beat = time.monotonic()
                continue
            try:
                return future.result(timeout=left)
            except TimeoutError:
                continue
        return future.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
