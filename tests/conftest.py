from __future__ import annotations

import pytest

RAN: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many conformance cases actually ran (a skipped corpus must be visible)."""
    for suite, count in sorted(RAN.items()):
        terminalreporter.write_line(f"conformance: {count} {suite} cases passed")
