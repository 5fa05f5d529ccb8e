"""Istio's own goldens, byte for byte through the real CLI (SPEC.md §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RAN
from tests.support import IN_CI, conformance_cases, conformance_dir, meshnet

SUITE = conformance_dir() / "istio-iptables"


def test_corpus_is_present_in_ci() -> None:
    if IN_CI:
        assert (SUITE / "cases.json").is_file(), f"CI needs the conformance corpus at {SUITE}"


@pytest.mark.parametrize("case", conformance_cases("istio-iptables"))
def test_istio_iptables_golden(case: dict[str, Any]) -> None:
    args = [*case["args"], "--dry-run", "--output-format", "transcript"]
    result = meshnet(["istio-iptables", *args], env=case["env"])
    assert result.returncode == 0, result.stderr
    golden = Path(SUITE, case["golden"]).read_text()
    assert result.stdout.strip() == golden.strip()
    RAN["istio-iptables"] = RAN.get("istio-iptables", 0) + 1
