"""Diagnostics: structlog lines on stderr (pretty on a terminal, JSON otherwise), separate from the journal.

`run_id`, `seq` and `state` are bound with contextvars by the run loop, so every diagnostic line joins to
its journal record.
"""

from __future__ import annotations

import logging
import sys

import structlog


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time (it may be replaced after configuration, e.g. by a test
    harness or a daemoniser), never to a stream that has since been closed."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", json_lines: bool | None = None) -> None:
    """Send diagnostics to stderr; `json_lines` defaults to JSON unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # structlog types `file` as TextIO; PrintLogger only calls write() and flush()
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
