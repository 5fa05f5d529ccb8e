"""Helpers shared by the benchmark scripts: the standard args, timing, statistics, results.

Every benchmark reports ratios against floors measured in the same run, so the numbers stay
comparable across machines and load; these helpers keep that bookkeeping in one place. Stdlib
only (plus meshnet's own flag table for a clean environment).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"  # git-ignored (bench/.gitignore)

# Istio's standard sidecar injection arguments (also the ones `meshnet demo` applies).
STANDARD: tuple[str, ...] = (
    *("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"),
    *("-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"),
)


@dataclass(frozen=True, slots=True)
class Stats:
    """Median, min and max of a set of samples, in seconds."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def as_dict(self) -> dict[str, float | int]:
        """The JSON shape every bench result uses: seconds, plus the sample count."""
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}

    def ms(self) -> str:
        """`  87.1 ms (min 83.0, max 95.2)` for the printed tables."""
        return f"{self.median * 1e3:7.1f} ms (min {self.min * 1e3:.1f}, max {self.max * 1e3:.1f})"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment minus every variable istio-iptables or meshnet reads, plus `extra`,
    so a stray ISTIO_* or MESHNET_* in the caller's shell cannot change what is measured."""
    from meshnet.config.flags import ENV_NAMES

    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ENV_NAMES and not key.startswith("MESHNET_")
    }
    env.update(extra or {})
    return env


def timed(argv: Sequence[str], stdin: str = "", env: Mapping[str, str] | None = None) -> float:
    """Wall time of one process from spawn to exit; exits the benchmark if it fails."""
    start = time.perf_counter()
    result = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, env=env, check=False
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU count, load before the run, interpreter version."""
    return {
        "cpus": os.cpu_count(),
        "loadavg_before": [round(load, 2) for load in os.getloadavg()],
        "python": sys.version.split()[0],
    }


def write_result(name: str, document: Mapping[str, Any]) -> Path:
    """Write bench/results/NAME.json and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
