"""plan(options) -> Ruleset: Istio's rule algorithm, pure and deterministic.

The algorithm is IptablesConfigurator.Run in `tools/istio-iptables/pkg/capture/run.go`.
Each step of the algorithm is one small function named for what it does, called in Istio's
order; the order decides the restore text byte for byte, so do not reorder them. Every rule
carries a short reason, shown by `--output-format json` and `explain`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshnet.model import FAMILIES, Family, IpSet, Rule, Ruleset
from meshnet.options import Options

LB6 = "::1/128"
DNS_PORT = "53"
DNS_PROXY_PORT = "15053"
OUTBOUND_MARK = "1338"  # constants.OutboundMark, hard-coded in Istio

# Istio's chain names.
INBOUND = "ISTIO_INBOUND"
REDIRECT = "ISTIO_REDIRECT"
IN_REDIRECT = "ISTIO_IN_REDIRECT"
OUTPUT = "ISTIO_OUTPUT"
OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
DIVERT = "ISTIO_DIVERT"
TPROXY = "ISTIO_TPROXY"
DROP = "ISTIO_DROP"


@dataclass(slots=True)
class _Builder:
    """Istio's iptables builder: two ordered lists; v6 rules only exist when IPv6 is on."""

    ipv6: bool
    v4: list[Rule] = field(default_factory=list)
    v6: list[Rule] = field(default_factory=list)

    def v4_rule(
        self, table: str, chain: str, spec: Sequence[str], why: str, at: int | None = None
    ) -> None:
        self.v4.append(Rule(table, chain, tuple(spec), why, at))

    def v6_rule(
        self, table: str, chain: str, spec: Sequence[str], why: str, at: int | None = None
    ) -> None:
        if self.ipv6:
            self.v6.append(Rule(table, chain, tuple(spec), why, at))

    def both(
        self, table: str, chain: str, spec: Sequence[str], why: str, at: int | None = None
    ) -> None:
        self.v4_rule(table, chain, spec, why, at)
        self.v6_rule(table, chain, spec, why, at)

    def versioned(
        self, table: str, chain: str, v4: Sequence[str], v6: Sequence[str], why: str
    ) -> None:
        self.v4_rule(table, chain, v4, why)
        self.v6_rule(table, chain, v6, why)


@dataclass(frozen=True, slots=True)
class _Context:
    """Values derived once before the steps run: DNS redirection and the IPv4 loopback CIDR."""

    o: Options
    redirect_dns: bool
    lb4: str

    @property
    def tunnel(self) -> str:
        return str(self.o.inbound_tunnel_port)


def plan(options: Options) -> Ruleset:
    """Plan Istio's rules for these options."""
    ctx, warnings = _preprocess(options)
    b = _Builder(ipv6=options.enable_ipv6)
    for step in _STEPS:
        step(b, ctx)
    return Ruleset(tuple(b.v4), tuple(b.v6), options.enable_ipv6, warnings, ipsets(options))


def ipsets(o: Options) -> tuple[IpSet, ...]:
    """--cidr-sets: one set per CIDR list and family (none without the flag: Istio's rules)."""
    if not o.cidr_sets:
        return ()
    found: list[IpSet] = []
    for kind, cidrs in (("exclude", o.service_exclude_cidr), ("include", o.service_cidr)):
        for family in FAMILIES:
            items = cidrs.v6 if family == "ipv6" else cidrs.v4
            if items and (family == "ipv4" or o.enable_ipv6):
                found.append(IpSet(set_name(kind, family), family, _set_members(items)))
    return tuple(found)


def set_name(kind: str, family: Family) -> str:
    return f"meshnet-{kind}-{'v6' if family == 'ipv6' else 'v4'}"


def _set_members(cidrs: tuple[str, ...]) -> tuple[str, ...]:
    """Networks as the kernel stores them; hash:net cannot hold /0, so it becomes two /1s."""
    members: list[str] = []
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr, strict=False)
        members += [str(n) for n in network.subnets()] if network.prefixlen == 0 else [str(network)]
    return tuple(dict.fromkeys(members))


def _destinations(c: _Context, kind: str, family: Family) -> list[tuple[tuple[str, ...], str]]:
    """The `-d` matches of a CIDR list: one per CIDR (Istio), or one set match (--cidr-sets)."""
    cidrs = c.o.service_exclude_cidr if kind == "exclude" else c.o.service_cidr
    items = cidrs.v6 if family == "ipv6" else cidrs.v4
    if c.o.cidr_sets and items:
        name = set_name(kind, family)
        return [(("-m", "set", "--match-set", name, "dst"), f"set {name}")]
    return [(("-d", cidr), cidr) for cidr in items]


def _preprocess(o: Options) -> tuple[_Context, tuple[str, ...]]:
    redirect_dns = o.redirect_dns
    warnings: tuple[str, ...] = ()
    if redirect_dns and not o.capture_all_dns and not (o.dns_servers_v4 or o.dns_servers_v6):
        redirect_dns = False
        warnings = (
            "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is false, and no DNS servers provided. "
            "DNS capture disabled.",
        )
    return _Context(o, redirect_dns, o.ipv4_loopback_cidr), warnings


def _exclude_interfaces(b: _Builder, c: _Context) -> None:
    """A: traffic on excluded NICs is never captured, in either direction."""
    why = "interface excluded by -c: never captured"
    tables = ("nat", "mangle") if c.o.tproxy else ("nat",)
    for table in tables:
        for nic in c.o.exclude_interfaces:
            b.both(table, "PREROUTING", ("-i", nic, "-j", "RETURN"), why)
            b.both(table, "OUTPUT", ("-o", nic, "-j", "RETURN"), why)


def _kube_virt_interfaces(b: _Builder, c: _Context) -> None:
    """B: traffic from KubeVirt interfaces skips inbound capture (it is handled as outbound)."""
    for nic in c.o.kube_virt_interfaces:
        b.both(
            "nat",
            "PREROUTING",
            ("-i", nic, "-j", "RETURN"),
            "virtual interface (-k): not inbound traffic",
            at=1,
        )


def _drop_invalid(b: _Builder, c: _Context) -> None:
    """C: drop packets conntrack cannot place (they would bypass the NAT of their flow)."""
    if c.o.drop_invalid:
        b.both(
            "mangle",
            "PREROUTING",
            ("-m", "conntrack", "--ctstate", "INVALID", "-j", DROP),
            "--drop-invalid: conntrack state INVALID is dropped",
        )
        b.both("mangle", DROP, ("-j", "DROP"), "--drop-invalid: the drop itself")


def _base_chains(b: _Builder, c: _Context) -> None:
    """D-F: the tunnel port is never captured inbound; the two REDIRECT targets."""
    b.both(
        "nat",
        INBOUND,
        ("-p", "tcp", "--dport", c.tunnel, "-j", "RETURN"),
        "inbound tunnel port (-e) is never captured",
    )
    b.both(
        "nat",
        REDIRECT,
        ("-p", "tcp", "-j", "REDIRECT", "--to-ports", str(c.o.proxy_port)),
        "outbound capture: send to the proxy's outbound port (-p)",
    )
    b.both(
        "nat",
        IN_REDIRECT,
        ("-p", "tcp", "-j", "REDIRECT", "--to-ports", str(c.o.inbound_capture_port)),
        "inbound capture: send to the proxy's inbound port (-z)",
    )


def _inbound(b: _Builder, c: _Context) -> None:
    """G: inbound capture of the -b ports, by REDIRECT (nat) or TPROXY (mangle)."""
    o = c.o
    if o.inbound_ports.empty:
        return
    table = "nat"
    if o.tproxy:
        _tproxy_chains(b, c)
        table = "mangle"
    b.both(table, "PREROUTING", ("-p", "tcp", "-j", INBOUND), "inbound TCP enters ISTIO_INBOUND")
    if o.inbound_ports.wildcard:
        for port in o.local_exclude_ports:
            b.both(
                table,
                INBOUND,
                ("-p", "tcp", "--dport", str(port), "-j", "RETURN"),
                "inbound port excluded by -d",
            )
        _capture_inbound(b, c, ())
    else:
        for included in o.inbound_ports.items:
            _capture_inbound(b, c, ("--dport", included))


def _tproxy_chains(b: _Builder, c: _Context) -> None:
    mark = str(c.o.tproxy_mark)
    b.both(
        "mangle",
        DIVERT,
        ("-j", "MARK", "--set-mark", mark),
        "TPROXY: mark packets of established inbound flows",
    )
    b.both("mangle", DIVERT, ("-j", "ACCEPT"), "TPROXY: established inbound flows pass")
    tproxy = (
        "-p",
        "tcp",
        "-j",
        "TPROXY",
        "--tproxy-mark",
        f"{mark}/0xffffffff",
        "--on-port",
        str(c.o.inbound_capture_port),
    )
    b.versioned(
        "mangle",
        TPROXY,
        ("!", "-d", c.lb4, *tproxy),
        ("!", "-d", LB6, *tproxy),
        "TPROXY: deliver inbound TCP to the proxy's inbound port, source kept",
    )


def _capture_inbound(b: _Builder, c: _Context, port: tuple[str, ...]) -> None:
    which = f"port {port[1]}" if port else "every port"
    if c.o.tproxy:
        b.both(
            "mangle",
            INBOUND,
            (
                "-p",
                "tcp",
                *port,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                DIVERT,
            ),
            f"TPROXY: established inbound flow on {which} is marked",
        )
        b.both(
            "mangle",
            INBOUND,
            ("-p", "tcp", *port, "-j", TPROXY),
            f"TPROXY: new inbound connection on {which} is captured",
        )
    else:
        b.both(
            "nat",
            INBOUND,
            ("-p", "tcp", *port, "-j", IN_REDIRECT),
            f"inbound TCP on {which} is captured",
        )


def _output_jump(b: _Builder, c: _Context) -> None:
    """H: all locally generated traffic enters ISTIO_OUTPUT (UDP is filtered inside)."""
    b.both("nat", "OUTPUT", ("-j", OUTPUT), "locally generated traffic enters ISTIO_OUTPUT")


def _outbound_port_excludes(b: _Builder, c: _Context) -> None:
    """I: -o ports are never captured, TCP or UDP."""
    for port in c.o.outbound_ports_exclude:
        for proto in ("tcp", "udp"):
            b.both(
                "nat",
                OUTPUT,
                ("-p", proto, "--dport", str(port), "-j", "RETURN"),
                "outbound port excluded by -o",
            )


def _passthrough_source(b: _Builder, c: _Context) -> None:
    """J: the proxy's inbound passthrough source (127.0.0.6 / ::6) is never recaptured."""
    b.versioned(
        "nat",
        OUTPUT,
        ("-o", "lo", "-s", "127.0.0.6/32", "-j", "RETURN"),
        ("-o", "lo", "-s", "::6/128", "-j", "RETURN"),
        "inbound passthrough traffic from the proxy (source 127.0.0.6/::6)",
    )


def _proxy_owners(b: _Builder, c: _Context) -> None:
    """K-L: the proxy's own traffic is not captured, except to the pod's own IP (goes inbound)."""
    for uid in c.o.proxy_uids:
        _owner_rules(b, c, "--uid-owner", uid, multiport_dns=c.redirect_dns)
    for gid in c.o.proxy_gids:
        # Istio's GID rule never takes the DNS/multiport form: kept, the goldens show it.
        _owner_rules(b, c, "--gid-owner", gid, multiport_dns=False)


def _owner_rules(b: _Builder, c: _Context, match: str, owner: str, multiport_dns: bool) -> None:
    if multiport_dns:
        ports: tuple[str, ...] = ("-m", "multiport", "!", "--dports", f"{DNS_PORT},{c.tunnel}")
    else:
        ports = ("!", "--dport", c.tunnel)
    tail = ("-p", "tcp", *ports, "-m", "owner", match, owner, "-j", IN_REDIRECT)
    b.versioned(
        "nat",
        OUTPUT,
        ("-o", "lo", "!", "-d", c.lb4, *tail),
        ("-o", "lo", "!", "-d", LB6, *tail),
        f"proxy ({match[2:5]} {owner}) to a local non-loopback address goes inbound",
    )
    if not c.o.service_cidr.has_loopback():
        if c.redirect_dns:
            spec: tuple[str, ...] = (
                "-o",
                "lo",
                "-p",
                "tcp",
                "!",
                "--dport",
                DNS_PORT,
                "-m",
                "owner",
                "!",
                match,
                owner,
                "-j",
                "RETURN",
            )
        else:
            spec = ("-o", "lo", "-m", "owner", "!", match, owner, "-j", "RETURN")
        b.both("nat", OUTPUT, spec, f"app traffic over lo is not captured (not {owner})")
    b.both(
        "nat",
        OUTPUT,
        ("-m", "owner", match, owner, "-j", "RETURN"),
        f"the proxy's own outbound traffic ({match[2:5]} {owner}) is not captured",
    )


def _owner_groups(b: _Builder, c: _Context) -> None:
    """M: ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE) select which groups' traffic is captured."""
    include = c.o.owner_groups_include
    if include.wildcard:
        for gid in c.o.owner_groups_exclude:
            b.both(
                "nat",
                OUTPUT,
                ("-m", "owner", "--gid-owner", gid, "-j", "RETURN"),
                "owner group excluded by ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            )
        return
    spec: list[str] = []
    for gid in include.items:
        spec += ["-m", "owner", "!", "--gid-owner", gid]
    b.both(
        "nat",
        OUTPUT,
        (*spec, "-j", "RETURN"),
        "only groups in ISTIO_OUTBOUND_OWNER_GROUPS are captured",
    )


def _dns(b: _Builder, c: _Context) -> None:
    """N: DNS to the proxy's port 15053, with conntrack zones that keep UDP flows apart."""
    if not c.redirect_dns:
        return
    o = c.o
    b.both("raw", "OUTPUT", ("-j", OUTPUT_DNS), "DNS conntrack zoning")
    why = "DNS traffic is checked for capture"
    if o.capture_all_dns or o.dns_servers_v4:
        b.v4_rule("nat", OUTPUT, ("-j", OUTPUT_DNS), why)
    if o.capture_all_dns or o.dns_servers_v6:
        b.v6_rule("nat", OUTPUT, ("-j", OUTPUT_DNS), why)
    for proto, to in (("tcp", "--to-ports"), ("udp", "--to-port")):  # sic: Istio's spelling
        redirect = ("-j", "REDIRECT", to, DNS_PROXY_PORT)
        if o.capture_all_dns:
            b.both(
                "nat",
                OUTPUT_DNS,
                ("-p", proto, "--dport", DNS_PORT, *redirect),
                f"DNS over {proto} to any server goes to the proxy",
            )
            continue
        for server in o.dns_servers_v4:
            b.v4_rule(
                "nat",
                OUTPUT_DNS,
                ("-p", proto, "--dport", DNS_PORT, "-d", f"{server}/32", *redirect),
                f"DNS over {proto} to {server} goes to the proxy",
            )
        for server in o.dns_servers_v6:
            b.v6_rule(
                "nat",
                OUTPUT_DNS,
                ("-p", proto, "--dport", DNS_PORT, "-d", f"{server}/128", *redirect),
                f"DNS over {proto} to {server} goes to the proxy",
            )
    _dns_zones(b, c)


def _dns_zones(b: _Builder, c: _Context) -> None:
    o = c.o
    owners = [("--uid-owner", u) for u in o.proxy_uids] + [("--gid-owner", g) for g in o.proxy_gids]
    for match, owner in owners:
        b.both(
            "raw",
            OUTPUT_DNS,
            (
                "-p",
                "udp",
                "--dport",
                DNS_PORT,
                "-m",
                "owner",
                match,
                owner,
                "-j",
                "CT",
                "--zone",
                "1",
            ),
            "the proxy's upstream DNS queries use conntrack zone 1",
        )
        b.both(
            "raw",
            OUTPUT_DNS,
            (
                "-p",
                "udp",
                "--sport",
                DNS_PROXY_PORT,
                "-m",
                "owner",
                match,
                owner,
                "-j",
                "CT",
                "--zone",
                "2",
            ),
            "the proxy's DNS answers to the app use conntrack zone 2",
        )
    if o.capture_all_dns:
        b.both("raw", "PREROUTING", ("-j", INBOUND), "DNS answers enter the raw inbound chain")
        b.both(
            "raw",
            OUTPUT_DNS,
            ("-p", "udp", "--dport", DNS_PORT, "-j", "CT", "--zone", "2"),
            "the app's DNS queries use conntrack zone 2",
        )
        b.both(
            "raw",
            INBOUND,
            ("-p", "udp", "--sport", DNS_PORT, "-j", "CT", "--zone", "1"),
            "upstream DNS answers use conntrack zone 1",
        )
        return
    for servers, rule, bits in (
        (o.dns_servers_v4, b.v4_rule, "32"),
        (o.dns_servers_v6, b.v6_rule, "128"),
    ):
        if servers:
            rule("raw", "PREROUTING", ("-j", INBOUND), "DNS answers enter the raw inbound chain")
        for server in servers:
            rule(
                "raw",
                OUTPUT_DNS,
                (
                    "-p",
                    "udp",
                    "--dport",
                    DNS_PORT,
                    "-d",
                    f"{server}/{bits}",
                    "-j",
                    "CT",
                    "--zone",
                    "2",
                ),
                f"the app's DNS queries to {server} use conntrack zone 2",
            )
            rule(
                "raw",
                INBOUND,
                (
                    "-p",
                    "udp",
                    "--sport",
                    DNS_PORT,
                    "-s",
                    f"{server}/{bits}",
                    "-j",
                    "CT",
                    "--zone",
                    "1",
                ),
                f"DNS answers from {server} use conntrack zone 1",
            )


def _loopback_return(b: _Builder, c: _Context) -> None:
    """O: traffic to the loopback address itself is never captured."""
    b.versioned(
        "nat",
        OUTPUT,
        ("-d", c.lb4, "-j", "RETURN"),
        ("-d", LB6, "-j", "RETURN"),
        "traffic to loopback is not captured",
    )


def _outbound_cidr_excludes(b: _Builder, c: _Context) -> None:
    """P: -x CIDRs are never captured."""
    for family in FAMILIES:
        rule = b.v6_rule if family == "ipv6" else b.v4_rule
        for match, what in _destinations(c, "exclude", family):
            rule("nat", OUTPUT, (*match, "-j", "RETURN"), f"{what} excluded by -x")


def _outbound_ports(b: _Builder, c: _Context) -> None:
    """Q: -q ports are always captured, whatever the destination."""
    for port in c.o.outbound_ports:
        b.both(
            "nat",
            OUTPUT,
            ("-p", "tcp", "--dport", str(port), "-j", REDIRECT),
            f"outbound TCP port {port} is always captured (-q)",
        )


def _outbound_include(b: _Builder, c: _Context) -> None:
    """R: -i CIDRs (or '*') are captured; KubeVirt interfaces' traffic to them too."""
    cidrs = c.o.service_cidr
    for family in FAMILIES:
        rule = b.v6_rule if family == "ipv6" else b.v4_rule
        if cidrs.wildcard:
            rule("nat", OUTPUT, ("-j", REDIRECT), "all other outbound traffic is captured (-i '*')")
            for nic in c.o.kube_virt_interfaces:
                rule(
                    "nat",
                    "PREROUTING",
                    ("-i", nic, "-j", REDIRECT),
                    f"traffic from virtual interface {nic} is captured as outbound",
                    at=1,
                )
            continue
        for match, what in _destinations(c, "include", family):
            for nic in c.o.kube_virt_interfaces:
                rule(
                    "nat",
                    "PREROUTING",
                    ("-i", nic, *match, "-j", REDIRECT),
                    f"traffic from virtual interface {nic} to {what} is captured",
                    at=1,
                )
            rule("nat", OUTPUT, (*match, "-j", REDIRECT), f"outbound to {what} is captured (-i)")


def _tproxy_extras(b: _Builder, c: _Context) -> None:
    """S: TPROXY marks and returns (emitted whenever mode is TPROXY, even with empty -b)."""
    if not c.o.tproxy:
        return
    mark = str(c.o.tproxy_mark)
    b.both(
        "mangle",
        "PREROUTING",
        ("-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark"),
        "TPROXY: remember the mark on the connection",
    )
    b.both(
        "mangle",
        "OUTPUT",
        ("-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN"),
        "TPROXY: marked loopback traffic passes",
    )
    for match, owners in (("--uid-owner", c.o.proxy_uids), ("--gid-owner", c.o.proxy_gids)):
        for owner in owners:
            tail = (
                "-p",
                "tcp",
                "-o",
                "lo",
                "-m",
                "owner",
                match,
                owner,
                "-j",
                "MARK",
                "--set-mark",
                OUTBOUND_MARK,
            )
            b.versioned(
                "mangle",
                "OUTPUT",
                ("!", "-d", c.lb4, *tail),
                ("!", "-d", LB6, *tail),
                "TPROXY: the proxy's traffic to local addresses is marked 1338",
            )
    b.both(
        "mangle",
        "OUTPUT",
        ("-p", "tcp", "-m", "connmark", "--mark", mark, "-j", "CONNMARK", "--restore-mark"),
        "TPROXY: replies of captured connections get the mark back",
    )
    b.both(
        "mangle",
        INBOUND,
        ("-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN"),
        "TPROXY: already-marked traffic is not captured again",
        at=1,
    )
    for source, rule in (("127.0.0.6/32", b.v4_rule), ("::6/128", b.v6_rule)):
        rule(
            "mangle",
            INBOUND,
            ("-p", "tcp", "-s", source, "-i", "lo", "-j", "RETURN"),
            "TPROXY: the proxy's passthrough traffic is not captured",
            at=2,
        )
    b.both(
        "mangle",
        INBOUND,
        ("-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", OUTBOUND_MARK, "-j", "RETURN"),
        "TPROXY: loopback traffic not marked by the proxy is not captured",
        at=3,
    )


_STEPS = (
    _exclude_interfaces,
    _kube_virt_interfaces,
    _drop_invalid,
    _base_chains,
    _inbound,
    _output_jump,
    _outbound_port_excludes,
    _passthrough_source,
    _proxy_owners,
    _owner_groups,
    _dns,
    _loopback_return,
    _outbound_cidr_excludes,
    _outbound_ports,
    _outbound_include,
    _tproxy_extras,
)
