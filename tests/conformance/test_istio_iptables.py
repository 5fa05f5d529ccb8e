"""Istio's own goldens, byte for byte through the real CLI.

They come from `tools/istio-iptables/pkg/capture/testdata`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RAN
from tests.support.cli import meshnet
from tests.support.conformance import CONFORMANCE, conformance_cases

SUITE = CONFORMANCE / "istio-iptables"


@pytest.mark.parametrize("case", conformance_cases("istio-iptables"))
def test_istio_iptables_golden(case: dict[str, Any]) -> None:
    args = [*case["args"], "--dry-run", "--output-format", "transcript"]
    result = meshnet(["istio-iptables", *args], env=case["env"])
    assert result.returncode == 0, result.stderr
    golden = Path(SUITE, case["golden"]).read_text()
    assert result.stdout.strip() == golden.strip()
    RAN["istio-iptables"] = RAN.get("istio-iptables", 0) + 1
