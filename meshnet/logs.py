"""structlog set-up: logs go to stderr only (stdout carries rules and CNI results)."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "none": logging.CRITICAL + 10,
}


def level_of(istio_level: str) -> int:
    """Istio's `--log_output_level` is `scope:level[,scope:level]` or a bare level."""
    level = logging.INFO
    for item in istio_level.split(","):
        scope, _, name = item.rpartition(":")
        if scope in ("", "default", "all", "istio-iptables") and name.strip() in _LEVELS:
            level = _LEVELS[name.strip()]
    return level


def configure(fmt: str = "text", level: str = "default:info") -> None:
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_of(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get() -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("meshnet")
    return logger
