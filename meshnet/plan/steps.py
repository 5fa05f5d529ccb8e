"""plan(options) -> Plan: Istio's capture algorithm, written once, pure and deterministic.

The algorithm is IptablesConfigurator.Run in `tools/istio-iptables/pkg/capture/run.go`;
NftablesConfigurator.Run in `tools/istio-nftables/pkg/capture/run.go` is its translation and
runs the same steps in the same order. Each step is one small function named for what it does,
called in Istio's order; the order decides the rule text byte for byte, so do not reorder them.
Where Istio's two tools write a step differently, the difference is in the lowering
(`meshnet.plan.iptables`, `meshnet.plan.nftables`), not here. Every rule carries a short reason,
shown by `--output-format json` and `explain`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from meshnet.config.options import Options
from meshnet.plan import ir
from meshnet.plan.ir import RETURN, Match, OwnerKind, Scope, Table, Target
from meshnet.plan.model import FAMILIES, Family, IpSet

LB6 = "::1/128"
DNS_PORT = "53"
DNS_PROXY_PORT = "15053"  # constants.IstioAgentDNSListenerPort
OUTBOUND_MARK = "1338"  # constants.OutboundMark, hard-coded in Istio
PASSTHROUGH = {"ipv4": "127.0.0.6/32", "ipv6": "::6/128"}  # the proxy's inbound passthrough source

# Istio's chain names (tools/istio-iptables/pkg/constants); the nft lowering renames them.
INBOUND = "ISTIO_INBOUND"
REDIRECT = "ISTIO_REDIRECT"
IN_REDIRECT = "ISTIO_IN_REDIRECT"
OUTPUT = "ISTIO_OUTPUT"
OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
DIVERT = "ISTIO_DIVERT"
TPROXY = "ISTIO_TPROXY"
DROP = "ISTIO_DROP"
SET_PREFIX = "meshnet-"  # --cidr-sets names: meshnet-{include,exclude}-{v4,v6}


@dataclass(slots=True)
class _Builder:
    """The rules in emission order; Istio's v4 and v6 lists are the rules' scopes."""

    rules: list[ir.Rule] = field(default_factory=list)

    def add(
        self,
        table: Table,
        chain: str,
        matches: tuple[Match, ...],
        target: Target,
        why: str,
        scope: Scope = "both",
        at: int | None = None,
    ) -> None:
        self.rules.append(ir.Rule(table, chain, matches, target, why, scope, at))


@dataclass(frozen=True, slots=True)
class _Context:
    """Values derived once before the steps run: DNS redirection and the loopback CIDRs."""

    o: Options
    redirect_dns: bool

    @property
    def tunnel(self) -> str:
        return str(self.o.inbound_tunnel_port)

    @property
    def mark(self) -> str:
        return str(self.o.tproxy_mark)

    def loopback(self, family: Family) -> str:
        return LB6 if family == "ipv6" else self.o.ipv4_loopback_cidr


def plan(options: Options) -> ir.Plan:
    """Plan Istio's rules for these options."""
    ctx, warnings = _preprocess(options)
    b = _Builder()
    for step in _STEPS:
        step(b, ctx)
    return ir.Plan(
        tuple(b.rules), options.enable_ipv6, options.cleanup_only, warnings, ipsets(options)
    )


def _preprocess(o: Options) -> tuple[_Context, tuple[str, ...]]:
    redirect_dns = o.redirect_dns
    warnings: tuple[str, ...] = ()
    if redirect_dns and not o.capture_all_dns and not (o.dns_servers_v4 or o.dns_servers_v6):
        redirect_dns = False
        warnings = (
            "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is false, and no DNS servers provided. "
            "DNS capture disabled.",
        )
    return _Context(o, redirect_dns), warnings


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
    return f"{SET_PREFIX}{kind}-{'v6' if family == 'ipv6' else 'v4'}"


def _set_members(cidrs: tuple[str, ...]) -> tuple[str, ...]:
    """Networks as the kernel stores them; hash:net cannot hold /0, so it becomes two /1s."""
    members: list[str] = []
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr, strict=False)
        members += [str(n) for n in network.subnets()] if network.prefixlen == 0 else [str(network)]
    return tuple(dict.fromkeys(members))


def _destinations(c: _Context, kind: str, family: Family) -> list[tuple[Match, str]]:
    """The destination matches of a CIDR list: one per CIDR (Istio), or one set (--cidr-sets)."""
    cidrs = c.o.service_exclude_cidr if kind == "exclude" else c.o.service_cidr
    items = cidrs.v6 if family == "ipv6" else cidrs.v4
    if c.o.cidr_sets and items:
        name = set_name(kind, family)
        return [(ir.dst_set(name), f"set {name}")]
    return [(ir.dst(cidr), cidr) for cidr in items]


def _scope(ipv4: bool, ipv6: bool) -> Scope | None:
    """The scope of a rule Istio writes per family only where that family has something."""
    if ipv4 and ipv6:
        return "both"
    return "ipv4" if ipv4 else "ipv6" if ipv6 else None


TCP = ir.proto("tcp")
LO_OUT = ir.oif("lo")
LO_IN = ir.iif("lo")


def _exclude_interfaces(b: _Builder, c: _Context) -> None:
    """A: traffic on excluded NICs is never captured, in either direction."""
    why = "interface excluded by -c: never captured"
    tables: tuple[Table, ...] = ("nat", "mangle") if c.o.tproxy else ("nat",)
    for table in tables:  # Istio loops over the NICs once per table
        for nic in c.o.exclude_interfaces:
            b.add(table, "PREROUTING", (ir.iif(nic),), RETURN, why)
            b.add(table, "OUTPUT", (ir.oif(nic),), RETURN, why)


def _kube_virt_interfaces(b: _Builder, c: _Context) -> None:
    """B: traffic from KubeVirt interfaces skips inbound capture (it is handled as outbound)."""
    why = "virtual interface (-k): not inbound traffic"
    for nic in c.o.kube_virt_interfaces:
        b.add("nat", "PREROUTING", (ir.iif(nic),), RETURN, why, at=1)


def _drop_invalid(b: _Builder, c: _Context) -> None:
    """C: drop packets conntrack cannot place (they would bypass the NAT of their flow)."""
    if not c.o.drop_invalid:
        return
    # Istio's nft rule matches TCP only (`meta l4proto tcp ct state invalid`); its iptables
    # rule matches every protocol.
    matches = (ir.proto("tcp", nft_only=True), ir.ctstate("invalid"))
    why = "--drop-invalid: conntrack state INVALID is dropped"
    b.add("mangle", "PREROUTING", matches, ir.jump(DROP), why)
    b.add("mangle", DROP, (), ir.DROP, "--drop-invalid: the drop itself")


def _base_chains(b: _Builder, c: _Context) -> None:
    """D-F: the tunnel port is never captured inbound; the two REDIRECT targets."""
    tunnel = (TCP, ir.dport("tcp", c.tunnel))
    b.add("nat", INBOUND, tunnel, RETURN, "inbound tunnel port (-e) is never captured")
    why = "outbound capture: send to the proxy's outbound port (-p)"
    b.add("nat", REDIRECT, (TCP,), ir.redirect(str(c.o.proxy_port)), why)
    why = "inbound capture: send to the proxy's inbound port (-z)"
    b.add("nat", IN_REDIRECT, (TCP,), ir.redirect(str(c.o.inbound_capture_port)), why)


def _inbound(b: _Builder, c: _Context) -> None:
    """G: inbound capture of the -b ports, by REDIRECT (nat) or TPROXY (mangle)."""
    o = c.o
    if o.inbound_ports.empty:
        return
    table: Table = "nat"
    if o.tproxy:
        _tproxy_chains(b, c)
        table = "mangle"
    b.add(table, "PREROUTING", (TCP,), ir.jump(INBOUND), "inbound TCP enters ISTIO_INBOUND")
    if o.inbound_ports.wildcard:
        for port in o.local_exclude_ports:  # -d only applies with -b '*'
            excluded = (TCP, ir.dport("tcp", str(port)))
            b.add(table, INBOUND, excluded, RETURN, "inbound port excluded by -d")
        _capture_inbound(b, c, None)
    else:
        for included in o.inbound_ports.items:
            _capture_inbound(b, c, included)


def _tproxy_chains(b: _Builder, c: _Context) -> None:
    why = "TPROXY: mark packets of established inbound flows"
    b.add("mangle", DIVERT, (), ir.set_mark(c.mark), why)
    b.add("mangle", DIVERT, (), ir.ACCEPT, "TPROXY: established inbound flows pass")
    why = "TPROXY: deliver inbound TCP to the proxy's inbound port, source kept"
    to_proxy = ir.tproxy(str(c.o.inbound_capture_port), c.mark)
    for family in FAMILIES:
        matches = (ir.dst(c.loopback(family), negated=True), TCP)
        b.add("mangle", TPROXY, matches, to_proxy, why, family)


def _capture_inbound(b: _Builder, c: _Context, port: str | None) -> None:
    which = f"port {port}" if port else "every port"
    ports = (ir.dport("tcp", port),) if port else ()
    if not c.o.tproxy:
        why = f"inbound TCP on {which} is captured"
        b.add("nat", INBOUND, (TCP, *ports), ir.jump(IN_REDIRECT), why)
        return
    established = (TCP, *ports, ir.ctstate("related", "established"))
    why = f"TPROXY: established inbound flow on {which} is marked"
    b.add("mangle", INBOUND, established, ir.jump(DIVERT), why)
    why = f"TPROXY: new inbound connection on {which} is captured"
    b.add("mangle", INBOUND, (TCP, *ports), ir.jump(TPROXY), why)


def _output_jump(b: _Builder, c: _Context) -> None:
    """H: all locally generated traffic enters ISTIO_OUTPUT (UDP is filtered inside)."""
    b.add("nat", "OUTPUT", (), ir.jump(OUTPUT), "locally generated traffic enters ISTIO_OUTPUT")


def _outbound_port_excludes(b: _Builder, c: _Context) -> None:
    """I: -o ports are never captured, TCP or UDP."""
    for port in c.o.outbound_ports_exclude:
        for proto in ("tcp", "udp"):
            matches = (ir.dport(proto, str(port)),)
            b.add("nat", OUTPUT, matches, RETURN, "outbound port excluded by -o")


def _passthrough_source(b: _Builder, c: _Context) -> None:
    """J: the proxy's inbound passthrough source (127.0.0.6 / ::6) is never recaptured."""
    why = "inbound passthrough traffic from the proxy (source 127.0.0.6/::6)"
    for family in FAMILIES:
        b.add("nat", OUTPUT, (LO_OUT, ir.src(PASSTHROUGH[family])), RETURN, why, family)


def _proxy_owners(b: _Builder, c: _Context) -> None:
    """K-L: the proxy's own traffic is not captured, except to the pod's own IP (goes inbound)."""
    for uid in c.o.proxy_uids:
        _owner_rules(b, c, "uid", uid, dns_ports=c.redirect_dns)
    for gid in c.o.proxy_gids:
        # Istio's GID rule never takes the DNS/multiport form: kept, the goldens show it.
        _owner_rules(b, c, "gid", gid, dns_ports=False)


def _owner_rules(b: _Builder, c: _Context, kind: OwnerKind, owner: str, dns_ports: bool) -> None:
    # With DNS capture, port 53 is also skipped (multiport `53,<tunnel>`).
    skipped = (DNS_PORT, c.tunnel) if dns_ports else (c.tunnel,)
    tail = (TCP, ir.dport("tcp", *skipped, negated=True), ir.owner(kind, owner))
    why = f"proxy ({kind} {owner}) to a local non-loopback address goes inbound"
    for family in FAMILIES:
        matches = (LO_OUT, ir.dst(c.loopback(family), negated=True), *tail)
        b.add("nat", OUTPUT, matches, ir.jump(IN_REDIRECT), why, family)
    if not c.o.service_cidr.has_loopback():  # an explicit loopback -i range turns this off
        # With DNS capture, TCP to port 53 over lo stays capturable (a DNS server on localhost).
        dns = (TCP, ir.dport("tcp", DNS_PORT, negated=True)) if c.redirect_dns else ()
        matches = (LO_OUT, *dns, ir.owner(kind, owner, negated=True))
        b.add("nat", OUTPUT, matches, RETURN, f"app traffic over lo is not captured (not {owner})")
    why = f"the proxy's own outbound traffic ({kind} {owner}) is not captured"
    b.add("nat", OUTPUT, (ir.owner(kind, owner),), RETURN, why)


def _owner_groups(b: _Builder, c: _Context) -> None:
    """M: ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE) select which groups' traffic is captured."""
    include = c.o.owner_groups_include
    if include.wildcard:
        why = "owner group excluded by ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"
        for gid in c.o.owner_groups_exclude:
            b.add("nat", OUTPUT, (ir.owner("gid", gid),), RETURN, why)
        return
    # One rule that returns what is none of the groups; with no groups at all it is a bare
    # return, which turns off all outbound capture.
    none_of = tuple(ir.owner("gid", gid, negated=True) for gid in include.items)
    b.add("nat", OUTPUT, none_of, RETURN, "only groups in ISTIO_OUTBOUND_OWNER_GROUPS are captured")


def _dns(b: _Builder, c: _Context) -> None:
    """N: DNS to the proxy's port 15053, with conntrack zones that keep UDP flows apart."""
    if not c.redirect_dns:
        return
    o = c.o
    b.add("raw", "OUTPUT", (), ir.jump(OUTPUT_DNS), "DNS conntrack zoning")
    scope = _scope(
        o.capture_all_dns or bool(o.dns_servers_v4), o.capture_all_dns or bool(o.dns_servers_v6)
    )
    if scope is not None:
        b.add("nat", OUTPUT, (), ir.jump(OUTPUT_DNS), "DNS traffic is checked for capture", scope)
    for proto in ("tcp", "udp"):
        _dns_redirect(b, c, proto)
    _dns_zones(b, c)


def _dns_redirect(b: _Builder, c: _Context, proto: str) -> None:
    to_proxy = ir.redirect(DNS_PROXY_PORT)
    if c.o.capture_all_dns:
        # Only the TCP rule matches the protocol on its own (Istio's nft tokens).
        matches = (*((TCP,) if proto == "tcp" else ()), ir.dport(proto, DNS_PORT))
        b.add(
            "nat",
            OUTPUT_DNS,
            matches,
            to_proxy,
            f"DNS over {proto} to any server goes to the proxy",
        )
        return
    for family, servers, bits in _dns_servers(c):
        for server in servers:
            matches = (ir.dport(proto, DNS_PORT), ir.dst(f"{server}/{bits}"))
            why = f"DNS over {proto} to {server} goes to the proxy"
            b.add("nat", OUTPUT_DNS, matches, to_proxy, why, family)


def _dns_servers(c: _Context) -> tuple[tuple[Family, tuple[str, ...], str], ...]:
    return (("ipv4", c.o.dns_servers_v4, "32"), ("ipv6", c.o.dns_servers_v6, "128"))


def _proxy(c: _Context) -> list[tuple[OwnerKind, str]]:
    """The proxy's owners: its UIDs, then its GIDs."""
    uids: list[tuple[OwnerKind, str]] = [("uid", uid) for uid in c.o.proxy_uids]
    return uids + [("gid", gid) for gid in c.o.proxy_gids]


def _dns_zones(b: _Builder, c: _Context) -> None:
    o = c.o
    for kind, owner in _proxy(c):
        proxy = ir.owner(kind, owner)
        why = "the proxy's upstream DNS queries use conntrack zone 1"
        b.add("raw", OUTPUT_DNS, (ir.dport("udp", DNS_PORT), proxy), ir.zone("1"), why)
        why = "the proxy's DNS answers to the app use conntrack zone 2"
        b.add("raw", OUTPUT_DNS, (ir.sport("udp", DNS_PROXY_PORT), proxy), ir.zone("2"), why)
    if o.capture_all_dns:
        _dns_zones_all(b)
    else:
        _dns_zones_per_server(b, c)


def _dns_zones_all(b: _Builder) -> None:
    b.add("raw", "PREROUTING", (), ir.jump(INBOUND), "DNS answers enter the raw inbound chain")
    why = "the app's DNS queries use conntrack zone 2"
    b.add("raw", OUTPUT_DNS, (ir.dport("udp", DNS_PORT),), ir.zone("2"), why)
    why = "upstream DNS answers use conntrack zone 1"
    b.add("raw", INBOUND, (ir.sport("udp", DNS_PORT),), ir.zone("1"), why)


def _dns_zones_per_server(b: _Builder, c: _Context) -> None:
    scope = _scope(bool(c.o.dns_servers_v4), bool(c.o.dns_servers_v6))
    if scope is not None:
        why = "DNS answers enter the raw inbound chain"
        b.add("raw", "PREROUTING", (), ir.jump(INBOUND), why, scope)
    for family, servers, bits in _dns_servers(c):
        for server in servers:
            prefix = f"{server}/{bits}"
            why = f"the app's DNS queries to {server} use conntrack zone 2"
            matches = (ir.dport("udp", DNS_PORT), ir.dst(prefix))
            b.add("raw", OUTPUT_DNS, matches, ir.zone("2"), why, family)
            why = f"DNS answers from {server} use conntrack zone 1"
            matches = (ir.sport("udp", DNS_PORT), ir.src(prefix))
            b.add("raw", INBOUND, matches, ir.zone("1"), why, family)


def _loopback_return(b: _Builder, c: _Context) -> None:
    """O: traffic to the loopback address itself is never captured."""
    for family in FAMILIES:
        matches = (ir.dst(c.loopback(family)),)
        b.add("nat", OUTPUT, matches, RETURN, "traffic to loopback is not captured", family)


def _outbound_cidr_excludes(b: _Builder, c: _Context) -> None:
    """P: -x CIDRs are never captured."""
    for family in FAMILIES:
        for match, what in _destinations(c, "exclude", family):
            b.add("nat", OUTPUT, (match,), RETURN, f"{what} excluded by -x", family)


def _outbound_ports(b: _Builder, c: _Context) -> None:
    """Q: -q ports are always captured, whatever the destination."""
    for port in c.o.outbound_ports:
        why = f"outbound TCP port {port} is always captured (-q)"
        b.add("nat", OUTPUT, (ir.dport("tcp", str(port)),), ir.jump(REDIRECT), why)


def _outbound_include(b: _Builder, c: _Context) -> None:
    """R: -i CIDRs (or '*') are captured; KubeVirt interfaces' traffic to them too."""
    to_proxy = ir.jump(REDIRECT)
    nics = c.o.kube_virt_interfaces
    if c.o.service_cidr.wildcard:
        why = "all other outbound traffic is captured (-i '*')"
        b.add("nat", OUTPUT, (), to_proxy, why)
        for nic in nics:
            why = f"traffic from virtual interface {nic} is captured as outbound"
            b.add("nat", "PREROUTING", (ir.iif(nic),), to_proxy, why, at=1)
        return
    for family in FAMILIES:
        for match, what in _destinations(c, "include", family):
            for nic in nics:
                why = f"traffic from virtual interface {nic} to {what} is captured"
                b.add("nat", "PREROUTING", (ir.iif(nic), match), to_proxy, why, family, at=1)
            b.add("nat", OUTPUT, (match,), to_proxy, f"outbound to {what} is captured (-i)", family)


def _tproxy_extras(b: _Builder, c: _Context) -> None:
    """S: TPROXY marks and returns (emitted whenever mode is TPROXY, even with empty -b)."""
    if not c.o.tproxy:
        return
    marked = ir.mark(c.mark)
    why = "TPROXY: remember the mark on the connection"
    b.add("mangle", "PREROUTING", (TCP, marked), ir.SAVE_MARK, why)
    b.add(
        "mangle", "OUTPUT", (TCP, LO_OUT, marked), RETURN, "TPROXY: marked loopback traffic passes"
    )
    why = "TPROXY: the proxy's traffic to local addresses is marked 1338"
    for kind, owner in _proxy(c):
        for family in FAMILIES:
            not_lo = ir.dst(c.loopback(family), negated=True)
            matches = (not_lo, TCP, LO_OUT, ir.owner(kind, owner))
            b.add("mangle", "OUTPUT", matches, ir.set_mark(OUTBOUND_MARK), why, family)
    why = "TPROXY: replies of captured connections get the mark back"
    b.add("mangle", "OUTPUT", (TCP, ir.connmark(c.mark)), ir.RESTORE_MARK, why)
    _tproxy_inbound_returns(b, c)


def _tproxy_inbound_returns(b: _Builder, c: _Context) -> None:
    """The three head-of-chain returns of mangle ISTIO_INBOUND (`-I 1/2/3`)."""
    why = "TPROXY: already-marked traffic is not captured again"
    b.add("mangle", INBOUND, (TCP, ir.mark(c.mark)), RETURN, why, at=1)
    why = "TPROXY: the proxy's passthrough traffic is not captured"
    for family in FAMILIES:
        matches = (TCP, ir.src(PASSTHROUGH[family]), LO_IN)
        b.add("mangle", INBOUND, matches, RETURN, why, family, at=2)
    why = "TPROXY: loopback traffic not marked by the proxy is not captured"
    unmarked = (TCP, LO_IN, ir.mark(OUTBOUND_MARK, negated=True))
    b.add("mangle", INBOUND, unmarked, RETURN, why, at=3)


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
