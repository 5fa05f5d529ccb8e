"""Running podman the way these tests need it: rootful, runc, limits that work on this machine."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence

import pytest

from tests.support.repo import IN_CI

# podman's default RLIMIT_NOFILE (1048576) is above this machine's hard limit, and runc then
# fails to start the container ("error setting rlimit type 7"): ask for limits we may have.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
# What a kubelet gives a container with allowPrivilegeEscalation: false.
RUN = ("podman", "--runtime", "runc", "run", *ULIMITS, "--security-opt", "no-new-privileges")
NAME_PREFIX = "meshnet-test-"
REQUIRED_TOOLS = ("podman", "runc", "debootstrap")


def unusable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (rootful podman, debootstrap)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        names = " ".join(missing)
        return f"{names} not installed (scripts/setup.sh must apt-get install {names})"
    return None


def require_podman() -> None:
    """Skip (or with CI=true, fail) when images cannot be built and run here."""
    reason = unusable_reason()
    if reason is None:
        return
    message = f"image tests cannot run: {reason}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def container_name(role: str) -> str:
    return f"{NAME_PREFIX}{role}-{secrets.token_hex(4)}"


def run(
    args: Sequence[str], timeout: float = 120.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`podman --runtime runc run ARGS` (limits, no-new-privileges), output captured."""
    return subprocess.run(  # fixed argument list, no shell
        [*RUN, *args], capture_output=True, text=True, timeout=timeout, input=input, check=False
    )


def podman(args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def remove(name: str) -> None:
    """`podman rm -f` one container we started, by name; already gone is fine."""
    podman(["rm", "-f", "--ignore", "--time", "5", name])
