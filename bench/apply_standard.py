"""Benchmark: `meshnet istio-iptables` with Istio's standard injection args, against a floor.

Floor = a bare interpreter start (`python -c pass`) + one bare `iptables-restore --noflush` of
the very same rule text, both measured in this run. Every sample runs in a fresh network
namespace (with one veth address so IPv6 detection has something to look at), entered by this
process so the children inherit it. Prints a table and writes bench/results/apply_standard.json.

Run as root:  .venv/bin/python bench/apply_standard.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from meshnet import netns

REPO = Path(__file__).resolve().parent.parent
STANDARD = [
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
]


@contextmanager
def fresh_namespace() -> Iterator[None]:
    name = f"mnt-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for args in (
            ["link", "set", "lo", "up"],
            ["link", "add", "b0", "type", "veth", "peer", "name", "b1"],
            ["addr", "add", "192.0.2.1/24", "dev", "b0"],
            ["link", "set", "b0", "up"],
        ):
            subprocess.run(["ip", "-n", name, *args], check=True)
        with netns.entered(name):
            yield
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def timed(argv: list[str], stdin: str = "") -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{argv[0]} failed: {result.stderr.strip()}")
    return elapsed


def sample(runs: int, measure: Callable[[], float]) -> dict[str, float]:
    times = []
    for _ in range(runs):
        with fresh_namespace():
            times.append(measure())
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def dry_run(*extra: str) -> str:
    """The text meshnet would apply (comment lines dropped), from its own dry run."""
    argv = [
        sys.executable,
        "-m",
        "meshnet",
        "istio-iptables",
        *STANDARD,
        "--enable-ipv6",
        "false",
        "--dry-run",
        *extra,
    ]
    dry = subprocess.run(argv, capture_output=True, text=True, check=True)
    return "".join(line + "\n" for line in dry.stdout.splitlines() if not line.startswith("#"))


# backend -> (the bare tool that is the floor, meshnet's flags for that backend)
BACKENDS = {
    "nft": (["iptables-nft-restore", "--noflush"], ["--force-iptables-binary", "nft"]),
    "legacy": (["iptables-legacy-restore", "--noflush"], ["--force-iptables-binary", "legacy"]),
    "native-nftables": (["nft", "-f", "-"], ["--native-nftables"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates network namespaces")
    texts = {"iptables": dry_run(), "nft": dry_run("--native-nftables", "--output-format", "nft")}
    interpreter = sample(runs, lambda: timed([sys.executable, "-c", "pass"]))
    results: dict[str, dict[str, object]] = {}
    for backend, (floor_argv, flags) in BACKENDS.items():
        text = texts["nft" if backend == "native-nftables" else "iptables"]
        bare = sample(runs, lambda a=floor_argv, t=text: timed(a, t))  # type: ignore[misc]
        meshnet = sample(
            runs,
            lambda f=flags: timed(  # type: ignore[misc]
                [
                    sys.executable,
                    "-m",
                    "meshnet",
                    "istio-iptables",
                    *STANDARD,
                    *f,
                    "--log_output_level",
                    "default:warn",
                ]
            ),
        )
        floor = interpreter["median"] + bare["median"]
        results[backend] = {
            "meshnet": meshnet,
            "bare_restore": bare,
            "floor_median": floor,
            "ratio": meshnet["median"] / floor,
        }
    report(runs, interpreter, results)


def report(runs: int, interpreter: dict[str, float], results: dict[str, dict[str, object]]) -> None:
    def ms(stats: object) -> str:
        assert isinstance(stats, dict)
        return (
            f"{stats['median'] * 1e3:7.1f} ms (min {stats['min'] * 1e3:.1f}, "
            f"max {stats['max'] * 1e3:.1f})"
        )

    print(f"apply of the standard sidecar rules, {runs} runs each, fresh namespace per run")
    print(f"  interpreter start (python -c pass): {ms(interpreter)}")
    for backend, row in results.items():
        print(f"  [{backend}] bare restore / nft -f : {ms(row['bare_restore'])}")
        print(f"  [{backend}] meshnet istio-iptables: {ms(row['meshnet'])}")
        print(f"  [{backend}] ratio meshnet / (interpreter + bare restore): {row['ratio']:.2f}")
    out = REPO / "bench" / "results" / "apply_standard.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "interpreter": interpreter, **results}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
