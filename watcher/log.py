"""structlog set-up: JSON lines with ISO-8601 UTC timestamps, or coloured lines on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

from model.files import readable_name
from model.progress import stderr_lines


def _readable_strings(_logger: object, _method: str, event: dict) -> dict:
    """File names that are not UTF-8 logged as readable text (model.files.readable_name), so that
    every log line is valid UTF-8 JSON."""
    return {k: readable_name(v) if isinstance(v, str) and not v.isascii() else v for k, v in event.items()}


def setup(level: str = "info", fmt: str = "auto") -> None:
    """fmt: 'json', 'console' or 'auto' (console when stderr is a terminal)."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if console else structlog.processors.JSONRenderer()
    # A JSON line carries the traceback as text in "exception"; the console renderer prints its own.
    tracebacks = [] if console else [structlog.processors.format_exc_info]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            *tracebacks,
            _readable_strings,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stderr_lines),  # never inside a progress bar
        cache_logger_on_first_use=False,
    )


def get() -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger("watcher")
