"""An init container has NET_ADMIN and NET_RAW, not CAP_SYS_ADMIN: everything still works.

Without CAP_SYS_ADMIN meshnet cannot make the private namespace it uses to spell a plan the way
iptables-save does, so it compares as Istio does (rule counts and `iptables -C`, nft chain
and rule counts). Without NET_ADMIN it must fail with a message that says what is missing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.cli import STANDARD_ARGS

from .harness import Topology

STANDARD = [*STANDARD_ARGS]


def run(topo: Topology, drop: str, *args: str) -> subprocess.CompletedProcess[str]:
    """meshnet inside the pod namespace with capabilities removed from its bounding set."""
    argv = [
        "ip",
        "netns",
        "exec",
        topo.pod_ns,
        "setpriv",
        f"--bounding-set={drop}",
        "--",
        sys.executable,
        "-m",
        "meshnet",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("engine", [[], ["--native-nftables"]], ids=["iptables", "nftables"])
def test_without_sys_admin_apply_rerun_and_drift_work(
    topology: Topology, engine: list[str]
) -> None:
    flags = [*STANDARD, *engine]
    assert run(topology, "-sys_admin", "istio-iptables", *flags).returncode == 0
    rerun = run(topology, "-sys_admin", "istio-iptables", *flags)
    assert rerun.returncode == 0 and "nothing to apply" in rerun.stderr
    assert run(topology, "-sys_admin", "verify", *flags).returncode == 0
    drifted = run(
        topology, "-sys_admin", "istio-iptables", *flags, "--redirect-dns", "--capture-all-dns"
    )
    assert drifted.returncode == 1 and "--reconcile" in drifted.stderr
    assert run(topology, "-sys_admin", "verify", *flags, "--drop-invalid").returncode == 3
    assert run(topology, "-sys_admin", "clean", *flags).returncode == 0


def test_without_sys_admin_a_deleted_rule_is_drift(topology: Topology) -> None:
    assert run(topology, "-sys_admin", "istio-iptables", *STANDARD).returncode == 0
    topology.exec(
        topology.pod_ns,
        [
            "iptables",
            "-t",
            "nat",
            "-D",
            "ISTIO_INBOUND",
            "-p",
            "tcp",
            "--dport",
            "15021",
            "-j",
            "RETURN",
        ],
        check=True,
    )
    result = run(topology, "-sys_admin", "verify", *STANDARD)
    assert result.returncode == 3
    assert "missing rule: -A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN" in result.stdout


def test_without_net_admin_the_error_names_the_capability(topology: Topology) -> None:
    result = run(topology, "-net_admin,-net_raw,-sys_admin", "istio-iptables", *STANDARD)
    assert result.returncode == 1
    assert "NET_ADMIN and NET_RAW" in result.stderr
    saved = topology.exec(topology.pod_ns, ["iptables-save"], check=True).stdout
    assert "ISTIO" not in saved
