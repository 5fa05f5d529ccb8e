"""meshnet's own goldens for the configurations users run most, in `restore` and `json`.

Set MESHNET_REFRESH_GOLDENS=1 to rewrite them, then review the diff like code.
"""

from __future__ import annotations

import os

import pytest

from tests.support.cli import meshnet
from tests.support.goldens import CASES, GOLDENS


@pytest.mark.parametrize("fmt", ["restore", "json", "nft", "dot"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_own_golden(name: str, fmt: str) -> None:
    result = meshnet(["istio-iptables", *CASES[name], "--dry-run", "--output-format", fmt])
    assert result.returncode == 0, result.stderr
    golden = GOLDENS / f"{name}.{fmt}"
    if os.environ.get("MESHNET_REFRESH_GOLDENS") == "1":
        golden.write_text(result.stdout)
    assert result.stdout == golden.read_text()


def test_restore_format_is_transcript_without_save_lines() -> None:
    """The restore blocks carry exactly the lines Istio pipes into iptables-restore."""
    args = ["istio-iptables", *CASES["standard-dual-stack"], "--dry-run"]
    restore = meshnet([*args, "--output-format", "restore"]).stdout.splitlines()
    transcript = meshnet([*args, "--output-format", "transcript"]).stdout.splitlines()
    assert [line for line in restore if not line.startswith("# ")] == [
        line for line in transcript if not line.endswith("tables-save")
    ]
    assert [line for line in restore if line.startswith("# ")] == ["# ipv4", "# ipv6"]
