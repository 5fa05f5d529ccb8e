"""Fixtures for the image tests: both images built for real once per session.

``images/build.sh`` (the script a developer runs) builds a debootstrapped Debian base, cached
under /var/cache/meshnet-images, the standalone plugin, then Dockerfile.init and Dockerfile.cni
with ``podman build --runtime runc``. Without podman, runc or debootstrap the tests skip, or
fail when CI=true.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.netns.harness import Topology, require_root_netns
from tests.support.repo import REPO

from . import podman

BUILD_TIMEOUT = 900.0
TAG = os.environ.get("MESHNET_TEST_IMAGE_TAG", "test")  # a private tag for parallel runs
# Timings shown at the end of the run: build time, the init container's run time.
TIMINGS: dict[str, float] = {}


@dataclass(frozen=True)
class Images:
    init: str
    cni: str


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for label, seconds in TIMINGS.items():
        terminalreporter.write_line(f"images: {label}: {seconds:.2f} s")


@pytest.fixture(scope="session")
def images() -> Images:
    """Both images, built (or found in podman's layer cache) once per session."""
    podman.require_podman()
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO / "images" / "build.sh"), "all"],
        env={**os.environ, "MESHNET_IMAGE_TAG": TAG},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    TIMINGS["build of base, plugin and both images"] = time.monotonic() - started
    if result.returncode != 0:
        pytest.fail(f"images/build.sh failed:\n{result.stderr[-4000:]}", pytrace=False)
    init, cni = result.stdout.split()
    return Images(init=init, cni=cni)


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of the containers a test starts; each is force-removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        podman.remove(name)


@pytest.fixture
def topology() -> Iterator[Topology]:
    """Pod and peer namespaces (tests/netns/harness.py), always torn down."""
    require_root_netns()
    with Topology() as topo:
        yield topo
