"""The harness itself, proved with a hand-written Istio ruleset (no meshnet involved).

If these pass, a meshnet-generated ruleset that behaves like Istio's will pass the
same probes; if the harness were broken (e.g. probes never leave the pod), the
no-rules baseline below would catch it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .harness import (
    FAMILIES,
    Family,
    Landing,
    SecondLink,
    Topology,
    netns_leftovers,
    netns_path,
    require_root_netns,
)

PROXY_UID = 1337
APP_UID = 1000

ISTIO_RULES_V4 = """\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""  # noqa: E501 - verbatim Istio rules

ISTIO_RULES_V6 = ISTIO_RULES_V4.replace("127.0.0.6/32", "::6/128").replace(
    "127.0.0.1/32", "::1/128"
)

family_param = pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)


def start_standard_listeners(topo: Topology) -> None:
    topo.start_listeners(topo.pod_ns, "proxy", [15001, 15006])
    topo.start_listeners(topo.pod_ns, "app", [8080])
    topo.start_listeners(topo.pod_ns, "admin", [15021])
    topo.start_listeners(topo.peer_ns, "peer", [80, 8080])


@pytest.fixture(scope="module")
def istio_pod() -> Iterator[Topology]:
    """One topology with Istio's rules for both families; probes do not change state."""
    require_root_netns()
    with Topology() as topo:
        topo.iptables_restore(topo.pod_ns, ISTIO_RULES_V4, family=FAMILIES[0])
        topo.iptables_restore(topo.pod_ns, ISTIO_RULES_V6, family=FAMILIES[1])
        start_standard_listeners(topo)
        yield topo


def assert_landed(landing: Landing, label: str, port: int) -> None:
    assert landing.landed_at(label, port), f"expected {label}:{port}, got {landing.where}"


# --------------------------------------------------------------------------- baseline


@family_param
def test_without_rules_outbound_reaches_peer_directly(topology: Topology, fam: Family) -> None:
    start_standard_listeners(topology)
    landing = topology.probe(topology.pod_ns, fam.peer, 80, uid=APP_UID, gid=APP_UID)
    assert_landed(landing, "peer", 80)
    assert landing.orig_dst == fam.addr(fam.peer, 80)
    assert landing.peer_ip == fam.pod


@family_param
def test_udp_echo_without_rules(topology: Topology, fam: Family) -> None:
    topology.start_listeners(topology.peer_ns, "dns", udp_ports=[53])
    landing = topology.probe(topology.pod_ns, fam.peer, 53, proto="udp", uid=APP_UID, gid=APP_UID)
    assert_landed(landing, "dns", 53)
    assert landing.orig_dst == fam.addr(fam.peer, 53)
    assert landing.peer_ip == fam.pod


@family_param
def test_refused_connection_is_reported_not_raised(topology: Topology, fam: Family) -> None:
    landing = topology.probe(topology.pod_ns, fam.peer, 9, timeout=1.0)
    assert not landing.ok
    assert landing.error is not None and "Refused" in landing.error


# --------------------------------------------------------------------------- Istio rules


@family_param
def test_app_outbound_is_captured_by_proxy(istio_pod: Topology, fam: Family) -> None:
    landing = istio_pod.probe(istio_pod.pod_ns, fam.peer, 80, uid=APP_UID, gid=APP_UID)
    assert_landed(landing, "proxy", 15001)
    assert landing.orig_dst == fam.addr(fam.peer, 80)


@family_param
def test_proxy_outbound_bypasses_capture(istio_pod: Topology, fam: Family) -> None:
    landing = istio_pod.probe(istio_pod.pod_ns, fam.peer, 80, uid=PROXY_UID, gid=PROXY_UID)
    assert_landed(landing, "peer", 80)
    assert landing.peer_ip == fam.pod


@family_param
def test_proxy_gid_alone_bypasses_capture(istio_pod: Topology, fam: Family) -> None:
    landing = istio_pod.probe(istio_pod.pod_ns, fam.peer, 80, uid=APP_UID, gid=PROXY_UID)
    assert_landed(landing, "peer", 80)


@family_param
def test_inbound_is_captured_by_proxy(istio_pod: Topology, fam: Family) -> None:
    landing = istio_pod.probe(istio_pod.peer_ns, fam.pod, 8080)
    assert_landed(landing, "proxy", 15006)
    assert landing.orig_dst == fam.addr(fam.pod, 8080)
    assert landing.orig_dst_via == "so_original_dst"
    assert landing.peer_ip == fam.peer


@family_param
def test_inbound_excluded_port_reaches_admin(istio_pod: Topology, fam: Family) -> None:
    landing = istio_pod.probe(istio_pod.peer_ns, fam.pod, 15021)
    assert_landed(landing, "admin", 15021)


@family_param
def test_localhost_is_not_captured(istio_pod: Topology, fam: Family) -> None:
    landing = istio_pod.probe(istio_pod.pod_ns, fam.loopback, 8080, uid=APP_UID, gid=APP_UID)
    assert_landed(landing, "app", 8080)


@family_param
def test_proxy_to_own_pod_ip_goes_through_inbound(istio_pod: Topology, fam: Family) -> None:
    landing = istio_pod.probe(istio_pod.pod_ns, fam.pod, 8080, uid=PROXY_UID, gid=PROXY_UID)
    assert_landed(landing, "proxy", 15006)
    assert landing.orig_dst == fam.addr(fam.pod, 8080)


# --------------------------------------------------------------------------- TPROXY


TPROXY_RULES = """\
*mangle
-A PREROUTING -p tcp --dport 8080 -j TPROXY --on-port 15006 --tproxy-mark 0x1/0x1
COMMIT
"""


@family_param
def test_transparent_listener_receives_tproxy(topology: Topology, fam: Family) -> None:
    """--transparent-port works, and orig_dst falls back to the (original) local address."""
    pod = topology.pod_ns
    ipf = ["-6"] if fam.version == 6 else ["-4"]
    topology.exec(pod, ["ip", *ipf, "rule", "add", "fwmark", "1", "lookup", "133"], check=True)
    local = ["ip", *ipf, "route", "add", "local", "default", "dev", "lo", "table", "133"]
    topology.exec(pod, local, check=True)
    topology.iptables_restore(pod, TPROXY_RULES, family=fam)
    topology.start_listeners(pod, "proxy", [15006], transparent_ports=[15006])
    landing = topology.probe(topology.peer_ns, fam.pod, 8080)
    assert_landed(landing, "proxy", 15006)
    assert landing.orig_dst == fam.addr(fam.pod, 8080)
    assert landing.orig_dst_via == "sockname"  # no NAT: the socket's own address


# --------------------------------------------------------------------------- lifecycle


def test_listener_as_uid_reports_bind_errors(topology: Topology) -> None:
    first = topology.start_listeners(topology.pod_ns, "first", [80], uid=PROXY_UID, gid=PROXY_UID)
    # Fully dropped (real, effective, saved, fs) even though it bound a port < 1024.
    status = Path(f"/proc/{first.pid}/status").read_text()
    assert f"Uid:\t{PROXY_UID}\t{PROXY_UID}\t{PROXY_UID}\t{PROXY_UID}\n" in status
    with pytest.raises(RuntimeError, match="Address already in use"):
        topology.start_listeners(topology.pod_ns, "second", [80])


def test_many_concurrent_probes(istio_pod: Topology) -> None:
    fam = FAMILIES[0]
    with ThreadPoolExecutor(max_workers=16) as pool:
        landings = list(
            pool.map(lambda _: istio_pod.probe(istio_pod.peer_ns, fam.pod, 8080), range(32))
        )
    assert all(landing.landed_at("proxy", 15006) for landing in landings), [
        landing.where for landing in landings if not landing.landed_at("proxy", 15006)
    ]


@pytest.mark.parametrize("second_link", ["peer", "third"])
def test_second_link_reaches_far_side(
    make_topology: Callable[..., Topology], second_link: SecondLink
) -> None:
    topo = make_topology(second_link=second_link)
    topo.start_listeners(topo.third_ns if second_link == "third" else topo.peer_ns, "far", [80])
    for fam in FAMILIES:
        assert_landed(topo.probe(topo.pod_ns, fam.peer2, 80), "far", 80)


def test_close_removes_namespaces_and_processes() -> None:
    require_root_netns()
    topo = Topology(second_link="third")
    with topo:
        listener = topo.start_listeners(topo.third_ns, "far", [80])
        namespaces = [topo.pod_ns, topo.peer_ns, topo.third_ns]
        assert all(netns_path(ns).exists() for ns in namespaces)
        landing = topo.probe(topo.pod_ns, FAMILIES[1].peer2, 80)
        assert_landed(landing, "far", 80)
    assert not set(namespaces) & set(netns_leftovers())
    assert not os.path.exists(f"/proc/{listener.pid}")
    assert listener.proc.returncode == 0  # SIGTERM handled: a clean exit, not a SIGKILL


def test_close_after_failed_setup_removes_partial_state() -> None:
    require_root_netns()
    topo = Topology()
    topo.add_netns(topo.pod_ns)
    with pytest.raises(RuntimeError):
        topo.add_netns(topo.pod_ns)  # duplicate name: setup fails halfway
    topo.close()
    assert topo.pod_ns not in netns_leftovers()
