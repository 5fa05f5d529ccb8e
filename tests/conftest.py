from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from meshnet.host import netns

RAN: dict[str, int] = {}
_HOST_DUMPS = (
    ("iptables-nft-save",),
    ("ip6tables-nft-save",),
    ("iptables-legacy-save",),
    ("ip6tables-legacy-save",),
    ("nft", "list", "ruleset"),
    ("ip", "rule"),
    ("ip", "-6", "rule"),
    ("ip", "-6", "addr", "show", "dev", "lo"),
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many conformance cases actually ran (a skipped corpus must be visible)."""
    for suite, count in sorted(RAN.items()):
        terminalreporter.write_line(f"conformance: {count} {suite} cases passed")


def _host_snapshot() -> dict[str, str]:
    """The host namespace's rules, policy routes and lo addresses, minus timestamp comments."""
    snapshot = {}
    for argv in _HOST_DUMPS:
        if shutil.which(argv[0]) is None:
            continue
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        lines = [line for line in out.stdout.splitlines() if not line.startswith("#")]
        snapshot[" ".join(argv)] = "\n".join(lines)
    return snapshot


@pytest.fixture(scope="session", autouse=True)
def host_untouched() -> Iterator[None]:
    """Fail the run if any test changed the host's own netfilter, policy routes or lo."""
    if os.geteuid() != 0:
        yield
        return
    host_ns = netns.current_inode()
    before = _host_snapshot()
    yield
    assert netns.current_inode() == host_ns, "the test process was left in another namespace"
    after = _host_snapshot()
    changed = [name for name in before if before[name] != after.get(name)]
    assert not changed, f"tests changed the host's own state: {changed}"
