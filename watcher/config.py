"""The service configuration: defaults, YAML loading and validation that names the bad key.

Every key and its meaning is documented in config.yaml at the project root, which holds the
same values as DEFAULTS below (a test keeps them equal).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

import model
from model.faces import NO_FACE_CHOICES, FaceRules


@dataclass(frozen=True)
class BatchSettings:
    max_size: int = 64
    max_wait_ms: int = 20
    decode_processes: int = 2
    decode_idle_seconds: float = 60.0
    decode_seconds: float = 10.0
    decode_memory_mb: int = model.DEFAULT_MEMORY_MB
    torch_threads: int = 1
    precision: str = "auto"


@dataclass(frozen=True)
class IntakeSettings:
    watch: bool = True
    settle_seconds: float = 1.0
    rescan_seconds: float = 30.0
    max_file_bytes: int = model.DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class RotationSettings:
    max_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class ReloadSettings:
    poll_seconds: float = 30.0


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    format: str = "auto"
    answers: str = "info"


# The config file's sections and the settings each becomes; `faces` are model.faces.FaceRules.
SECTIONS = {
    "batch": BatchSettings,
    "intake": IntakeSettings,
    "faces": FaceRules,
    "rotation": RotationSettings,
    "reload": ReloadSettings,
    "logging": LoggingSettings,
}
PATH_KEYS = ("inbox", "done", "failed", "results", "journal")  # resolved; the checkpoint path is not (below)
DEFAULTS: dict[str, Any] = {
    "inbox": "inbox",
    "done": "done",
    "failed": "failed",
    "results": "results/process_results.json",
    "journal": "results/journal.jsonl",
    "checkpoint": str(model.DEFAULT_CHECKPOINT),
} | {name: asdict(settings()) for name, settings in SECTIONS.items()}
CHOICES = {
    "batch.precision": model.PRECISIONS,
    "logging.level": ("debug", "info", "warning", "error"),
    "logging.format": ("auto", "json", "console"),
    "logging.answers": ("debug", "info"),
    "faces.no_face": NO_FACE_CHOICES,
}
# Zero is allowed for the others where it means something (no settle wait, decode processes never stopped).
POSITIVE = (
    "batch.max_size",
    "batch.decode_seconds",
    "intake.rescan_seconds",
    "intake.max_file_bytes",
    "faces.min_face_pixels",
    "faces.max_faces",
    "rotation.max_bytes",
    "reload.poll_seconds",
)

# Ranges, the lower bound at least 1, past which a value cannot work: a decode process has about
# 100 MB of data mapped (what the limit counts) before it decodes anything, and thousands of
# processes or threads exhaust the machine, not speed it up.
LIMITS = {
    "batch.decode_processes": (1, 256),
    "batch.torch_threads": (1, 256),
    "batch.decode_memory_mb": (200, 1 << 20),
}


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


@dataclass(frozen=True)
class Config:
    """The whole configuration, read and checked once (load) and passed to whoever needs it."""

    inbox: Path
    done: Path
    failed: Path
    results: Path
    journal: Path
    checkpoint: Path
    batch: BatchSettings
    intake: IntakeSettings
    faces: FaceRules
    rotation: RotationSettings
    reload: ReloadSettings
    logging: LoggingSettings
    source: str  # where it came from, for messages


def _merge(defaults: dict, given: dict, prefix: str, source: str) -> dict:
    out = {}
    for key in given:
        if key not in defaults:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known: {', '.join(defaults)})")
    for key, default in defaults.items():
        value = given.get(key, default)
        name = f"{prefix}{key}"
        if isinstance(default, dict):
            value = {} if value is None else value  # a section whose keys are all commented out
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{name}' must be a mapping, found {type(value).__name__}")
            out[key] = _merge(default, value, name + ".", source)
            continue
        expected = (int, float) if isinstance(default, float) else type(default)
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            hint = ""
            if isinstance(value, str) and isinstance(default, (int, float)) and _is_number(value):
                hint = " (YAML reads a number like 1e3 as text: write 1000 or 1.0e+3)"
            raise ConfigError(f"{source}: '{name}' must be {type(default).__name__}, found {value!r}{hint}")
        if isinstance(value, str) and "\0" in value:
            raise ConfigError(f"{source}: '{name}' holds a NUL character: {value!r}")
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(f"{source}: '{name}' must be one of {', '.join(CHOICES[name])}, found {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: '{name}' must be a finite number, found {value!r}")
        if name in POSITIVE and value <= 0:
            raise ConfigError(f"{source}: '{name}' must be positive, found {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{source}: '{name}' must not be negative, found {value!r}")
        if name in LIMITS and not LIMITS[name][0] <= value <= LIMITS[name][1]:
            raise ConfigError(f"{source}: '{name}' must be from {LIMITS[name][0]} to {LIMITS[name][1]}, found {value!r}")
        out[key] = value
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load(path: str | Path | None = None) -> Config:
    """Read a config file (or the defaults, relative to the current folder, when path is None)."""
    if path is None:
        given, base, source = {}, Path.cwd(), "built-in defaults"
    else:
        path = Path(path)
        source = str(path)
        try:
            given = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: must be a mapping of keys to values")
        base = path.resolve().parent
    values = _merge(DEFAULTS, given, "", source)
    for key in PATH_KEYS:
        values[key] = (base / os.path.expanduser(values[key])).resolve()
    # The checkpoint keeps its own name, a symlink included: pointing that symlink at another file
    # is a new checkpoint to reload, which a path resolved once at start would never see.
    values["checkpoint"] = Path(os.path.normpath(base / os.path.expanduser(values["checkpoint"])))
    for name, settings in SECTIONS.items():
        values[name] = settings(**values[name])
    return Config(**values, source=source)


def load_or_report(path: str | Path | None) -> Config | None:
    """`load` for a command line: None for a config that cannot be used, after one line on
    stderr that says why (the callers exit with status 2)."""
    try:
        return load(path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None


def check_service_paths(config: Config, inbox_may_be_missing: bool = False) -> None:
    """What the service (and --once --move) needs: folders that exist, are writable, share a
    filesystem. The service waits for a missing inbox (a mount that comes later, a folder being
    made again), so it checks the inbox only when it is there."""
    keys = ("done", "failed") if inbox_may_be_missing and not config.inbox.exists() else ("inbox", "done", "failed")
    for key in keys:
        _check_writable_dir(config, key, getattr(config, key))
    for key in ("results", "journal"):
        _check_writable_dir(config, key, getattr(config, key).parent)
        path = getattr(config, key)
        if path.exists() and not path.is_file():
            raise ConfigError(f"{config.source}: '{key}' ({path}) is a folder or another non-file; give a file's name")
    if config.done == config.failed:
        raise ConfigError(f"{config.source}: 'done' and 'failed' are the same folder ({config.done}); give each its own")
    if config.results == config.journal:
        raise ConfigError(f"{config.source}: 'results' and 'journal' are the same file ({config.results}); give each its own")
    if "inbox" in keys and (problem := inbox_problem(config)):
        raise ConfigError(problem)
    # Nothing the service writes or loads may live in the inbox: files there are input, and whoever
    # may write into the inbox can rename a sub-folder of it and put a symlink to anywhere in its place.
    for key, path in [
        ("done", config.done),
        ("failed", config.failed),
        ("results", config.results.parent),
        ("journal", config.journal.parent),
        ("checkpoint", config.checkpoint.resolve()),
    ]:
        if path.is_relative_to(config.inbox):
            raise ConfigError(
                f"{config.source}: '{key}' ({getattr(config, key)}) is inside the inbox ({config.inbox}); "
                "whoever may write into the inbox could replace it, and files written there would be taken as input"
            )
    if not config.checkpoint.is_file():
        raise ConfigError(f"{config.source}: 'checkpoint' ({config.checkpoint}) is not a file")


def inbox_problem(config: Config) -> str | None:
    """Why the inbox as it is now cannot be served, or None: it must be a writable folder on the
    filesystem of done/ and failed/. Checked at start, and by the service whenever the folder
    appears or is replaced."""
    try:
        _check_writable_dir(config, "inbox", config.inbox)
        for key in ("done", "failed"):
            if getattr(config, key).stat().st_dev != config.inbox.stat().st_dev:
                return (
                    f"{config.source}: '{key}' ({getattr(config, key)}) is on another filesystem than 'inbox' "
                    f"({config.inbox}); moves must be atomic renames"
                )
    except ConfigError as exc:
        return str(exc)
    except OSError as exc:
        return f"{config.source}: cannot look at 'inbox' ({config.inbox}) or the folders beside it: {exc.strerror}"
    return None


def _check_writable_dir(config: Config, key: str, folder: Path) -> None:
    if not folder.is_dir():
        raise ConfigError(f"{config.source}: '{key}' folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{config.source}: '{key}' folder {folder} is not writable")
