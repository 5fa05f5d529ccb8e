"""Benchmark: cold start of `meshnet istio-iptables <standard args> --dry-run`, against a floor.

Floor = a bare interpreter start (`python -c pass`) of the same interpreter, measured in this
run. Every sample is a fresh process; the two commands alternate, so both see the same machine
load. A few unmeasured warm-up runs first fill the page cache and write the .pyc files, as on
any node after the first start. Target: the dry run's median ≤ 120 ms.

Then the same dry run under `-X importtime`, a few times: the import tree (median per module)
shows what the start-up time is spent on. Prints a table and writes
bench/results/dry_run_start.json. Needs no root:

    .venv/bin/python bench/dry_run_start.py [--runs 30] [--import-runs 5] [--import-min-ms 1.5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import STANDARD, Stats, clean_env, machine, timed, write_result  # noqa: E402

TARGET_MS = 120.0
WARMUP = 3


@dataclass
class Import:
    """One line of `-X importtime`, with the imports it triggered (its children)."""

    name: str
    self_us: float
    cumulative_us: float
    children: list[Import] = field(default_factory=list)


def meshnet_argv() -> list[str]:
    """The console script the init image runs (`meshnet`), else `python -m meshnet`."""
    script = Path(sys.executable).parent / "meshnet"
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "meshnet"]
    return [*entry, "istio-iptables", *STANDARD, "--dry-run"]


def check_dry_run(argv: list[str], env: dict[str, str]) -> None:
    """Fail early, and loudly, if the command does not print the plan."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)
    if done.returncode != 0 or "ISTIO_OUTPUT" not in done.stdout:
        sys.exit(f"dry run failed ({done.returncode}): {done.stderr.strip()}")


def measure(
    runs: int, floor: list[str], subject: list[str], env: dict[str, str]
) -> dict[str, Stats]:
    for _ in range(WARMUP):
        timed(floor, env=env)
        timed(subject, env=env)
    floor_times: list[float] = []
    subject_times: list[float] = []
    for _ in range(runs):  # interleaved: a load spike hits both series, not one
        floor_times.append(timed(floor, env=env))
        subject_times.append(timed(subject, env=env))
    return {"interpreter": Stats.of(floor_times), "dry_run": Stats.of(subject_times)}


# --- -X importtime ----------------------------------------------------------------------


def parse_importtime(stderr: str) -> list[Import]:
    """The import forest of one run. importtime prints children before their parent, each
    nested one level deeper (two spaces), so a line adopts the pending lines one level below."""
    pending: dict[int, list[Import]] = defaultdict(list)
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|", 2)
        if not self_us.strip().isdigit():
            continue  # the header line
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        node = Import(name.strip(), float(self_us), float(cumulative_us))
        node.children, pending[depth + 1] = pending[depth + 1], []
        pending[depth].append(node)
    return pending[0]


def walk(nodes: list[Import]) -> list[Import]:
    return [each for node in nodes for each in (node, *walk(node.children))]


def import_profile(argv: list[str], env: dict[str, str], runs: int) -> list[Import]:
    """The first run's tree, its times replaced by the median over `runs` runs per module."""
    script_and_args = argv[1:] if argv[0] == sys.executable else argv
    argv = [sys.executable, "-X", "importtime", *script_and_args]
    forests = []
    for _ in range(runs):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=True)
        forests.append(parse_importtime(done.stderr))
    samples: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for forest in forests:
        for node in walk(forest):
            samples[node.name].append((node.self_us, node.cumulative_us))
    for node in walk(forests[0]):
        node.self_us = statistics.median(s for s, _ in samples[node.name])
        node.cumulative_us = statistics.median(c for _, c in samples[node.name])
    return forests[0]


def by_package(forest: list[Import]) -> list[tuple[str, float]]:
    """Self time summed per top-level package (`structlog`, `click`, `meshnet`, `asyncio`...)."""
    totals: dict[str, float] = defaultdict(float)
    for node in walk(forest):
        totals[node.name.split(".")[0]] += node.self_us
    return sorted(totals.items(), key=lambda item: (-item[1], item[0]))


def tree_rows(forest: list[Import], min_us: float, depth: int = 0) -> list[tuple[int, Import]]:
    """The imports costing at least `min_us` (cumulative), heaviest first, in tree order."""
    rows = []
    for node in sorted(forest, key=lambda n: -n.cumulative_us):
        if node.cumulative_us >= min_us:
            rows.append((depth, node))
            rows += tree_rows(node.children, min_us, depth + 1)
    return rows


def as_json(node: Import, min_us: float) -> dict[str, Any]:
    kept = [child for child in node.children if child.cumulative_us >= min_us]
    return {
        "module": node.name,
        "self_ms": round(node.self_us / 1e3, 2),
        "cumulative_ms": round(node.cumulative_us / 1e3, 2),
        "children": [
            as_json(child, min_us) for child in sorted(kept, key=lambda n: -n.cumulative_us)
        ],
    }


# --- report -----------------------------------------------------------------------------


def print_timing(runs: int, floor: Stats, dry: Stats) -> None:
    print(f"dry-run cold start, {runs} runs each (interleaved, after {WARMUP} warm-up runs)")
    print(f"  interpreter start (python -c pass)          : {floor.ms()}")
    print(f"  meshnet istio-iptables <standard> --dry-run : {dry.ms()}")
    print(
        f"  ratio dry run / interpreter: {dry.median / floor.median:.2f}x;"
        f" dry run minus interpreter: {(dry.median - floor.median) * 1e3:.1f} ms"
    )
    verdict = "met" if dry.median * 1e3 <= TARGET_MS else "NOT met"
    print(f"  target: median <= {TARGET_MS:.0f} ms: {verdict}")


def print_imports(forest: list[Import], runs: int, min_ms: float) -> None:
    total = sum(node.cumulative_us for node in forest)
    print(
        f"\nimport time (-X importtime, median of {runs} runs): {total / 1e3:.1f} ms in all;"
        f" imports of >= {min_ms} ms, heaviest first:"
    )
    print(f"  {'module':52} {'cumulative':>10} {'self':>8}")
    for depth, node in tree_rows(forest, min_ms * 1e3):
        name = "  " * depth + node.name
        print(f"  {name:52} {node.cumulative_us / 1e3:7.1f} ms {node.self_us / 1e3:5.1f} ms")
    print(
        "  (importtime itself adds overhead; `site` and what it imports also run in the"
        " `python -c pass` floor)"
    )
    print("\nself time by top-level package (the 12 largest):")
    for package, self_us in by_package(forest)[:12]:
        print(f"  {package:30} {self_us / 1e3:6.1f} ms  {100 * self_us / total:4.1f}%")


def document(
    args: argparse.Namespace,
    argv: list[str],
    stats: dict[str, Stats],
    forest: list[Import],
    machine_before: dict[str, Any],
) -> dict[str, Any]:
    floor, dry = stats["interpreter"], stats["dry_run"]
    min_us = args.import_min_ms * 1e3
    top = sorted(forest, key=lambda n: -n.cumulative_us)
    return {
        "machine": machine_before,
        "argv": argv,
        "runs": args.runs,
        "warmup": WARMUP,
        "interpreter": floor.as_dict(),
        "dry_run": dry.as_dict(),
        "ratio": dry.median / floor.median,
        "dry_run_minus_interpreter": dry.median - floor.median,
        "target_ms": TARGET_MS,
        "meets_target": dry.median * 1e3 <= TARGET_MS,
        "imports": {
            "runs": args.import_runs,
            "total_ms": round(sum(n.cumulative_us for n in forest) / 1e3, 2),
            "min_ms_shown": args.import_min_ms,
            "tree": [as_json(node, min_us) for node in top if node.cumulative_us >= min_us],
            "by_package_self_ms": {p: round(us / 1e3, 2) for p, us in by_package(forest)},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs of each command")
    parser.add_argument("--import-runs", type=int, default=5, help="runs under -X importtime")
    parser.add_argument("--import-min-ms", type=float, default=1.5, help="smallest import shown")
    args = parser.parse_args()
    before = machine()
    env = clean_env()
    argv = meshnet_argv()
    check_dry_run(argv, env)
    stats = measure(args.runs, [sys.executable, "-c", "pass"], argv, env)
    forest = import_profile(argv, env, args.import_runs)
    print_timing(args.runs, stats["interpreter"], stats["dry_run"])
    print_imports(forest, args.import_runs, args.import_min_ms)
    path = write_result("dry_run_start", document(args, argv, stats, forest, before))
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
