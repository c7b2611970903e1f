"""structlog set-up shared by every agent.

JSON lines when stderr is not a terminal (services, CI), a readable console
format when it is; ``--log-format`` overrides the guess.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


_always: dict[str, str] = {}


def always(**fields: str) -> None:
    """Put ``fields`` (an agent's name, its node) on every line from now on, from every
    module and thread, unless a line sets them itself."""
    _always.update(fields)


def _add_always(
    logger: object, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    for key, value in _always.items():
        event.setdefault(key, value)
    return event


def configure(log_format: LogFormat = "auto", level: int = logging.INFO) -> None:
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_always,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
