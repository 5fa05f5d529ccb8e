"""The conformance corpus recorded from Istio's tools: `tests/conformance/data/SUITE/cases.json`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .repo import REPO

CONFORMANCE = REPO / "tests" / "conformance" / "data"


def conformance_index(suite: str) -> Any:
    """A suite's `cases.json` (part of the repository: a missing one is an error)."""
    return json.loads((CONFORMANCE / suite / "cases.json").read_text())


def conformance_cases(suite: str) -> list[Any]:
    """pytest params for every case of a conformance suite."""
    return [pytest.param(case, id=case["name"]) for case in conformance_index(suite)]
