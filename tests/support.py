"""Helpers shared by the test suites: run the real CLI with a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from meshnet.flags import ENV_NAMES

REPO = Path(__file__).resolve().parent.parent
# The arguments Istio's injector gives istio-init by default.
STANDARD_ARGS = (
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
)
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


CONFORMANCE = REPO / "tests" / "conformance" / "data"


def conformance_index(suite: str) -> Any:
    """A suite's `cases.json` (part of the repository: a missing one is an error)."""
    return json.loads((CONFORMANCE / suite / "cases.json").read_text())


def conformance_cases(suite: str) -> list[Any]:
    """pytest params for every case of a conformance suite."""
    return [pytest.param(case, id=case["name"]) for case in conformance_index(suite)]


def restore_blocks(text: str) -> dict[str, str]:
    """meshnet's `restore` output split into its `# ipv4` / `# ipv6` blocks."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("# "):
            current = blocks.setdefault(line[2:], [])
        else:
            current.append(line)
    return {family: "\n".join(lines) + "\n" for family, lines in blocks.items()}
