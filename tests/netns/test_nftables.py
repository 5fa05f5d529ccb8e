"""--native-nftables for real: apply, re-run, drift, reconcile, clean, coexistence, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.cli import STANDARD_ARGS, meshnet

from . import explain_oracle
from .explain_oracle import explain_agrees_with_the_kernel  # noqa: F401 (autouse fixture)
from .harness import V4, V6, Family, Topology

STANDARD = [*STANDARD_ARGS, "--native-nftables", "--dual-stack"]
FOREIGN = """\
table inet foreign {
	chain output {
		type filter hook output priority 0; policy accept;
		tcp dport 9 counter accept
	}
}
"""


def ruleset(topo: Topology) -> str:
    listing = topo.exec(topo.pod_ns, ["nft", "list", "ruleset"], check=True).stdout
    return re.sub(r"counter packets \d+ bytes \d+", "counter", listing)


def run(topo: Topology, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    argv = [*args, "--network-namespace", str(topo.pod_path)]
    result = meshnet(argv, env=env)
    if result.returncode == 0 and args[0] == "istio-iptables":
        explain_oracle.record(topo, argv, env)
    return result.returncode, result.stdout + result.stderr


def test_dry_run_prints_the_transaction_and_touches_nothing(topology: Topology) -> None:
    code, out = run(topology, "istio-iptables", *STANDARD, "--dry-run")
    assert code == 0 and "add table inet istio-proxy-nat" in out
    assert ruleset(topology) == ""


@pytest.mark.parametrize("fam", [V4, V6], ids=lambda f: f.name)
def test_apply_captures_traffic_and_rerun_is_a_no_op(topology: Topology, fam: Family) -> None:
    assert run(topology, "istio-iptables", *STANDARD)[0] == 0
    applied = ruleset(topology)
    assert "table inet istio-proxy-nat" in applied
    topology.start_listeners(topology.pod_ns, "proxy", [15001, 15006])
    topology.start_listeners(topology.pod_ns, "admin", [15021])
    topology.start_listeners(topology.peer_ns, "peer", [80])
    out = topology.probe(topology.pod_ns, fam.peer, 80, uid=1000, gid=1000)
    assert out.landed_at("proxy", 15001) and out.orig_dst == fam.addr(fam.peer, 80), out.where
    direct = topology.probe(topology.pod_ns, fam.peer, 80, uid=1337, gid=1337)
    assert direct.landed_at("peer", 80), direct.where
    inbound = topology.probe(topology.peer_ns, fam.pod, 8080)
    assert inbound.landed_at("proxy", 15006), inbound.where
    health = topology.probe(topology.peer_ns, fam.pod, 15021)
    assert health.landed_at("admin", 15021), health.where
    assert run(topology, "istio-iptables", *STANDARD)[0] == 0
    assert ruleset(topology) == applied


def test_drift_needs_reconcile_and_verify_reports_it(topology: Topology) -> None:
    assert run(topology, "istio-iptables", *STANDARD)[0] == 0
    before = ruleset(topology)
    changed = [*STANDARD, "--redirect-dns", "--capture-all-dns"]
    code, out = run(topology, "istio-iptables", *changed)
    assert code == 1 and "--reconcile" in out
    assert ruleset(topology) == before
    assert run(topology, "verify", *changed)[0] == 3
    assert run(topology, "istio-iptables", *changed, "--reconcile")[0] == 0
    assert run(topology, "verify", *changed)[0] == 0
    assert run(topology, "verify", *STANDARD)[0] == 3
    assert "istio-proxy-raw" in ruleset(topology)


def test_force_apply_reapplies_rules_in_place_but_not_over_drift(topology: Topology) -> None:
    """As the iptables engine: --force-apply re-applies, --reconcile replaces drift."""
    assert run(topology, "istio-iptables", *STANDARD)[0] == 0
    before = ruleset(topology)
    changed = [*STANDARD, "--redirect-dns", "--capture-all-dns"]
    code, out = run(topology, "istio-iptables", *changed, "--force-apply")
    assert code == 1 and "--reconcile" in out
    assert ruleset(topology) == before
    code, out = run(topology, "istio-iptables", *STANDARD, "--force-apply")
    assert code == 0 and "--force-apply: applying over rules that are already in place" in out
    assert ruleset(topology) == before


def test_clean_removes_only_meshnets_tables(topology: Topology) -> None:
    topology.exec(topology.pod_ns, ["nft", "-f", "-"], input=FOREIGN, check=True)
    restore = "*nat\n-A OUTPUT -d 192.0.2.9/32 -j RETURN\nCOMMIT\n"
    topology.exec(topology.pod_ns, ["iptables-nft-restore", "--noflush"], input=restore, check=True)
    before = ruleset(topology)
    assert run(topology, "istio-iptables", *STANDARD, "-m", "TPROXY")[0] == 0
    assert "istio-proxy-mangle" in ruleset(topology)
    rules = topology.exec(topology.pod_ns, ["ip", "rule"], check=True).stdout
    assert "lookup 133" in rules
    assert run(topology, "clean", *STANDARD, "-m", "TPROXY")[0] == 0
    assert ruleset(topology) == before
    assert "lookup 133" not in topology.exec(topology.pod_ns, ["ip", "rule"], check=True).stdout
    lo = topology.exec(topology.pod_ns, ["ip", "-6", "addr", "show", "dev", "lo"]).stdout
    assert "::6/128" not in lo


def test_missing_nft_binary_is_a_clear_error(topology: Topology, tmp_path: Path) -> None:
    code, out = run(topology, "istio-iptables", *STANDARD, env={"PATH": str(tmp_path)})
    assert code == 1
    assert "nativeNftables is enabled, but the nft binary is missing" in out
    assert ruleset(topology) == ""
