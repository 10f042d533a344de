"""The network, its preprocessing, the checkpoint format and the shipped checkpoint."""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "gender-watcher.pt"
# Here, free of torch and PIL, for config checks: forward-pass precisions (see
# model.precision.uses_bfloat16), the default largest file taken (bytes) and the default data a
# decode worker may allocate (MB, RLIMIT_DATA: see model.pool).
PRECISIONS = ("auto", "float32", "bfloat16")
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MEMORY_MB = 1024
