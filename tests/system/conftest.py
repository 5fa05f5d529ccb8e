"""Fixtures for the backend/namespace/route system tests: root, throw-away namespaces only.

Every test works in a namespace it created (`mnt-<random>`) and that is always deleted. The
session guard in tests/conftest.py checks that the host itself was left exactly as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshnet.host import netns

_TIMEOUT = 30
_HERE = Path(__file__).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)


def _unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip netns`)"
    if _run("ip", "netns", "list").returncode != 0:
        return "`ip netns` does not work here"
    return None


def require_system() -> None:
    """Skip (or, with CI=true, fail) when namespaces cannot be created here."""
    reason = _unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"system tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        reason = f"missing tools: {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def require_tools() -> Callable[..., None]:
    """`require_tools("iptables-legacy", ...)`: skip (fail with CI=true) when one is missing."""
    return _require_tools


@pytest.fixture
def system() -> None:
    """For tests that need root but no namespace of their own."""
    require_system()


@pytest.fixture
def namespace() -> Iterator[str]:
    """A fresh, empty network namespace `mnt-<random>` with lo up; deleted after the test."""
    require_system()
    name = f"mnt-{secrets.token_hex(4)}"
    created = _run("ip", "netns", "add", name)
    if created.returncode != 0:
        pytest.fail(f"ip netns add {name} failed: {created.stderr.strip()}")
    try:
        up = _run("ip", "-n", name, "link", "set", "lo", "up")
        assert up.returncode == 0, up.stderr
        yield name
    finally:
        deleted = _run("ip", "netns", "delete", name)
        assert deleted.returncode == 0, f"could not delete namespace {name}: {deleted.stderr}"


@pytest.fixture
def missing_namespace_name() -> str:
    """A namespace name that does not exist (and that the test must not create)."""
    require_system()
    name = f"mnt-{secrets.token_hex(4)}"
    assert not Path(netns.resolve(name)).exists()
    return name


@pytest.fixture
def ns_exec(namespace: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a command inside the test's namespace with `ip netns exec` (independent of meshnet)."""

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", namespace, *argv)

    return run
