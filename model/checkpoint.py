"""The self-describing checkpoint: weights plus everything needed to use them.

A checkpoint is a plain dict saved with torch.save and read with torch.load(weights_only=True),
so loading never runs code from the file. Keys:

    format        "gender-watcher/2"
    version       id of this checkpoint: UTC creation time + hash of the weights, input, chip and detector
    arch, arch_args   network class name (model.network.ARCHITECTURES) and its constructor args
    input         InputSpec.to_dict(): height, width, mean, std
    chip          model.faces.ChipSpec.to_dict(): the face chip's size, landmark template and fill
    detector      model.faces.DetectorSpec.to_dict(): the face detector (by SHA-256) and how it is run
    class_names   output index -> label, e.g. ["female", "male"]
    state_dict    the weights
    meta          free-form: training data, command, metrics, wall time, ...
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.faces import ChipSpec, DetectorMissing, DetectorSpec, FaceRules, Preprocessing, check_detector
from model.files import FileRefused, read_regular_file, write_atomic
from model.network import ARCHITECTURES, fuse_for_inference
from model.precision import uses_bfloat16
from model.preprocess import InputSpec, normalize

FORMAT = "gender-watcher/2"
# Largest checkpoint file, and largest total of compressed entries in it, taken (bytes).
MAX_BYTES = 256 * 1024 * 1024
MAX_COMPRESSED_BYTES = 1024 * 1024
MIN_SIDE, MAX_SIDE = 8, 1024  # a plausible model input's height and width, in pixels
REQUIRED_KEYS = ("format", "version", "arch", "arch_args", "input", "chip", "detector", "class_names", "state_dict", "meta")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


@dataclass
class Checkpoint:
    model: nn.Module  # ready for inference: eval mode, fused (model.network.fuse_for_inference), weights in `dtype`
    spec: InputSpec
    class_names: list[str]
    version: str
    chip: ChipSpec
    detector: DetectorSpec
    meta: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    def preprocessing(self, rules: FaceRules) -> Preprocessing:
        """What the decode workers run for this checkpoint: its chip and detector, the caller's rules."""
        return Preprocessing(self.chip, self.detector, rules)


def model_input(checkpoint: Checkpoint, batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> what the checkpoint's model takes: normalized, channels-last, in the
    float type of its weights."""
    return normalize(batch, checkpoint.spec).to(checkpoint.dtype)


def content_hash(state_dict: dict[str, torch.Tensor], described: dict) -> str:
    """Of the weights and of what says how to feed them (input, chip, detector): an edit to either is caught."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def save(
    path: str | Path,
    model: nn.Module,
    arch_args: dict,
    spec: InputSpec,
    class_names: list[str],
    meta: dict,
    chip: ChipSpec,
    detector: DetectorSpec,
) -> str:
    """Write the checkpoint atomically (temp file in the same folder, fsync, rename); return its
    version. `chip` and `detector` are the preprocessing the weights were trained with."""
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    described = _described(spec.to_dict(), chip.to_dict(), detector.to_dict())
    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + content_hash(state, described)
    payload = {
        "format": FORMAT,
        "version": version,
        "arch": type(model).__name__,
        "arch_args": arch_args,
        **described,
        "class_names": list(class_names),
        "state_dict": state,
        "meta": meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:  # never replace a good checkpoint with one that load() would refuse (a Path in meta, NaN weights)
        _checked(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), "float32")
    except Exception as exc:
        raise ValueError(f"checkpoint for {path} would not load: {_first_line(exc)}") from None
    write_atomic(path, buffer.getvalue())
    return version


def load(path: str | Path, precision: str = "auto") -> Checkpoint:
    """Read and validate a checkpoint, and make its model ready for inference at `precision`
    (see model.precision): batch norms folded into the convolutions and ReLUs joined to them,
    weights cast to bfloat16 where that is fast. Raise CheckpointError saying what is wrong."""
    return loads(read_bytes(path), str(path), precision)


def read_bytes(path: str | Path) -> bytes:
    """The checkpoint file's bytes, read as the inbox reads images (model.files.read_regular_file:
    without blocking on a FIFO, a regular file only, within MAX_BYTES), for `loads` here or in
    another process. Raise CheckpointError."""
    try:
        return read_regular_file(path, MAX_BYTES, follow_symlinks=True)  # a symlinked checkpoint is the owner's choice
    except FileRefused as exc:
        raise CheckpointError(f"checkpoint {path}: {'file not found' if exc.missing else exc}") from None


def loads(data: bytes, name: str, precision: str = "auto") -> Checkpoint:
    """`load` of a checkpoint file's bytes; `name` says where they came from in its errors."""
    payload = _unpickled(data, name)
    try:
        return _checked(payload, precision)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {name}: {exc}") from None


def read_payload(path: str | Path) -> object:
    """What a checkpoint file holds, read as safely as `load` reads it (read_bytes, the archive's
    sizes checked, torch.load(weights_only=True)) but not checked further: for a checkpoint of
    any format version whose weights alone are wanted. Raise CheckpointError naming the file."""
    return _unpickled(read_bytes(path), str(path))


def _unpickled(data: bytes, name: str) -> object:
    try:
        _check_archive(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {name}: {exc}") from None
    except Exception as exc:  # torch raises many types for damaged or unsafe files
        raise CheckpointError(f"checkpoint {name}: cannot be read as a checkpoint ({_first_line(exc)})") from None


def _check_archive(data: bytes) -> None:
    """The zip entries checked before torch unpacks any, so that a small file cannot make loading
    take gigabytes (torch.save stores entries uncompressed)."""
    if len(data) > MAX_BYTES:
        raise CheckpointError(f"it is {len(data)} bytes; a checkpoint holds at most {MAX_BYTES}")
    try:
        entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except zipfile.BadZipFile:
        raise CheckpointError(
            "cannot be read: it is not the zip archive torch.save writes (damaged, cut short, or another kind of file)"
        ) from None
    unpacked = sum(e.file_size for e in entries)
    compressed = sum(e.file_size for e in entries if e.compress_type != zipfile.ZIP_STORED)
    if unpacked > MAX_BYTES or compressed > MAX_COMPRESSED_BYTES:
        raise CheckpointError(
            f"its archive would unpack to {unpacked} bytes ({compressed} of them compressed); "
            f"a checkpoint holds at most {MAX_BYTES}, at most {MAX_COMPRESSED_BYTES} compressed"
        )


def _described(spec: object, chip: object, detector: object) -> dict:
    return {"input": spec, "chip": chip, "detector": detector}


def check_weights(state: object, expected: dict[str, torch.Tensor], arch: str) -> None:
    """Raise CheckpointError unless `state` is a dict of tensors with exactly the names, shapes and
    dtypes of `expected` (a state_dict of `arch`, on the meta device will do), saying the first
    that differs. Only sizes are compared: no weight is read."""
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError("state_dict is not a dict of tensors")
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected), key=str)
        raise CheckpointError(f"weights do not fit {arch}: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, want in expected.items():
        if state[name].shape != want.shape or state[name].dtype != want.dtype:
            got, wanted = f"{tuple(state[name].shape)} {state[name].dtype}", f"{tuple(want.shape)} {want.dtype}"
            raise CheckpointError(f"weights do not fit {arch}: {name} is {got}, expected {wanted}")


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _checked(payload: object, precision: str) -> Checkpoint:
    """The checks of `load`, in an order that keeps a hostile file from costing much: everything
    about the weights' sizes is compared with the architecture's before any weight is read."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"expected a dict, found {type(payload).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"missing keys {missing}")
    if payload["format"] != FORMAT:
        raise CheckpointError(
            f"format {payload['format']!r} is not {FORMAT!r}"
            + (" (trained on centre crops, not face chips: retrain it)" if payload["format"] == "gender-watcher/1" else "")
        )
    arch = ARCHITECTURES.get(payload["arch"]) if isinstance(payload["arch"], str) else None
    if arch is None:
        raise CheckpointError(f"unknown architecture {payload['arch']!r} (known: {sorted(ARCHITECTURES)})")
    class_names = payload["class_names"]
    if not (
        isinstance(class_names, list)
        and len(class_names) >= 2
        and all(isinstance(c, str) for c in class_names)
        and len(set(class_names)) == len(class_names)
    ):
        raise CheckpointError(f"class_names must be a list of at least two different names, found {class_names!r}")
    if not isinstance(payload["meta"], dict):
        raise CheckpointError(f"meta must be a dict, found {type(payload['meta']).__name__}")
    try:
        if not isinstance(payload["input"], dict):
            raise TypeError(f"a dict is needed, found {type(payload['input']).__name__}")
        spec = InputSpec.from_dict(payload["input"])
    except Exception as exc:
        raise CheckpointError(f"bad input spec {payload['input']!r}: {_first_line(exc)}") from None
    numbers = (*spec.mean, *spec.std)
    if not (
        MIN_SIDE <= spec.height <= MAX_SIDE
        and MIN_SIDE <= spec.width <= MAX_SIDE
        and len(spec.mean) == len(spec.std) == 3
        and all(math.isfinite(v) for v in numbers)
        and min(spec.std) > 0
    ):
        raise CheckpointError(f"implausible input spec {spec}")
    try:
        chip = ChipSpec.from_dict(payload["chip"])
    except Exception as exc:
        raise CheckpointError(f"bad chip geometry {payload['chip']!r}: {_first_line(exc)}") from None
    if (chip.height, chip.width) != (spec.height, spec.width):
        raise CheckpointError(f"chip is {chip.height}x{chip.width} but the model's input is {spec.height}x{spec.width}")
    try:
        detector = DetectorSpec.from_dict(payload["detector"])
        check_detector(detector)
    except DetectorMissing as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:
        raise CheckpointError(f"bad detector settings {payload['detector']!r}: {_first_line(exc)}") from None
    arch_args = payload["arch_args"]
    try:  # on the meta device: no memory is taken, however large the arguments ask it to be
        with torch.device("meta"):
            expected = arch(**arch_args, num_classes=len(class_names)).state_dict()
    except Exception as exc:
        raise CheckpointError(f"bad architecture arguments {arch_args!r}: {_first_line(exc)}") from None
    state = payload["state_dict"]
    check_weights(state, expected, payload["arch"])
    described = _described(payload["input"], payload["chip"], payload["detector"])
    if content_hash(state, described) != str(payload["version"]).rsplit("-", 1)[-1]:
        raise CheckpointError(
            "weights, input, chip or detector settings do not match the hash in its version id (damaged or edited)"
        )
    model = arch(**arch_args, num_classes=len(class_names))
    model.load_state_dict(state, strict=True)
    dtype = torch.bfloat16 if uses_bfloat16(precision) else torch.float32
    model = fuse_for_inference(model.eval()).eval().to(dtype, memory_format=torch.channels_last)
    # Checked on the weights as served: folding a negative running_var into a convolution, or casting
    # a huge value, gives NaN or inf there, which the ReLUs would then hide behind a constant answer.
    bad = [name for name, v in model.state_dict().items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"non-finite weights in {bad[:3]} (as served: batch norms folded, cast to {dtype})")
    checkpoint = Checkpoint(model, spec, class_names, str(payload["version"]), chip, detector, dict(payload["meta"]), dtype)
    _canary(checkpoint)
    return checkpoint


def _canary(checkpoint: Checkpoint) -> None:
    """Raise CheckpointError unless the model gives two different images finite, different answers
    of the right shape (a model that answers everything alike is broken, however valid its file)."""
    spec = checkpoint.spec
    ramp = torch.linspace(0, 255, spec.height * spec.width).to(torch.uint8).view(1, 1, spec.height, spec.width)
    images = torch.cat([ramp, 255 - ramp]).expand(2, 3, -1, -1)
    try:
        with torch.inference_mode():
            out = checkpoint.model(model_input(checkpoint, images)).float()
    except Exception as exc:  # e.g. an input too small for the network's pooling
        raise CheckpointError(f"canary forward pass failed: {_first_line(exc)}") from None
    if out.shape != (2, len(checkpoint.class_names)) or not torch.isfinite(out).all():
        finite = "finite" if torch.isfinite(out).all() else "non-finite"
        raise CheckpointError(f"canary forward pass gave {tuple(out.shape)} {finite} output")
    if torch.equal(out[0], out[1]):
        raise CheckpointError("canary forward pass gave two different images the same output (a constant model)")
