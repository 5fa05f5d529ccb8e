"""Benchmark: 10,000 excluded CIDRs, one rule each (Istio) vs --cidr-sets (ipset / nft set).

For each variant, in a fresh pod namespace: the apply time of `meshnet istio-iptables`, then
the set-up latency of many short TCP connections from the pod that cross the rules (an app
connection that ends captured at the pod's 15001 listener). The floor is the same apply and the
same connections with no exclusions, measured in this run. Prints a table and writes
bench/results/cidrs.json.

Run as root:  .venv/bin/python bench/cidrs.py [--cidrs 10000] [--connections 500]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshnet.host import netns

REPO = Path(__file__).resolve().parent.parent
BASE = [
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
    "-b",
    "*",
    "--enable-ipv6",
    "false",
    "--log_output_level",
    "default:warn",
]
VARIANTS = {
    "no exclusions (floor)": [],
    "iptables, one rule per CIDR": ["-x", "{cidrs}"],
    "iptables --cidr-sets (ipset)": ["-x", "{cidrs}", "--cidr-sets"],
    "nftables, one rule per CIDR": ["-x", "{cidrs}", "--native-nftables"],
    "nftables --cidr-sets (set)": ["-x", "{cidrs}", "--cidr-sets", "--native-nftables"],
}


def cidrs(count: int) -> str:
    # Short texts so 10,000 fit in one argument; none of them is ever a traffic target.
    return ",".join(f"{1 + n % 9}.{n // 9 // 256}.{n // 9 % 256}.0/24" for n in range(count))


@contextmanager
def pod() -> Iterator[str]:
    name = f"mnt-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for args in (
            ["link", "set", "lo", "up"],
            ["link", "add", "b0", "type", "veth", "peer", "name", "b1"],
            ["addr", "add", "192.0.2.1/24", "dev", "b0"],
            ["link", "set", "b0", "up"],
            ["link", "set", "b1", "up"],
        ):
            subprocess.run(["ip", "-n", name, *args], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def apply(name: str, flags: list[str]) -> float:
    argv = [
        sys.executable,
        "-m",
        "meshnet",
        "istio-iptables",
        *BASE,
        *flags,
        "--network-namespace",
        name,
    ]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def connections(name: str, count: int) -> list[float]:
    """Connect as uid 1000 to 192.0.2.9:80 (captured to the pod's 15001 listener)."""
    with netns.entered(name):
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", 15001))
        server.listen(128)
    threading.Thread(target=_accept, args=(server,), daemon=True).start()
    times = []
    try:
        for _ in range(count):
            with netns.entered(name):
                os.seteuid(1000)  # the app, not the proxy: its traffic is captured
                try:
                    client = socket.socket()
                finally:
                    os.seteuid(0)
            with client:
                start = time.perf_counter()
                client.connect(("192.0.2.9", 80))
                times.append(time.perf_counter() - start)
    finally:
        server.close()
    return times


def _accept(server: socket.socket) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cidrs", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=500)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates network namespaces")
    text = cidrs(args.cidrs)
    results: dict[str, dict[str, float]] = {}
    for label, template in VARIANTS.items():
        flags = [text if f == "{cidrs}" else f for f in template]
        with pod() as name:
            applied = apply(name, flags)
            times = connections(name, args.connections)
        results[label] = {
            "apply_s": applied,
            "connect_median_us": statistics.median(times) * 1e6,
            "connect_p99_us": sorted(times)[int(len(times) * 0.99) - 1] * 1e6,
        }
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> None:
    floor = results["no exclusions (floor)"]
    print(f"{args.cidrs} excluded CIDRs; {args.connections} connections per variant")
    print(
        f"{'variant':32} {'apply':>9} {'x floor':>8} {'connect p50':>12} {'x floor':>8} {'p99':>9}"
    )
    for label, row in results.items():
        print(
            f"{label:32} {row['apply_s']:8.3f}s {row['apply_s'] / floor['apply_s']:8.2f} "
            f"{row['connect_median_us']:10.1f}us "
            f"{row['connect_median_us'] / floor['connect_median_us']:8.2f} "
            f"{row['connect_p99_us']:7.1f}us"
        )
    out = REPO / "bench" / "results" / "cidrs.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"cidrs": args.cidrs, "connections": args.connections, "results": results}, indent=2
        )
    )
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
