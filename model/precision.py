"""Which float type the forward pass uses: bfloat16 where the hardware makes it fast, else float32."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from model import PRECISIONS


@functools.cache
def cpu_has_fast_bfloat16() -> bool:
    """Whether the CPU has AMX (Intel Sapphire Rapids and later), where oneDNN runs bfloat16
    convolutions several times faster than float32. Elsewhere bfloat16 would be slower."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def uses_bfloat16(precision: str = "auto", device_type: str = "cpu") -> bool:
    """'float32', 'bfloat16', or 'auto': bfloat16 on a GPU or a CPU with AMX, float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    return precision == "bfloat16" or (precision == "auto" and (device_type != "cpu" or cpu_has_fast_bfloat16()))


def autocast(precision: str = "auto", device_type: str = "cpu") -> torch.autocast:
    """Mixed precision for training: bfloat16 arithmetic where uses_bfloat16, float32 weights."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=uses_bfloat16(precision, device_type))
