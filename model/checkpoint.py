"""The self-describing checkpoint: weights plus everything needed to use them.

A checkpoint is a plain dict saved with torch.save and read with torch.load(weights_only=True),
so loading never runs code from the file. Keys:

    format        "gender-watcher/1"
    version       id of this checkpoint: UTC creation time + hash of the weights
    arch, arch_args   network class name (model.network.ARCHITECTURES) and its constructor args
    input         InputSpec.to_dict(): height, width, mean, std
    class_names   output index -> label, e.g. ["female", "male"]
    state_dict    the weights
    meta          free-form: training data, command, metrics, wall time, ...
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.files import write_atomic
from model.network import ARCHITECTURES, fuse_for_inference
from model.precision import uses_bfloat16
from model.preprocess import InputSpec

FORMAT = "gender-watcher/1"
REQUIRED_KEYS = ("format", "version", "arch", "arch_args", "input", "class_names", "state_dict", "meta")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


@dataclass
class Checkpoint:
    model: nn.Module  # ready for inference: eval mode, fused (model.network.fuse_for_inference), weights in `dtype`
    spec: InputSpec
    class_names: list[str]
    version: str
    meta: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def save(
    path: str | Path,
    model: nn.Module,
    arch_args: dict,
    spec: InputSpec,
    class_names: list[str],
    meta: dict,
) -> str:
    """Write the checkpoint atomically (temp file in the same folder, fsync, rename); return its version."""
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + weights_hash(state)
    payload = {
        "format": FORMAT,
        "version": version,
        "arch": type(model).__name__,
        "arch_args": arch_args,
        "input": spec.to_dict(),
        "class_names": list(class_names),
        "state_dict": state,
        "meta": meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:  # never replace a good checkpoint with one that load() would refuse (e.g. a Path in meta)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint for {path} would not load: {str(exc).splitlines()[0][:200]}") from None
    write_atomic(path, buffer.getvalue())
    return version


def load(path: str | Path, precision: str = "auto") -> Checkpoint:
    """Read and validate a checkpoint, and make its model ready for inference at `precision`
    (see model.precision): batch norms folded into the convolutions and ReLUs joined to them,
    weights cast to bfloat16 where that is fast. Raise CheckpointError saying what is wrong."""
    path = Path(path)

    def fail(reason: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {reason}")

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise fail("file not found") from None
    except Exception as exc:  # torch raises many types for damaged or unsafe files
        raise fail(f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict):
        raise fail(f"expected a dict, found {type(payload).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise fail(f"missing keys {missing}")
    if payload["format"] != FORMAT:
        raise fail(f"format {payload['format']!r} is not {FORMAT!r}")
    arch = ARCHITECTURES.get(payload["arch"]) if isinstance(payload["arch"], str) else None
    if arch is None:
        raise fail(f"unknown architecture {payload['arch']!r} (known: {sorted(ARCHITECTURES)})")
    class_names = payload["class_names"]
    if not (isinstance(class_names, list) and len(class_names) >= 2 and all(isinstance(c, str) for c in class_names)):
        raise fail(f"class_names must be a list of at least two names, found {class_names!r}")
    try:
        spec = InputSpec.from_dict(payload["input"])
        model = arch(**payload["arch_args"], num_classes=len(class_names))
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"bad input spec or architecture arguments: {exc}") from None
    if not (8 <= spec.height <= 1024 and 8 <= spec.width <= 1024) or min(spec.std) <= 0:
        raise fail(f"implausible input spec {spec}")
    state = payload["state_dict"]
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise fail("state_dict is not a dict of tensors")
    bad = [k for k, v in state.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
    if bad:
        raise fail(f"non-finite values in {bad[:3]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise fail(f"weights do not fit {payload['arch']}: {str(exc).splitlines()[0][:300]}") from None
    if weights_hash(state) != str(payload["version"]).rsplit("-", 1)[-1]:
        raise fail("weights do not match the hash in its version id (damaged or edited)")
    if not isinstance(payload["meta"], dict):
        raise fail(f"meta must be a dict, found {type(payload['meta']).__name__}")
    dtype = torch.bfloat16 if uses_bfloat16(precision) else torch.float32
    model = fuse_for_inference(model.eval()).eval().to(dtype, memory_format=torch.channels_last)
    return Checkpoint(model, spec, class_names, str(payload["version"]), dict(payload["meta"]), dtype)
