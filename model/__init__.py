"""The network, its preprocessing, the checkpoint format and the shipped checkpoint."""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "gender-watcher.pt"
