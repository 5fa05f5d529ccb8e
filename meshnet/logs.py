"""Logging: structured, on stderr only (stdout carries rules and CNI results).

The commands use structlog (text or JSON). The CNI plugin, which the runtime starts once per
pod and often ~110 times at once, uses a small JSON logger with the same call shape instead:
importing structlog costs ~24 ms of CPU per process (it pulls in asyncio), a fifth of an ADD.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
_LEVELS = {
    "debug": DEBUG,
    "info": INFO,
    "warn": WARNING,
    "warning": WARNING,
    "error": ERROR,
    "fatal": CRITICAL,
    "none": CRITICAL + 10,
}


class Logger(Protocol):
    def bind(self, **fields: Any) -> Logger: ...

    def debug(self, event: str, **fields: Any) -> Any: ...

    def info(self, event: str, **fields: Any) -> Any: ...

    def warning(self, event: str, **fields: Any) -> Any: ...

    def error(self, event: str, **fields: Any) -> Any: ...


def level_of(istio_level: str) -> int:
    """Istio's `--log_output_level` is `scope:level[,scope:level]` or a bare level."""
    level = INFO
    for item in istio_level.split(","):
        scope, _, name = item.rpartition(":")
        if scope in ("", "default", "all", "istio-iptables") and name.strip() in _LEVELS:
            level = _LEVELS[name.strip()]
    return level


class _Settings:
    light: _JsonLogger | None = None  # set by configure_light(); None means structlog


def configure(fmt: str = "text", level: str = "default:info") -> None:
    import structlog

    _Settings.light = None
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


def configure_light(level: str = "default:info") -> None:
    """JSON lines on stderr without importing structlog (the CNI plugin's hot path)."""
    _Settings.light = _JsonLogger(level_of(level), {})


def get() -> Logger:
    if _Settings.light is not None:
        return _Settings.light
    import structlog

    logger: Logger = structlog.get_logger("meshnet")
    return logger


class _JsonLogger:
    """The subset of structlog's bound logger that meshnet uses, as JSON lines on stderr."""

    def __init__(self, level: int, fields: dict[str, Any]) -> None:
        self._level = level
        self._fields = fields

    def bind(self, **fields: Any) -> _JsonLogger:
        return _JsonLogger(self._level, {**self._fields, **fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(ERROR, "error", event, fields)

    def _emit(self, level: int, name: str, event: str, fields: dict[str, Any]) -> None:
        if level < self._level:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
        record = {**self._fields, **fields, "event": event, "level": name, "timestamp": stamp}
        sys.stderr.write(json.dumps(record, default=str) + "\n")
