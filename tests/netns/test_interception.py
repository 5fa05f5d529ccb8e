"""Where real connections land once `meshnet istio-iptables` has set up a pod namespace.

Each test builds fresh namespaces (harness.py), runs the CLI as the init container would
(a subprocess with ``--network-namespace``), starts listeners that report what they saw
(label, port, SO_ORIGINAL_DST, peer address) and sends real connections through the
kernel. Nothing is asserted about rule text: only about where traffic ends up.

IPv4 runs use Istio's default detection (the pod's first address is IPv4, so no IPv6
rules); IPv6 runs add ``--dual-stack``. The standard sidecar case also runs on both
iptables backends; the rest use the default backend to keep the run short.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pytest

from tests.support.cli import meshnet

from . import explain_oracle
from .explain_oracle import explain_agrees_with_the_kernel  # noqa: F401 (autouse fixture)
from .harness import (
    FAMILIES,
    PYTHON,
    READY_TIMEOUT,
    Family,
    Landing,
    Listener,
    Topology,
    check_probe_target,
    fmt_addr,
    netns_argv,
    serve_argv,
    wait_ready,
)

APP_UID = 1000
PROXY_UID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
DNS_PORT = 15053
ADMIN_PORTS = (15021, 15020, 15090)

# The injector's default istio-init arguments (also the ones `meshnet demo` applies).
STANDARD = {
    "p": str(OUTBOUND_PORT),
    "z": str(INBOUND_PORT),
    "u": str(PROXY_UID),
    "m": "REDIRECT",
    "i": "*",
    "x": "",
    "b": "*",
    "d": "15090,15021,15020",
}

family_param = pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
# The iptables plan (default backend) and the same plan as native nftables.
engine_param = pytest.mark.parametrize(
    "engine", [None, "native-nftables"], ids=["iptables", "nftables"]
)
BACKENDS = ("nft", "legacy", "native-nftables")


def istio_flags(**overrides: str | None) -> list[str]:
    """The standard flags with some short flags replaced (None drops one)."""
    values = {**STANDARD, **overrides}
    return [arg for key, value in values.items() if value is not None for arg in (f"-{key}", value)]


# --------------------------------------------------------------------------- setup


def apply_rules(
    topo: Topology,
    fam: Family,
    flags: Sequence[str],
    env: Mapping[str, str] | None = None,
    backend: str | None = None,
) -> None:
    """Run the CLI against the pod namespace, as the init container does; must exit 0."""
    argv = ["istio-iptables", *flags]
    if fam.version == 6:
        argv.append("--dual-stack")
    if backend == "native-nftables":
        argv.append("--native-nftables")
    elif backend is not None:
        argv += ["--force-iptables-binary", backend]
    argv += ["--network-namespace", str(topo.pod_path)]
    result = meshnet(argv, env)
    assert result.returncode == 0, f"meshnet {argv} exited {result.returncode}: {result.stderr}"
    explain_oracle.record(topo, argv, env)


@dataclass(frozen=True)
class ListenerSpec:
    ns: str
    label: str
    tcp: Sequence[int] = ()
    udp: Sequence[int] = ()
    transparent: Sequence[int] = ()
    uid: int | None = None
    gid: int | None = None


def start_all(topo: Topology, specs: Sequence[ListenerSpec]) -> None:
    """Topology.start_listeners for several agents at once: spawn all, then await each.

    Spawned from this thread on purpose: an agent's parent-death signal fires when the
    *thread* that forked it exits, so a thread pool here would kill them on shutdown.
    """
    started = []
    for spec in specs:
        argv = serve_argv(spec.label, spec.tcp, spec.udp, spec.transparent, spec.uid, spec.gid)
        stderr = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(  # fixed argument list, no shell
                netns_argv(spec.ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        except BaseException:
            stderr.close()
            raise
        listener = Listener(spec.ns, spec.label, proc, stderr)
        topo.listeners.append(listener)  # registered at once: the topology reaps it
        started.append(listener)
    for listener in started:
        wait_ready(listener, READY_TIMEOUT)


def start_listeners(topo: Topology, tproxy: bool = False) -> None:
    """Every listener the tests expect."""
    pod, peer = topo.pod_ns, topo.peer_ns
    transparent = [INBOUND_PORT] if tproxy else []
    specs = [
        ListenerSpec(pod, "proxy", [OUTBOUND_PORT, INBOUND_PORT], transparent=transparent),
        ListenerSpec(pod, "app", [8080, 9090]),
        ListenerSpec(pod, "admin", ADMIN_PORTS),
        # The proxy's DNS listener runs as the proxy user, like the sidecar's.
        ListenerSpec(pod, "dns", [DNS_PORT], [DNS_PORT], uid=PROXY_UID, gid=PROXY_UID),
        ListenerSpec(peer, "peer", [80, 8080, 443, 53], [53]),
    ]
    start_all(topo, specs)


def app_probe(
    topo: Topology, dst: str, port: int, proto: str = "tcp", gid: int = APP_UID
) -> Landing:
    """A connection from the application container (uid 1000) in the pod."""
    return topo.probe(topo.pod_ns, dst, port, proto=proto, uid=APP_UID, gid=gid)


def assert_landed(
    landing: Landing, label: str, port: int, orig_dst: str | None = None, peer: str | None = None
) -> None:
    assert landing.landed_at(label, port), f"expected {label}:{port}, got {landing.where}"
    if orig_dst is not None:
        assert landing.orig_dst == orig_dst, f"expected orig_dst {orig_dst}, got {landing.where}"
    if peer is not None:
        assert landing.peer_ip == peer, f"expected peer {peer}, got {landing.where}"


def assert_captured_outbound(landing: Landing, fam: Family, dst: str, port: int) -> None:
    assert_landed(landing, "proxy", OUTBOUND_PORT, orig_dst=fam.addr(dst, port))


def assert_direct(landing: Landing, dst: str, port: int) -> None:
    """Reached the real destination, untouched (the peer's socket saw its own address)."""
    assert_landed(landing, "peer", port)
    assert landing.local == fmt_addr(dst, port), landing.where


# --------------------------------------------------------------------------- 1. standard


@dataclass
class StandardPod:
    topo: Topology
    fam: Family
    backend: str


@pytest.fixture(
    params=[(b, f) for b in BACKENDS for f in FAMILIES], ids=lambda p: f"{p[0]}-{p[1].name}"
)
def standard_pod(topology: Topology, request: pytest.FixtureRequest) -> StandardPod:
    """The injector's default arguments applied with a forced backend, all listeners up."""
    backend, fam = request.param
    apply_rules(topology, fam, istio_flags(), backend=backend)
    start_listeners(topology)
    return StandardPod(topology, fam, backend)


def test_standard_rules_are_in_the_forced_backend(standard_pod: StandardPod) -> None:
    topo, fam, backend = standard_pod.topo, standard_pod.fam, standard_pod.backend
    binary = "ip6tables" if fam.version == 6 else "iptables"
    if backend == "native-nftables":
        tables = topo.exec(topo.pod_ns, ["nft", "list", "tables"], check=True).stdout
        assert "table inet istio-proxy-nat" in tables
        for variant in ("nft", "legacy"):
            saved = topo.exec(topo.pod_ns, [f"{binary}-{variant}-save", "-t", "nat"]).stdout
            assert "ISTIO_OUTPUT" not in saved
        return
    other = "legacy" if backend == "nft" else "nft"
    used = topo.exec(topo.pod_ns, [f"{binary}-{backend}-save", "-t", "nat"], check=True)
    assert "-A ISTIO_OUTPUT" in used.stdout
    unused = topo.exec(topo.pod_ns, [f"{binary}-{other}-save", "-t", "nat"])
    assert "ISTIO_OUTPUT" not in unused.stdout


def test_standard_app_outbound_is_captured(standard_pod: StandardPod) -> None:
    topo, fam = standard_pod.topo, standard_pod.fam
    landing = app_probe(topo, fam.peer, 80)
    assert_captured_outbound(landing, fam, fam.peer, 80)
    assert landing.peer_ip == fam.pod


def test_standard_proxy_uid_outbound_goes_direct(standard_pod: StandardPod) -> None:
    topo, fam = standard_pod.topo, standard_pod.fam
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)  # control
    landing = topo.probe(topo.pod_ns, fam.peer, 80, uid=PROXY_UID, gid=PROXY_UID)
    assert_direct(landing, fam.peer, 80)
    assert landing.peer_ip == fam.pod


def test_standard_proxy_gid_outbound_goes_direct(standard_pod: StandardPod) -> None:
    topo, fam = standard_pod.topo, standard_pod.fam
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)  # control
    landing = app_probe(topo, fam.peer, 80, gid=PROXY_UID)
    assert_direct(landing, fam.peer, 80)


def test_standard_inbound_is_captured(standard_pod: StandardPod) -> None:
    topo, fam = standard_pod.topo, standard_pod.fam
    landing = topo.probe(topo.peer_ns, fam.pod, 8080)
    assert_landed(landing, "proxy", INBOUND_PORT, orig_dst=fam.addr(fam.pod, 8080), peer=fam.peer)
    assert landing.orig_dst_via == "so_original_dst"


def test_standard_inbound_excluded_ports_reach_admin(standard_pod: StandardPod) -> None:
    topo, fam = standard_pod.topo, standard_pod.fam
    for port in ADMIN_PORTS:
        landing = topo.probe(topo.peer_ns, fam.pod, port)
        assert_landed(landing, "admin", port, orig_dst=fam.addr(fam.pod, port), peer=fam.peer)


def test_standard_app_to_localhost_is_not_captured(standard_pod: StandardPod) -> None:
    topo, fam = standard_pod.topo, standard_pod.fam
    landing = app_probe(topo, fam.loopback, 8080)
    assert_landed(landing, "app", 8080, orig_dst=fam.addr(fam.loopback, 8080))


def test_standard_inbound_passthrough_source_is_not_recaptured(standard_pod: StandardPod) -> None:
    """The proxy's passthrough connections come from 127.0.0.6 / ::6: they reach the app."""
    topo, fam = standard_pod.topo, standard_pod.fam
    landing = topo.probe(
        topo.pod_ns, fam.pod, 8080, uid=PROXY_UID, gid=PROXY_UID, src=fam.inbound_passthrough
    )
    assert_landed(landing, "app", 8080, orig_dst=fam.addr(fam.pod, 8080))


def test_standard_proxy_to_localhost_is_not_captured(standard_pod: StandardPod) -> None:
    """issue 17: on nft, `ip daddr != 127.0.0.1/32` does not match ::1 (implied nfproto)."""
    topo, fam = standard_pod.topo, standard_pod.fam
    landing = topo.probe(topo.pod_ns, fam.loopback, 8080, uid=PROXY_UID, gid=PROXY_UID)
    assert_landed(landing, "app", 8080, orig_dst=fam.addr(fam.loopback, 8080))


def test_standard_proxy_to_own_pod_ip_goes_through_inbound(standard_pod: StandardPod) -> None:
    topo, fam = standard_pod.topo, standard_pod.fam
    landing = topo.probe(topo.pod_ns, fam.pod, 8080, uid=PROXY_UID, gid=PROXY_UID)
    assert_landed(landing, "proxy", INBOUND_PORT, orig_dst=fam.addr(fam.pod, 8080))


# --------------------------------------------------------------------------- 2. flags


@pytest.fixture
def pod(topology: Topology) -> Callable[..., Topology]:
    """Apply flags to the plain topology and start every listener; returns the topology."""

    def setup(
        fam: Family,
        flags: Sequence[str],
        env: Mapping[str, str] | None = None,
        engine: str | None = None,
    ) -> Topology:
        apply_rules(topology, fam, flags, env, backend=engine)
        start_listeners(topology)
        return topology

    return setup


@family_param
def test_outbound_ports_include_captures_only_that_port(
    pod: Callable[..., Topology], fam: Family
) -> None:
    topo = pod(fam, istio_flags(i="", q="443"))
    assert_captured_outbound(app_probe(topo, fam.peer, 443), fam, fam.peer, 443)
    assert_direct(app_probe(topo, fam.peer, 80), fam.peer, 80)


@family_param
def test_outbound_port_exclude_goes_direct(pod: Callable[..., Topology], fam: Family) -> None:
    topo = pod(fam, istio_flags(o="443"))
    assert_direct(app_probe(topo, fam.peer, 443), fam.peer, 443)
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)


def second_link_pod(
    make_topology: Callable[..., Topology],
    fam: Family,
    flags: Sequence[str],
    env: Mapping[str, str] | None = None,
    engine: str | None = None,
) -> Topology:
    """Pod with eth1 to the peer too: peer2 is a second destination (another subnet)."""
    topo = make_topology(second_link="peer")
    apply_rules(topo, fam, flags, env, backend=engine)
    start_listeners(topo)
    return topo


# A second, unrelated CIDR in each list, so the lists (and --cidr-sets' sets) have two members.
OTHER_CIDR = {4: "192.0.2.128/25", 6: "2001:db8:ff::/48"}
# Istio's one rule per CIDR, the same lists as one set (ipset), and as a named nft set.
cidr_param = pytest.mark.parametrize(
    ("extra", "engine"),
    [([], None), (["--cidr-sets"], None), (["--cidr-sets"], "native-nftables")],
    ids=["rules", "ipset", "nft-set"],
)


def second_cidr(fam: Family) -> str:
    return "2001:db8:1::/64" if fam.version == 6 else "198.51.100.0/24"


@family_param
@cidr_param
def test_service_cidr_captures_only_that_cidr(
    make_topology: Callable[..., Topology], fam: Family, extra: list[str], engine: str | None
) -> None:
    flags = [*istio_flags(i=f"{second_cidr(fam)},{OTHER_CIDR[fam.version]}"), *extra]
    topo = second_link_pod(make_topology, fam, flags, engine=engine)
    assert_captured_outbound(app_probe(topo, fam.peer2, 80), fam, fam.peer2, 80)
    assert_direct(app_probe(topo, fam.peer, 80), fam.peer, 80)


@family_param
@cidr_param
def test_service_exclude_cidr_goes_direct(
    make_topology: Callable[..., Topology], fam: Family, extra: list[str], engine: str | None
) -> None:
    flags = [*istio_flags(x=f"{second_cidr(fam)},{OTHER_CIDR[fam.version]}"), *extra]
    topo = second_link_pod(make_topology, fam, flags, engine=engine)
    assert_direct(app_probe(topo, fam.peer2, 80), fam.peer2, 80)
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)


def assert_inbound_captured(topo: Topology, fam: Family, port: int) -> None:
    landing = topo.probe(topo.peer_ns, fam.pod, port)
    assert_landed(landing, "proxy", INBOUND_PORT, orig_dst=fam.addr(fam.pod, port), peer=fam.peer)


def assert_inbound_reaches_app(topo: Topology, fam: Family, port: int) -> None:
    landing = topo.probe(topo.peer_ns, fam.pod, port)
    assert_landed(landing, "app", port, orig_dst=fam.addr(fam.pod, port), peer=fam.peer)


@engine_param
def test_ipv4_detection_leaves_ipv6_uncaptured(topology: Topology, engine: str | None) -> None:
    """Without --dual-stack, Istio's detection (run inside the pod namespace) sees an IPv4
    first address: IPv6 is off, and no IPv6 connection is captured, on either backend (nft
    mode's `meta nfproto ipv6 return` guards). IPv4 stays captured."""
    v4, v6 = FAMILIES
    apply_rules(topology, v4, istio_flags(), backend=engine)
    start_listeners(topology)
    assert_captured_outbound(app_probe(topology, v4.peer, 80), v4, v4.peer, 80)
    assert_inbound_captured(topology, v4, 8080)
    assert_direct(app_probe(topology, v6.peer, 80), v6.peer, 80)
    assert_direct(app_probe(topology, v6.peer, 53, proto="udp"), v6.peer, 53)
    assert_inbound_reaches_app(topology, v6, 8080)
    for dst in (v6.pod, v6.loopback):  # the proxy's and the app's own-pod connections too
        for uid in (PROXY_UID, APP_UID):
            landing = topology.probe(topology.pod_ns, dst, 8080, uid=uid, gid=uid)
            assert_landed(landing, "app", 8080, orig_dst=v6.addr(dst, 8080))


@family_param
def test_inbound_ports_list_captures_only_listed_ports(
    pod: Callable[..., Topology], fam: Family
) -> None:
    topo = pod(fam, istio_flags(b="8080", d=None))
    assert_inbound_captured(topo, fam, 8080)
    assert_inbound_reaches_app(topo, fam, 9090)


@family_param
def test_inbound_ports_list_ignores_local_exclude_ports(
    pod: Callable[..., Topology], fam: Family
) -> None:
    """-d only applies with -b '*' (Istio quirk kept): 8080 stays captured."""
    topo = pod(fam, istio_flags(b="8080", d="8080"))
    assert_inbound_captured(topo, fam, 8080)
    assert_inbound_reaches_app(topo, fam, 9090)


@family_param
def test_inbound_local_exclude_port_is_not_captured(
    pod: Callable[..., Topology], fam: Family
) -> None:
    topo = pod(fam, istio_flags(b="*", d="9090"))
    assert_inbound_reaches_app(topo, fam, 9090)
    assert_inbound_captured(topo, fam, 8080)


@family_param
def test_empty_inbound_ports_capture_no_inbound(pod: Callable[..., Topology], fam: Family) -> None:
    topo = pod(fam, istio_flags(b=""))
    assert_inbound_reaches_app(topo, fam, 8080)
    assert_inbound_reaches_app(topo, fam, 9090)
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)


@family_param
def test_empty_service_cidr_captures_no_outbound(pod: Callable[..., Topology], fam: Family) -> None:
    topo = pod(fam, istio_flags(i=""))
    assert_direct(app_probe(topo, fam.peer, 80), fam.peer, 80)
    assert_direct(app_probe(topo, fam.peer, 443), fam.peer, 443)
    assert_inbound_captured(topo, fam, 8080)


@family_param
def test_proxy_gid_flag_excludes_that_gid(pod: Callable[..., Topology], fam: Family) -> None:
    topo = pod(fam, istio_flags(g="2000"))
    assert_direct(app_probe(topo, fam.peer, 80, gid=2000), fam.peer, 80)
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)
    # -g replaces the default (= the uid string): gid 1337 alone is now captured...
    assert_captured_outbound(app_probe(topo, fam.peer, 80, gid=PROXY_UID), fam, fam.peer, 80)
    # ...while uid 1337 is still excluded.
    landing = topo.probe(topo.pod_ns, fam.peer, 80, uid=PROXY_UID, gid=2000)
    assert_direct(landing, fam.peer, 80)


@family_param
def test_every_proxy_uid_goes_direct(pod: Callable[..., Topology], fam: Family) -> None:
    topo = pod(fam, istio_flags(u="1337,1500", g="1337,1500"))
    for uid in (PROXY_UID, 1500):
        assert_direct(topo.probe(topo.pod_ns, fam.peer, 80, uid=uid, gid=uid), fam.peer, 80)
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)


@family_param
def test_inbound_tunnel_port_is_never_captured(topology: Topology, fam: Family) -> None:
    apply_rules(topology, fam, istio_flags())
    start_listeners(topology)
    topology.start_listeners(topology.pod_ns, "tunnel", [15008])
    landing = topology.probe(topology.peer_ns, fam.pod, 15008)
    assert_landed(landing, "tunnel", 15008, orig_dst=fam.addr(fam.pod, 15008), peer=fam.peer)
    # Nor is the proxy's own connection to it sent back through inbound capture.
    landing = topology.probe(topology.pod_ns, fam.pod, 15008, uid=PROXY_UID, gid=PROXY_UID)
    assert_landed(landing, "tunnel", 15008, orig_dst=fam.addr(fam.pod, 15008))


@family_param
def test_owner_groups_include_captures_only_those_groups(
    pod: Callable[..., Topology], fam: Family
) -> None:
    topo = pod(fam, istio_flags(), env={"ISTIO_OUTBOUND_OWNER_GROUPS": "3000"})
    assert_captured_outbound(app_probe(topo, fam.peer, 80, gid=3000), fam, fam.peer, 80)
    assert_direct(app_probe(topo, fam.peer, 80), fam.peer, 80)


@family_param
def test_owner_groups_exclude_skips_those_groups(pod: Callable[..., Topology], fam: Family) -> None:
    topo = pod(fam, istio_flags(), env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "3000"})
    assert_direct(app_probe(topo, fam.peer, 80, gid=3000), fam.peer, 80)
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)


@family_param
def test_empty_owner_groups_capture_nothing(pod: Callable[..., Topology], fam: Family) -> None:
    """ISTIO_OUTBOUND_OWNER_GROUPS="" is an include list of zero groups (Istio quirk)."""
    topo = pod(fam, istio_flags(), env={"ISTIO_OUTBOUND_OWNER_GROUPS": ""})
    assert_direct(app_probe(topo, fam.peer, 80), fam.peer, 80)
    assert_inbound_captured(topo, fam, 8080)


@family_param
def test_exclude_interface_is_not_captured_either_way(
    make_topology: Callable[..., Topology], fam: Family
) -> None:
    topo = second_link_pod(make_topology, fam, istio_flags(c="eth1"))
    # Outbound leaving on eth1 goes direct; via eth0 it is still captured.
    assert_direct(app_probe(topo, fam.peer2, 80), fam.peer2, 80)
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)
    # Inbound arriving on eth1 reaches the app; via eth0 it is still captured.
    landing = topo.probe(topo.peer_ns, fam.pod2, 8080)
    assert_landed(landing, "app", 8080, orig_dst=fam.addr(fam.pod2, 8080), peer=fam.peer2)
    assert_inbound_captured(topo, fam, 8080)


@family_param
def test_kube_virt_interface_traffic_is_treated_as_outbound(
    make_topology: Callable[..., Topology], fam: Family
) -> None:
    """A VM behind eth1 (the third namespace) talks to the peer network through the pod:
    its connections are redirected to the outbound port, even those to the pod itself."""
    topo = make_topology(second_link="third")
    ipf = "-6" if fam.version == 6 else "-4"
    peer_net = "2001:db8::/64" if fam.version == 6 else "192.0.2.0/24"
    route = ["ip", ipf, "route", "add", peer_net, "via", fam.pod2]
    topo.exec(topo.third_ns, route, check=True)
    apply_rules(topo, fam, istio_flags(k="eth1"))
    start_listeners(topo)

    landing = topo.probe(topo.third_ns, fam.peer, 80)
    assert_landed(landing, "proxy", OUTBOUND_PORT, orig_dst=fam.addr(fam.peer, 80), peer=fam.peer2)
    landing = topo.probe(topo.third_ns, fam.pod2, 8080)
    assert_landed(
        landing, "proxy", OUTBOUND_PORT, orig_dst=fam.addr(fam.pod2, 8080), peer=fam.peer2
    )
    # eth0 is not a virt interface: inbound there is still inbound.
    assert_inbound_captured(topo, fam, 8080)


# --------------------------------------------------------------------------- 3. DNS


@family_param
@engine_param
def test_capture_all_dns_redirects_udp_and_tcp_to_dns_port(
    pod: Callable[..., Topology], fam: Family, engine: str | None
) -> None:
    topo = pod(fam, [*istio_flags(), "--redirect-dns", "--capture-all-dns"], engine=engine)
    for proto in ("udp", "tcp"):
        landing = app_probe(topo, fam.peer, 53, proto=proto)
        assert_landed(landing, "dns", DNS_PORT, peer=fam.pod)
        assert landing.local == fam.addr(fam.loopback, DNS_PORT), landing.where
    # TCP keeps the original destination for the proxy (UDP has no SO_ORIGINAL_DST).
    assert app_probe(topo, fam.peer, 53, proto="tcp").orig_dst == fam.addr(fam.peer, 53)


@family_param
@engine_param
def test_capture_all_dns_lets_the_proxys_own_queries_out(
    pod: Callable[..., Topology], fam: Family, engine: str | None
) -> None:
    topo = pod(fam, [*istio_flags(), "--redirect-dns", "--capture-all-dns"], engine=engine)
    assert_landed(app_probe(topo, fam.peer, 53, proto="udp"), "dns", DNS_PORT)  # control
    for proto in ("udp", "tcp"):
        landing = topo.probe(topo.pod_ns, fam.peer, 53, proto=proto, uid=PROXY_UID, gid=PROXY_UID)
        assert_direct(landing, fam.peer, 53)
        assert landing.peer_ip == fam.pod


@family_param
def test_dns_servers_captures_only_dns_to_those_servers(
    make_topology: Callable[..., Topology], fam: Family
) -> None:
    flags = [*istio_flags(), "--redirect-dns", "--dns-servers", fam.peer]
    topo = second_link_pod(make_topology, fam, flags)
    for proto in ("udp", "tcp"):
        assert_landed(app_probe(topo, fam.peer, 53, proto=proto), "dns", DNS_PORT)
    # Another resolver: UDP goes out untouched, TCP is ordinary outbound (-i '*').
    assert_direct(app_probe(topo, fam.peer2, 53, proto="udp"), fam.peer2, 53)
    assert_captured_outbound(app_probe(topo, fam.peer2, 53), fam, fam.peer2, 53)


# --------------------------------------------------------------------------- 4. invalid


# Sends one bare FIN (no ACK: conntrack classifies it INVALID) from a raw socket and
# reports whether the target answered with a RST (it does for a closed port).
FIN_PROBE = r"""
import os, select, socket, struct, sys, time
src, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])
v6 = ":" in dst
fam = socket.AF_INET6 if v6 else socket.AF_INET
sport = 20000 + os.getpid() % 20000
def csum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
seg = struct.pack("!HHIIBBHHH", sport, dport, 4242, 0, 5 << 4, 0x01, 65535, 0, 0)
addrs = socket.inet_pton(fam, src) + socket.inet_pton(fam, dst)
pseudo = addrs + (struct.pack("!I3xB", len(seg), 6) if v6 else struct.pack("!xBH", 6, len(seg)))
seg = seg[:16] + struct.pack("!H", csum(pseudo + seg)) + seg[18:]
with socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_TCP) as sock:
    sock.bind((src, 0))
    sock.sendto(seg, (dst, 0))
    deadline = time.monotonic() + float(sys.argv[4])
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data = sock.recv(65535)
        tcp = data if v6 else data[(data[0] & 0x0F) * 4:]
        ports = struct.unpack("!HH", tcp[:4])
        if ports == (dport, sport) and tcp[13] & 0x04:
            print("RST")
            sys.exit(0)
print("none")
"""


def send_invalid_fin(topo: Topology, fam: Family, port: int, wait: float) -> bool:
    """True when the pod answered our INVALID FIN with a RST."""
    check_probe_target(fam.pod)
    argv = [PYTHON, "-c", FIN_PROBE, fam.peer, fam.pod, str(port), str(wait)]
    result = topo.exec(topo.peer_ns, argv, check=True)
    return result.stdout.strip() == "RST"


def drop_counter(topo: Topology, fam: Family) -> int:
    """Packets the drop rule dropped, from whichever backend holds it (nft tables first)."""
    listing = topo.exec(
        topo.pod_ns, ["nft", "list", "chain", "inet", "istio-proxy-mangle", "istio-drop"]
    ).stdout
    counted = re.search(r"counter packets (\d+) bytes \d+ drop", listing)
    if counted:
        return int(counted.group(1))
    binary = "ip6tables" if fam.version == 6 else "iptables"
    for variant in ("nft", "legacy"):
        argv = [f"{binary}-{variant}-save", "-c", "-t", "mangle"]
        saved = topo.exec(topo.pod_ns, argv).stdout
        match = re.search(r"^\[(\d+):\d+\] -A ISTIO_DROP -j DROP$", saved, re.MULTILINE)
        if match:
            return int(match.group(1))
    raise AssertionError("no ISTIO_DROP rule in either backend")


@family_param
@engine_param
def test_drop_invalid_keeps_normal_traffic_working(
    pod: Callable[..., Topology], fam: Family, engine: str | None
) -> None:
    topo = pod(fam, [*istio_flags(), "--drop-invalid"], engine=engine)
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)
    assert_inbound_captured(topo, fam, 8080)
    landing = topo.probe(topo.pod_ns, fam.peer, 80, uid=PROXY_UID, gid=PROXY_UID)
    assert_direct(landing, fam.peer, 80)
    assert_landed(app_probe(topo, fam.loopback, 8080), "app", 8080)
    drop_counter(topo, fam)  # the rule is in place


@family_param
@engine_param
def test_drop_invalid_drops_a_packet_conntrack_calls_invalid(
    topology: Topology, fam: Family, engine: str | None
) -> None:
    closed_port = 9999
    # Control: without the rules, the pod's stack answers the stray FIN with a RST.
    assert send_invalid_fin(topology, fam, closed_port, wait=2.0)
    apply_rules(topology, fam, [*istio_flags(), "--drop-invalid"], backend=engine)
    dropped_before = drop_counter(topology, fam)
    assert not send_invalid_fin(topology, fam, closed_port, wait=0.5)
    assert drop_counter(topology, fam) > dropped_before


# --------------------------------------------------------------------------- 5. TPROXY


def ip_rules(topo: Topology, fam: Family) -> str:
    ipf = "-6" if fam.version == 6 else "-4"
    return topo.exec(topo.pod_ns, ["ip", ipf, "rule", "show"], check=True).stdout


def ip_routes(topo: Topology, fam: Family, table: int) -> str:
    ipf = "-6" if fam.version == 6 else "-4"
    argv = ["ip", ipf, "route", "show", "table", str(table)]
    return topo.exec(topo.pod_ns, argv, check=True).stdout


def has_rule(rules: str, mark: int, table: int) -> bool:
    pattern = rf"^\d+:\s+from all fwmark {mark:#x} lookup {table}\s*$"
    return re.search(pattern, rules, re.MULTILINE) is not None


def has_local_default(routes: str) -> bool:
    return re.search(r"^local default dev lo\b", routes, re.MULTILINE) is not None


def tproxy_pod(topo: Topology, fam: Family, *extra: str, engine: str | None = None) -> Topology:
    apply_rules(topo, fam, [*istio_flags(m="TPROXY"), *extra], backend=engine)
    start_listeners(topo, tproxy=True)
    return topo


def assert_tproxied(topo: Topology, fam: Family, port: int) -> None:
    """peer -> pod:port arrives at the transparent listener, addresses untouched."""
    landing = topo.probe(topo.peer_ns, fam.pod, port)
    assert_landed(landing, "proxy", INBOUND_PORT, orig_dst=fam.addr(fam.pod, port), peer=fam.peer)
    # Not NATed: the accepted socket's own address is the original destination (with
    # REDIRECT it would be :15006). SO_ORIGINAL_DST works too (the nat table is loaded).
    assert landing.local == fam.addr(fam.pod, port), landing.where


@family_param
@engine_param
def test_tproxy_inbound_preserves_the_peer_address(
    topology: Topology, fam: Family, engine: str | None
) -> None:
    topo = tproxy_pod(topology, fam, engine=engine)
    assert_tproxied(topo, fam, 8080)
    assert_tproxied(topo, fam, 9090)


@family_param
@engine_param
def test_tproxy_excluded_inbound_port_reaches_admin(
    topology: Topology, fam: Family, engine: str | None
) -> None:
    topo = tproxy_pod(topology, fam, engine=engine)
    landing = topo.probe(topo.peer_ns, fam.pod, 15021)
    assert_landed(landing, "admin", 15021, orig_dst=fam.addr(fam.pod, 15021), peer=fam.peer)
    assert landing.local == fam.addr(fam.pod, 15021), landing.where
    assert_tproxied(topo, fam, 8080)  # control: other ports are diverted


@family_param
@engine_param
def test_tproxy_installs_policy_route(topology: Topology, fam: Family, engine: str | None) -> None:
    topo = tproxy_pod(topology, fam, engine=engine)
    assert has_rule(ip_rules(topo, fam), 1337, 133), ip_rules(topo, fam)
    assert has_local_default(ip_routes(topo, fam, 133)), ip_routes(topo, fam, 133)
    if fam.version == 6:  # the inbound passthrough source address (Istio's ConfigureRoutes)
        lo = topo.exec(topo.pod_ns, ["ip", "-6", "addr", "show", "dev", "lo"], check=True)
        assert "inet6 ::6/128" in lo.stdout, lo.stdout


@family_param
@engine_param
def test_tproxy_outbound_still_captured(
    topology: Topology, fam: Family, engine: str | None
) -> None:
    topo = tproxy_pod(topology, fam, engine=engine)
    assert_captured_outbound(app_probe(topo, fam.peer, 80), fam, fam.peer, 80)
    landing = topo.probe(topo.pod_ns, fam.peer, 80, uid=PROXY_UID, gid=PROXY_UID)
    assert_direct(landing, fam.peer, 80)


@family_param
def test_tproxy_custom_mark_and_route_table(topology: Topology, fam: Family) -> None:
    topo = tproxy_pod(topology, fam, "-t", "1400", "-r", "140")
    rules = ip_rules(topo, fam)
    assert has_rule(rules, 1400, 140), rules
    assert not has_rule(rules, 1337, 133), rules
    assert has_local_default(ip_routes(topo, fam, 140)), ip_routes(topo, fam, 140)
    ipf = "-6" if fam.version == 6 else "-4"
    default_table = topo.exec(topo.pod_ns, ["ip", ipf, "route", "show", "table", "133"])
    assert not has_local_default(default_table.stdout), default_table.stdout
    assert_tproxied(topo, fam, 8080)
