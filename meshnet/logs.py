"""Logging: structured, on stderr only (stdout carries rules and CNI results).

Text (`time [level    ] event    key=value ...`, structlog's console layout without colours) or
JSON lines (`{...fields, "event", "level", "timestamp"}`, structlog's JSONRenderer layout).
meshnet writes these itself instead of importing structlog: `import structlog` imports
`structlog.stdlib` and `structlog._native`, which import asyncio and with it ssl, ~60 ms of
a 100 ms init container start, for five logging calls.
"""

from __future__ import annotations

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
_EVENT_WIDTH = 30  # structlog's ConsoleRenderer pads the event to this width
_QUOTED = frozenset(" \t=\r\n\"'")  # a text value holding any of these is shown as repr()


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


def configure(fmt: str = "text", level: str = "default:info") -> None:
    """`fmt` is "text" or "json"; `level` is Istio's --log_output_level."""
    _Settings.logger = _Logger(level_of(level), fmt == "json", {})


def get() -> Logger:
    return _Settings.logger


class _Logger:
    """The subset of structlog's bound logger that meshnet uses, written to stderr."""

    __slots__ = ("_fields", "_json", "_level")

    def __init__(self, level: int, as_json: bool, fields: dict[str, Any]) -> None:
        self._level = level
        self._json = as_json
        self._fields = fields

    def bind(self, **fields: Any) -> _Logger:
        return _Logger(self._level, self._json, {**self._fields, **fields})

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
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{_micros(now):06d}Z"
        merged = {**self._fields, **fields}
        if self._json:
            import json  # only JSON output pays for the encoder

            record = {**merged, "event": event, "level": name, "timestamp": stamp}
            line = json.dumps(record, default=repr)
        else:
            pairs = " ".join(f"{key}={_text(merged[key])}" for key in sorted(merged))
            head = f"{stamp} [{name:<9}] {event}"
            line = f"{head}{' ' * (_EVENT_WIDTH - len(event))} {pairs}" if pairs else head
        sys.stderr.write(line + "\n")


class _Settings:
    logger = _Logger(INFO, False, {})  # text at info until configure() is called


def _micros(now: float) -> int:
    return min(int((now % 1) * 1_000_000), 999_999)


def _text(value: object) -> str:
    if isinstance(value, str) and not _QUOTED & set(value):
        return value
    return repr(value)
