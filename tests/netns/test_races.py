"""Concurrent runs and kills in one pod namespace: never a pod left without interception.

Each variant (backend x mode) first applies once in a fresh namespace: that namespace's whole
state (both backends' saves for both families, `nft list ruleset`, policy rules, routes of every
table, lo's addresses) is the correct result every trial is compared with. Trials use fresh
namespaces of the same shape (eth0 with 192.0.2.2/24 and 2001:db8::2/64, IPv6 on).

- races: N identical applies start together; all must exit 0 and leave exactly that state.
- kills: an apply is SIGKILLed (its whole process group) after a random delay within the time
  one apply takes; `verify` must then say 0 only for the complete state and 3 otherwise, and a
  re-run must end in the complete state.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from tests.support.cli import clean_env
from tests.support.netstate import NFT_COUNTERS, ROUTING, SAVERS, assert_same_state, normalize_save

from .harness import NS_PREFIX, require_root_netns

BASE = (
    *("-p", "15001", "-z", "15006", "-u", "1337"),
    *("-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--enable-ipv6", "true"),
)
MODES = {"redirect": ("-m", "REDIRECT"), "tproxy": ("-m", "TPROXY")}
BACKENDS = {
    "nft": ("--force-iptables-binary", "nft"),
    "legacy": ("--force-iptables-binary", "legacy"),
    "native": ("--native-nftables",),
}
VARIANTS = [pytest.param(b, m, id=f"{b}-{m}") for b in BACKENDS for m in MODES]
KILLS_PER_VARIANT = 30


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@contextmanager
def pod_namespace() -> Iterator[str]:
    """A pod-like namespace (lo up, eth0 with one address per family); deleted afterwards."""
    require_root_netns()
    name = f"{NS_PREFIX}race-{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        _ip("-n", name, "link", "set", "peer0", "up")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "addr", "add", "192.0.2.2/24", "dev", "eth0")
        _ip("-n", name, "addr", "add", "2001:db8::2/64", "dev", "eth0", "nodad")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def whole_state(ns: str, backend: str) -> dict[str, str]:
    """As in test_lifecycle; `nft list ruleset` only for native nft: iptables-nft-restore can
    recreate a table with its base chains in another order, the same to iptables-nft-save."""

    def run(argv: Sequence[str]) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
        ).stdout

    state = {saver: normalize_save(run([saver])) for saver in SAVERS}
    if backend == "native":
        state["nft"] = NFT_COUNTERS.sub("packets 0 bytes 0", run(["nft", "list", "ruleset"]))
    for key, argv in ROUTING.items():
        shown = run(["ip", *argv])
        state[key] = "".join(line for line in shown.splitlines(True) if "fe80:" not in line)
    return state


def argv(command: str, ns: str, backend: str, mode: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "meshnet", command, *BASE, *MODES[mode], *BACKENDS[backend]),
        *("--network-namespace", ns),
    ]


def start(command: str, ns: str, backend: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv(command, ns, backend, mode),
        env=clean_env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a kill takes its children too
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = process.communicate(timeout=60)
    return process.returncode, out + err


def run(command: str, ns: str, backend: str, mode: str) -> tuple[int, str]:
    return finish(start(command, ns, backend, mode))


@pytest.fixture(scope="module")
def correct() -> dict[tuple[str, str], tuple[dict[str, str], float]]:
    """Per variant: the state one apply leaves, and how long that apply took (kill window)."""
    found: dict[tuple[str, str], tuple[dict[str, str], float]] = {}
    for backend in BACKENDS:
        for mode in MODES:
            with pod_namespace() as ns:
                began = time.monotonic()
                code, output = run("istio-iptables", ns, backend, mode)
                took = time.monotonic() - began
                assert code == 0, output
                found[backend, mode] = (whole_state(ns, backend), took)
    return found


@pytest.mark.parametrize(("backend", "mode"), VARIANTS)
@pytest.mark.parametrize("runs", [2, 4, 8])
def test_concurrent_applies_end_in_the_correct_state(
    correct: dict[tuple[str, str], tuple[dict[str, str], float]], backend: str, mode: str, runs: int
) -> None:
    with pod_namespace() as ns:
        processes = [start("istio-iptables", ns, backend, mode) for _ in range(runs)]
        results = [finish(p) for p in processes]
        assert [code for code, _ in results] == [0] * runs, "\n".join(o for _, o in results)
        assert_same_state(whole_state(ns, backend), correct[backend, mode][0])
        code, output = run("verify", ns, backend, mode)
        assert code == 0, output


@pytest.mark.parametrize(("backend", "mode"), VARIANTS)
def test_a_killed_apply_is_reported_and_repaired(
    correct: dict[tuple[str, str], tuple[dict[str, str], float]], backend: str, mode: str
) -> None:
    complete, took = correct[backend, mode]
    rng = random.Random(f"{backend}-{mode}")  # reproducible kill points per variant
    outcomes = {"untouched": 0, "complete": 0, "drifted": 0}
    for trial in range(KILLS_PER_VARIANT):
        with pod_namespace() as ns:
            untouched = whole_state(ns, backend)
            process = start("istio-iptables", ns, backend, mode)
            time.sleep(rng.uniform(0, took))
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
            killed = whole_state(ns, backend)

            code, output = run("verify", ns, backend, mode)
            where = f"trial {trial}: verify exit {code}\n{output}"
            if killed == complete:
                assert code == 0, where
                outcomes["complete"] += 1
            else:
                assert code == 3, where
                outcomes["untouched" if killed == untouched else "drifted"] += 1

            code, output = run("istio-iptables", ns, backend, mode)
            assert code == 0, f"trial {trial}: re-run exit {code}\n{output}"
            assert_same_state(whole_state(ns, backend), complete)
    print(f"{backend}-{mode}: {KILLS_PER_VARIANT} kills: {outcomes}")
