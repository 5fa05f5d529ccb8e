"""Helpers shared by the test suites: run the real CLI with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshnet.flags import ENV_NAMES

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment minus everything istio-iptables or meshnet reads, plus `extra`."""
    env = {
        k: v for k, v in os.environ.items() if k not in ENV_NAMES and not k.startswith("MESHNET_")
    }
    env.update(extra or {})
    return env


def meshnet(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `python -m meshnet ARGS` as a subprocess, the way a user or a container runs it."""
    return subprocess.run(
        [sys.executable, "-m", "meshnet", *args],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def conformance_dir() -> Path:
    return Path(os.environ.get("MESHNET_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))
