"""Istio's nftables goldens, byte for byte (SPEC.md §3, SPEC-istio §3.7 and §4.2).

Two ways in: the planner and renderer called directly (options parsed from the case's argv by
the real click command), and the real CLI (`--native-nftables --dry-run --output-format nft`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshnet import options
from meshnet.cli import istio_iptables
from meshnet.nftplan import plan_nft
from meshnet.render import nft
from tests.conftest import RAN
from tests.support import CONFORMANCE, conformance_cases, meshnet
from tests.unit.test_options import FakeSystem

SUITE = CONFORMANCE / "istio-nftables"


def _golden(case: dict[str, Any]) -> str:
    return Path(SUITE, case["golden"]).read_text()


def _count(suite: str) -> None:
    RAN[suite] = RAN.get(suite, 0) + 1


def render_case(args: list[str], env: dict[str, str]) -> str:
    """Parse argv with the real click command, build Options on a fake system, plan, render."""
    given = istio_iptables.make_context("istio-iptables", [*args, "--native-nftables"]).params
    raw = options.gather(given, env)
    return nft.render(plan_nft(options.build(raw, FakeSystem())))


@pytest.mark.parametrize("case", conformance_cases("istio-nftables"))
def test_istio_nftables_golden_planner(case: dict[str, Any]) -> None:
    assert render_case(case["args"], case["env"]).strip() == _golden(case).strip()
    _count("istio-nftables (planner)")


@pytest.mark.parametrize("case", conformance_cases("istio-nftables"))
def test_istio_nftables_golden_cli(case: dict[str, Any]) -> None:
    args = [*case["args"], "--native-nftables", "--dry-run", "--output-format", "nft"]
    result = meshnet(["istio-iptables", *args], env=case["env"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _golden(case).strip()
    _count("istio-nftables")
