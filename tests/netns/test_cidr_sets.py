"""--cidr-sets for real: sets are created with the rules, checked, and removed with them."""

from __future__ import annotations

import re

import pytest

from tests.support.cli import meshnet

from .harness import V4, Topology

FLAGS = [
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-b",
    "*",
    "-i",
    "198.51.100.0/24,2001:db8:1::/64",
    "-x",
    "192.0.2.128/25,2001:db8:ff::/48",
    "--dual-stack",
    "--cidr-sets",
]


def run(topo: Topology, *args: str) -> tuple[int, str]:
    result = meshnet([*args, "--network-namespace", str(topo.pod_path)], timeout=120)
    return result.returncode, result.stdout + result.stderr


def ipsets(topo: Topology) -> str:
    return topo.exec(topo.pod_ns, ["ipset", "save"], check=True).stdout


def nft_sets(topo: Topology) -> str:
    listing = topo.exec(topo.pod_ns, ["nft", "list", "ruleset"], check=True).stdout
    return " ".join(re.findall(r"set (meshnet-\S+)", listing))


def test_ipsets_live_and_die_with_the_rules(topology: Topology) -> None:
    assert run(topology, "istio-iptables", *FLAGS)[0] == 0
    saved = ipsets(topology)
    for name in (
        "meshnet-include-v4",
        "meshnet-include-v6",
        "meshnet-exclude-v4",
        "meshnet-exclude-v6",
    ):
        assert f"create {name} hash:net" in saved
    assert "add meshnet-exclude-v4 192.0.2.128/25" in saved
    assert run(topology, "istio-iptables", *FLAGS)[0] == 0  # no-op
    assert ipsets(topology) == saved
    assert run(topology, "verify", *FLAGS)[0] == 0
    topology.exec(
        topology.pod_ns, ["ipset", "del", "meshnet-exclude-v4", "192.0.2.128/25"], check=True
    )
    code, out = run(topology, "verify", *FLAGS)
    assert code == 3 and "missing member 192.0.2.128/25" in out
    code, out = run(topology, "istio-iptables", *FLAGS)
    assert code == 1 and "--reconcile" in out
    assert run(topology, "istio-iptables", *FLAGS, "--reconcile")[0] == 0
    assert run(topology, "verify", *FLAGS)[0] == 0
    assert run(topology, "clean", *FLAGS)[0] == 0
    assert ipsets(topology).strip() == ""
    saved_rules = topology.exec(topology.pod_ns, ["iptables-save"], check=True).stdout
    assert "ISTIO" not in saved_rules


def test_nft_named_sets_live_and_die_with_the_tables(topology: Topology) -> None:
    flags = [*FLAGS, "--native-nftables"]
    assert run(topology, "istio-iptables", *flags)[0] == 0
    assert nft_sets(topology) == (
        "meshnet-exclude-v4 meshnet-exclude-v6 meshnet-include-v4 meshnet-include-v6"
    )
    assert run(topology, "istio-iptables", *flags)[0] == 0
    assert run(topology, "verify", *flags)[0] == 0
    assert run(topology, "clean", *flags)[0] == 0
    assert nft_sets(topology) == ""


def _many_cidrs(count: int) -> str:
    # Short texts: 10,000 of them must fit in one argument (the kernel's 128 KiB limit). They
    # only ever appear in rules; no traffic goes to them.
    cidrs = (f"{1 + n % 9}.{n // 9 // 256}.{n // 9 % 256}.0/24" for n in range(count))
    return ",".join(cidrs)


@pytest.mark.parametrize("engine", [[], ["--native-nftables"]], ids=["ipset", "nft-set"])
def test_ten_thousand_excluded_cidrs_apply(topology: Topology, engine: list[str]) -> None:
    flags = ["-i", "*", "-x", _many_cidrs(10_000), "-b", "*", "--cidr-sets", *engine]
    code, out = run(topology, "istio-iptables", *flags)
    assert code == 0, out[-2000:]
    assert run(topology, "verify", *flags)[0] == 0
    topology.start_listeners(topology.pod_ns, "proxy", [15001])
    topology.start_listeners(topology.peer_ns, "peer", [80])
    landing = topology.probe(topology.pod_ns, V4.peer, 80, uid=1000, gid=1000)
    assert landing.landed_at("proxy", 15001), landing.where
    assert run(topology, "clean", *flags)[0] == 0
