"""Istio's nftables goldens (`tools/istio-nftables/pkg/capture/testdata`), byte for byte.

Two ways in: the planner and renderer called directly (options parsed from the case's argv by
the real click command), and the real CLI (`--native-nftables --dry-run --output-format nft`).

meshnet's one deliberate difference: with IPv6 off, each base chain gets a first rule
`meta nfproto ipv6 counter return` (README, "Where meshnet differs from Istio, on purpose").
`_istio_text` checks that exactly those guards are there, one per base chain, and removes them;
everything else must match Istio's text byte for byte.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from meshnet.cli.app import istio_iptables
from meshnet.config import options
from meshnet.plan import nftables
from meshnet.render import nft
from tests.conftest import RAN
from tests.support.cli import meshnet
from tests.support.conformance import CONFORMANCE, conformance_cases
from tests.support.fakes import FakeSystem

SUITE = CONFORMANCE / "istio-nftables"
BASE_CHAIN = re.compile(r"^add chain inet (\S+) (\S+) \{ type ", re.MULTILINE)
GUARD = re.compile(r"^insert rule inet (\S+) (\S+) index 0 meta nfproto ipv6 counter return$")


def _golden(case: dict[str, Any]) -> str:
    return Path(SUITE, case["golden"]).read_text()


def _ipv6_on(case: dict[str, Any]) -> bool:
    args = case["args"]
    assert "--enable-ipv6" in args, "each case names its IPv6 setting"
    return bool(args[args.index("--enable-ipv6") + 1] == "true")


def _istio_text(text: str, ipv6: bool) -> str:
    """meshnet's transaction without its IPv6 guards, after checking they are exactly right."""
    lines = text.splitlines()
    guards = [match.groups() for line in lines if (match := GUARD.match(line))]
    base_chains = BASE_CHAIN.findall(text)
    assert guards == ([] if ipv6 else base_chains), "one guard per base chain iff IPv6 is off"
    return "".join(f"{line}\n" for line in lines if not GUARD.match(line))


def _count(suite: str) -> None:
    RAN[suite] = RAN.get(suite, 0) + 1


def render_case(args: list[str], env: dict[str, str]) -> str:
    """Parse argv with the real click command, build Options on a fake system, plan, render."""
    given = istio_iptables.make_context("istio-iptables", [*args, "--native-nftables"]).params
    raw = options.gather(given, env)
    return nft.render(nftables.ruleset(options.build(raw, FakeSystem())))


@pytest.mark.parametrize("case", conformance_cases("istio-nftables"))
def test_istio_nftables_golden_planner(case: dict[str, Any]) -> None:
    text = render_case(case["args"], case["env"])
    assert _istio_text(text, _ipv6_on(case)).strip() == _golden(case).strip()
    _count("istio-nftables (planner)")


@pytest.mark.parametrize("case", conformance_cases("istio-nftables"))
def test_istio_nftables_golden_cli(case: dict[str, Any]) -> None:
    args = [*case["args"], "--native-nftables", "--dry-run", "--output-format", "nft"]
    result = meshnet(["istio-iptables", *args], env=case["env"])
    assert result.returncode == 0, result.stderr
    assert _istio_text(result.stdout, _ipv6_on(case)).strip() == _golden(case).strip()
    _count("istio-nftables")
