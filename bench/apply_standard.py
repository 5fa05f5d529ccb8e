"""Benchmark: the init container's own cost, `meshnet istio-iptables` with Istio's standard
injection args in a fresh pod-like namespace, against a floor measured in the same run.

Floor = the same venv's `python -c pass` + one bare `iptables-restore --noflush` of the very
same IPv4 rules (meshnet's dry-run text, comment lines dropped), the restore of the backend
meshnet detects there (iptables-nft on a host without legacy rules). The three commands run
interleaved (floor, restore, meshnet, floor, ...) so a load spike hits every series, each in
its own fresh network namespace (lo up, one veth with 192.0.2.1/24, so IPv4 only), entered by
this process so the children inherit it; making and deleting namespaces is not timed.
meshnet's time is everything an init container does: interpreter start, imports, detection,
the state check, the restore and the read-back. As in the images (pip compiles on install),
meshnet's bytecode is compiled first and PYTHONDONTWRITEBYTECODE is dropped: a shell that sets
it would otherwise have every run compile meshnet from source. Prints the ratio last and writes
bench/results/apply_standard.json. Target: ratio <= 3.0.

Run as root:  .venv/bin/python bench/apply_standard.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import STANDARD, Stats, clean_env, machine, timed, write_result  # noqa: E402
from meshnet.host import netns  # noqa: E402

TARGET = 3.0
WARMUP = 2
MESHNET = [sys.executable, "-m", "meshnet", "istio-iptables", *STANDARD]
QUIET = ["--log_output_level", "default:warn"]


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


def planned_text(env: dict[str, str]) -> str:
    """The IPv4 restore text meshnet applies for the standard args (its own dry run)."""
    dry = subprocess.run(
        [*MESHNET, "--enable-ipv6", "false", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return "".join(line + "\n" for line in dry.stdout.splitlines() if not line.startswith("#"))


def detected_restore(env: dict[str, str]) -> str:
    """The restore binary meshnet picks in a fresh namespace (from its own log line)."""
    with fresh_namespace():
        done = subprocess.run(MESHNET, capture_output=True, text=True, env=env, check=True)
    for token in done.stderr.split():
        if token.startswith("ipv4="):
            return token.removeprefix("ipv4=") + "-restore"
    sys.exit(f"cannot tell which backend meshnet picked: {done.stderr.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="samples of each (>= 9)")
    runs = max(parser.parse_args().runs, 9)
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates network namespaces")
    env = clean_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "meshnet")], check=True)
    text = planned_text(env)
    restore = [detected_restore(env), "--noflush"]
    series: dict[str, list[float]] = {"interpreter": [], "bare_restore": [], "meshnet": []}
    commands = {
        "interpreter": ([sys.executable, "-c", "pass"], ""),
        "bare_restore": (restore, text),
        "meshnet": ([*MESHNET, *QUIET], ""),
    }
    before = machine()
    for round_ in range(WARMUP + runs):
        for name, (argv, stdin) in commands.items():
            with fresh_namespace():
                elapsed = timed(argv, stdin, env)
            if round_ >= WARMUP:
                series[name].append(elapsed)
    stats = {name: Stats.of(samples) for name, samples in series.items()}
    floor = stats["interpreter"].median + stats["bare_restore"].median
    ratio = stats["meshnet"].median / floor
    print(f"apply of the standard sidecar rules, {runs} interleaved runs, fresh namespace each")
    print(f"  interpreter start (python -c pass)     : {stats['interpreter'].ms()}")
    print(f"  bare {' '.join(restore):<34}: {stats['bare_restore'].ms()}")
    print(f"  meshnet istio-iptables <standard args> : {stats['meshnet'].ms()}")
    print(f"  floor (interpreter + bare restore)     : {floor * 1e3:7.1f} ms")
    path = write_result(
        "apply_standard",
        {
            "runs": runs,
            "machine": before,
            "restore": restore,
            **{name: s.as_dict() for name, s in stats.items()},
            "floor_median": floor,
            "ratio": ratio,
            "meets_target": ratio <= TARGET,
        },
    )
    print(f"wrote {path.relative_to(REPO)}")
    met = "met" if ratio <= TARGET else "NOT met"
    print(f"ratio meshnet / floor: {ratio:.2f}x (target <= {TARGET:.1f}x: {met})")


if __name__ == "__main__":
    main()
