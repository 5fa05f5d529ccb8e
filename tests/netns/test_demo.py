"""`meshnet demo`: the README's main job works and leaves nothing behind."""

from __future__ import annotations

import subprocess

from tests.support.cli import meshnet

from .harness import require_root_netns


def _demo_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listing.stdout.splitlines() if "meshnet-demo-" in line]


def test_demo_lands_every_connection_and_cleans_up() -> None:
    require_root_netns()
    before = _demo_namespaces()
    result = meshnet(["demo"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "all 12 connections landed where Istio's rules send them." in result.stdout
    assert "WRONG" not in result.stdout
    assert "proxy:15001" in result.stdout and "proxy:15006" in result.stdout
    assert _demo_namespaces() == before
