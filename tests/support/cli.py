"""Run the real CLI the way a user or a container runs it, with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from meshnet.config.flags import ENV_NAMES

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
# The same, as option keys (what `options.gather` takes); IPv6 is left to each test.
STANDARD_FLAGS = {
    "envoy_port": "15001",
    "inbound_capture_port": "15006",
    "proxy_uid": "1337",
    "inbound_interception_mode": "REDIRECT",
    "service_cidr": "*",
    "service_exclude_cidr": "",
    "inbound_ports": "*",
    "local_exclude_ports": "15090,15021,15020",
}


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
