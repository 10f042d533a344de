"""structlog set-up: JSON lines with ISO-8601 UTC timestamps, or coloured lines on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def setup(level: str = "info", fmt: str = "auto") -> None:
    """fmt: 'json', 'console' or 'auto' (console when stderr is a terminal)."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str = "watcher") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
