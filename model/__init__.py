"""The network, its preprocessing, the checkpoint format and the shipped checkpoint."""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "gender-watcher.pt"
# Forward-pass precisions (see model.inference.uses_bfloat16); here, free of torch, for config checks.
PRECISIONS = ("auto", "float32", "bfloat16")
