"""plan_nft(options) -> NftRuleset: Istio's native nftables plan, pure.

Istio's `tools/istio-nftables/pkg/capture/run.go` was translated from the iptables steps of
`tools/istio-iptables/pkg/capture/run.go`, so each step here mirrors `meshnet.planner`, in the
same order, as one small function. The rule text is the `knftables.Concat` of Istio's tokens,
which fixes match order and the `counter` position byte for byte
(e.g. `ip daddr 127.0.0.53/32 tcp dport 53 counter redirect to :15053`).

Differences from the iptables plan that are visible in the goldens:
- three `inet` tables (`istio-proxy-nat`, `-mangle`, `-raw`); a rule without an `ip`/`ip6`
  address match is added once and covers both families; `ip6` rules only exist with IPv6 on;
- inserts use 0-based nft indexes, and Istio turns an insert whose index is not below the number
  of rules already added to that chain *in this transaction* into an append (`_transaction`);
- chains come from a fixed per-table list, and only those that receive a rule are created.

One difference from Istio, on purpose: with IPv6 off, every base chain starts with
`meta nfproto ipv6 counter return` (`_ipv4_only`), so that IPv6 is left alone as in iptables mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from meshnet.options import Options
from meshnet.planner import ipsets, set_name

# Istio's table names (tools/istio-nftables/pkg/constants).
NAT = "istio-proxy-nat"
MANGLE = "istio-proxy-mangle"
RAW = "istio-proxy-raw"
TABLES: tuple[str, ...] = (NAT, MANGLE, RAW)  # transaction order

# Istio's chain names.
PREROUTING = "prerouting"
OUTPUT = "output"
INBOUND = "istio-inbound"
REDIRECT = "istio-redirect"
IN_REDIRECT = "istio-in-redirect"
ISTIO_OUTPUT = "istio-output"
OUTPUT_DNS = "istio-output-dns"
DIVERT = "istio-divert"
TPROXY = "istio-tproxy"
DROP = "istio-drop"

LB6 = "::1/128"
DNS_PORT = "53"
DNS_PROXY_PORT = "15053"  # constants.IstioAgentDNSListenerPort
OUTBOUND_MARK = "1338"  # constants.OutboundMark, hard-coded in Istio
COUNTER = "counter"  # constants.Counter: Istio puts it right before every verdict/statement
# meshnet's own first rule of every base chain when IPv6 is off (`_ipv4_only`).
IPV4_ONLY = ("meta", "nfproto", "ipv6", COUNTER, "return")

Action = Literal["rebuild", "delete"]


@dataclass(frozen=True, slots=True)
class NftChain:
    """A chain of an Istio table; base chains carry their `{ type hook priority }` spec."""

    name: str
    type: str | None = None
    hook: str | None = None
    priority: int | None = None

    @property
    def is_base(self) -> bool:
        return self.hook is not None


@dataclass(frozen=True, slots=True)
class NftRule:
    """One `add rule` / `insert rule` operation of the transaction, and why it exists.

    `requested_index` is the 0-based index Istio's builder asked for (iptables `-I N` is
    `N - 1`); `index` is what the transaction really does after Istio's conversion: None means
    `add rule` (append), a number means `insert rule ... index N` (before rule N).
    """

    table: str
    chain: str
    spec: tuple[str, ...]
    reason: str
    requested_index: int | None = None
    index: int | None = None

    @property
    def text(self) -> str:
        """The rule body as nft reads it (knftables.Concat of Istio's tokens)."""
        return " ".join(self.spec)

    @property
    def verb(self) -> str:
        return "add" if self.index is None else "insert"


@dataclass(frozen=True, slots=True)
class NftSet:
    """A named interval set of CIDRs (--cidr-sets), matched as `ip daddr @NAME`."""

    name: str
    type: str  # ipv4_addr or ipv6_addr
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NftTable:
    """One table's part of the transaction.

    `rebuild`: add table, flush it, add the chains that receive rules, then the rules in order.
    `delete` (--cleanup-only): add the table (so the delete cannot fail), then delete it.
    """

    name: str
    action: Action
    chains: tuple[NftChain, ...] = ()
    rules: tuple[NftRule, ...] = ()
    sets: tuple[NftSet, ...] = ()


@dataclass(frozen=True, slots=True)
class NftRuleset:
    """The whole nft transaction, tables in nat, mangle, raw order (tables without rules absent)."""

    tables: tuple[NftTable, ...]
    ipv6_enabled: bool
    warnings: tuple[str, ...] = field(default=())

    @property
    def cleanup_only(self) -> bool:
        return any(t.action == "delete" for t in self.tables)

    def table(self, name: str) -> NftTable | None:
        return next((t for t in self.tables if t.name == name), None)

    def rules(self) -> Iterator[NftRule]:
        """Every rule operation, in transaction order."""
        for table in self.tables:
            yield from table.rules

    def chains(self) -> dict[str, dict[str, list[NftRule]]]:
        """Final per-table, per-chain rule order after applying the adds and inserts in order.

        Chains appear in declaration order, each one (even if only a jump target) with its rules.
        """
        result: dict[str, dict[str, list[NftRule]]] = {}
        for table in self.tables:
            if table.action != "rebuild":
                continue
            chains: dict[str, list[NftRule]] = {chain.name: [] for chain in table.chains}
            for rule in table.rules:
                rules = chains.setdefault(rule.chain, [])
                if rule.index is None:
                    rules.append(rule)
                else:
                    rules.insert(rule.index, rule)
            result[table.name] = chains
        return result


# The fixed chains of each table, in the order Istio adds them (addIstio*TableRules).
# knftables prints the priorities as numbers: dstnat = -100, mangle = -150, raw = -300.
_LAYOUT: dict[str, tuple[NftChain, ...]] = {
    NAT: (
        NftChain(PREROUTING, "nat", "prerouting", -100),
        NftChain(OUTPUT, "nat", "output", -100),
        NftChain(INBOUND),
        NftChain(REDIRECT),
        NftChain(IN_REDIRECT),
        NftChain(ISTIO_OUTPUT),
        NftChain(OUTPUT_DNS),
    ),
    MANGLE: (
        NftChain(PREROUTING, "filter", "prerouting", -150),
        # A `route` chain, so that a mark set on output re-routes the packet (to the TPROXY
        # routing table) as iptables' mangle OUTPUT does.
        NftChain(OUTPUT, "route", "output", -150),
        NftChain(DIVERT),
        NftChain(TPROXY),
        NftChain(INBOUND),
        NftChain(DROP),
    ),
    RAW: (
        NftChain(PREROUTING, "filter", "prerouting", -300),
        NftChain(OUTPUT, "filter", "output", -300),
        NftChain(INBOUND),
        NftChain(OUTPUT_DNS),
    ),
}


class _Add(Protocol):
    """`_Builder.add` or `_Builder.add_v6`, passed to a helper that serves both families."""

    def __call__(self, table: str, chain: str, *parts: str, why: str) -> None: ...


class _Insert(Protocol):
    """`_Builder.insert` or `_Builder.insert_v6`."""

    def __call__(self, table: str, chain: str, index: int, *parts: str, why: str) -> None: ...


@dataclass(slots=True)
class _Builder:
    """Istio's NftablesRuleBuilder: one ordered list of rules per table, all `inet`."""

    ipv6: bool
    rules: dict[str, list[NftRule]] = field(default_factory=lambda: {t: [] for t in TABLES})

    def add(self, table: str, chain: str, *parts: str, why: str) -> None:
        """AppendRule: one inet rule, which covers IPv4 and IPv6 alike."""
        self.rules[table].append(NftRule(table, chain, _concat(parts), why))

    def add_v6(self, table: str, chain: str, *parts: str, why: str) -> None:
        """AppendV6RuleIfSupported: only when IPv6 is on (the rule names ip6 addresses)."""
        if self.ipv6:
            self.add(table, chain, *parts, why=why)

    def insert(self, table: str, chain: str, index: int, *parts: str, why: str) -> None:
        """InsertRule at a 0-based index; `_transaction` may turn it into an append."""
        rule = NftRule(table, chain, _concat(parts), why, requested_index=index, index=index)
        self.rules[table].append(rule)

    def insert_v6(self, table: str, chain: str, index: int, *parts: str, why: str) -> None:
        if self.ipv6:
            self.insert(table, chain, index, *parts, why=why)


def _concat(parts: tuple[str, ...]) -> tuple[str, ...]:
    """knftables.Concat joins Istio's tokens with spaces; keep the words as the rule spec."""
    return tuple(" ".join(parts).split())


@dataclass(frozen=True, slots=True)
class _Context:
    """Values derived once before the steps run: DNS redirection and the IPv4 loopback CIDR."""

    o: Options
    redirect_dns: bool
    lb4: str

    @property
    def tunnel(self) -> str:
        return str(self.o.inbound_tunnel_port)

    @property
    def mark(self) -> str:
        return str(self.o.tproxy_mark)


def plan_nft(options: Options) -> NftRuleset:
    """Plan Istio's nftables transaction for these options."""
    ctx, warnings = _preprocess(options)
    if options.cleanup_only:
        # Istio still builds the rules, then ignores them: cleanup deletes whole tables.
        tables = tuple(NftTable(name, "delete") for name in TABLES)
        return NftRuleset(tables, options.enable_ipv6, warnings)
    b = _Builder(ipv6=options.enable_ipv6)
    for step in _STEPS:
        step(b, ctx)
    tables = tuple(
        table for name in TABLES if (table := _transaction(name, b.rules[name])) is not None
    )
    if not options.enable_ipv6:
        tables = tuple(_ipv4_only(table) for table in tables)
    if tables and tables[0].name == NAT and options.cidr_sets:
        tables = (replace(tables[0], sets=_sets(options)), *tables[1:])
    return NftRuleset(tables, options.enable_ipv6, warnings)


def _sets(o: Options) -> tuple[NftSet, ...]:
    """The same sets as the iptables plan's ipsets (`planner.ipsets`), as nft interval sets."""
    return tuple(
        NftSet(s.name, "ipv6_addr" if s.family == "ipv6" else "ipv4_addr", s.members)
        for s in ipsets(o)
    )


def _cidr_matches(c: _Context, kind: str, ip: str) -> list[tuple[str, str]]:
    """(match value, label) per CIDR (Istio), or one `@set` reference with --cidr-sets."""
    cidrs = c.o.service_exclude_cidr if kind == "exclude" else c.o.service_cidr
    items = cidrs.v6 if ip == "ip6" else cidrs.v4
    if c.o.cidr_sets and items:
        name = set_name(kind, "ipv6" if ip == "ip6" else "ipv4")
        return [(f"@{name}", f"set {name}")]
    return [(cidr, cidr) for cidr in items]


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


def _transaction(name: str, rules: list[NftRule]) -> NftTable | None:
    """Istio's addIstioTableRules: the chains that receive rules, then the rule operations."""
    used = {rule.chain for rule in rules}
    chains = tuple(chain for chain in _LAYOUT[name] if chain.name in used)
    if not chains:
        return None  # a table without rules is left out of the transaction entirely
    added: dict[str, int] = {}
    operations: list[NftRule] = []
    for rule in rules:
        count = added.get(rule.chain, 0)
        # nft refuses `insert ... index N` unless the chain already holds more than N rules, so
        # Istio appends instead when index >= rules added to this chain so far. Only rules of
        # this transaction count (the table was just flushed).
        if rule.index is not None and rule.index >= count:
            rule = replace(rule, index=None)
        operations.append(rule)
        added[rule.chain] = count + 1
    return NftTable(name, "rebuild", chains, tuple(operations))


def _ipv4_only(table: NftTable) -> NftTable:
    """With IPv6 off, IPv6 packets leave each base chain at its first rule.

    Istio's tables are `inet` and most rules carry no family match, so its nft mode captures an
    IPv6 connection even when the proxy listens on IPv4 only; in iptables mode the IPv6 side is
    simply not programmed. The guard is inserted at index 0 as each table's last operation, so
    it ends up first whatever Istio's own inserts did, and no other operation changes.
    """
    why = "IPv6 is off: IPv6 packets are left alone, as ip6tables would be without rules"
    guards = tuple(
        NftRule(table.name, chain.name, IPV4_ONLY, why, requested_index=0, index=0)
        for chain in table.chains
        if chain.is_base
    )
    return replace(table, rules=(*table.rules, *guards))


# --- the steps, in Istio's order (NftablesConfigurator.Run) ---------------------------------


def _exclude_interfaces(b: _Builder, c: _Context) -> None:
    """A: traffic on excluded NICs is never captured, in either direction."""
    why = "interface excluded by -c: never captured"
    tables = (NAT, MANGLE) if c.o.tproxy else (NAT,)
    for table in tables:  # Istio loops over the NICs once per table
        for nic in c.o.exclude_interfaces:
            b.add(table, PREROUTING, "iifname", nic, COUNTER, "return", why=why)
            b.add(table, OUTPUT, "oifname", nic, COUNTER, "return", why=why)


def _kube_virt_interfaces(b: _Builder, c: _Context) -> None:
    """B: traffic from KubeVirt interfaces skips inbound capture (it is handled as outbound)."""
    for nic in c.o.kube_virt_interfaces:
        # iptables `-I PREROUTING 1`; the first one becomes an append (empty chain).
        b.insert(
            NAT,
            PREROUTING,
            0,
            "iifname",
            nic,
            COUNTER,
            "return",
            why="virtual interface (-k): not inbound traffic",
        )


def _drop_invalid(b: _Builder, c: _Context) -> None:
    """C: drop packets conntrack cannot place (they would bypass the NAT of their flow)."""
    if not c.o.drop_invalid:
        return
    # Unlike iptables, Istio's nft rule only matches TCP (`meta l4proto tcp`).
    b.add(
        MANGLE,
        PREROUTING,
        "meta l4proto tcp",
        "ct state",
        "invalid",
        COUNTER,
        "jump",
        DROP,
        why="--drop-invalid: TCP in conntrack state invalid is dropped",
    )
    b.add(MANGLE, DROP, COUNTER, "drop", why="--drop-invalid: the drop itself")


def _base_chains(b: _Builder, c: _Context) -> None:
    """D-F: the tunnel port is never captured inbound; the two redirect targets."""
    b.add(
        NAT,
        INBOUND,
        "meta l4proto tcp",
        "tcp dport",
        c.tunnel,
        COUNTER,
        "return",
        why="inbound tunnel port (-e) is never captured",
    )
    b.add(
        NAT,
        REDIRECT,
        "meta l4proto tcp",
        COUNTER,
        "redirect to",
        f":{c.o.proxy_port}",
        why="outbound capture: send to the proxy's outbound port (-p)",
    )
    b.add(
        NAT,
        IN_REDIRECT,
        "meta l4proto tcp",
        COUNTER,
        "redirect to",
        f":{c.o.inbound_capture_port}",
        why="inbound capture: send to the proxy's inbound port (-z)",
    )


def _inbound(b: _Builder, c: _Context) -> None:
    """G: inbound capture of the -b ports, by redirect (nat) or TPROXY (mangle)."""
    o = c.o
    if o.inbound_ports.empty:
        return
    table = NAT
    if o.tproxy:
        _tproxy_chains(b, c)
        table = MANGLE
    b.add(
        table,
        PREROUTING,
        "meta l4proto tcp",
        COUNTER,
        "jump",
        INBOUND,
        why="inbound TCP enters istio-inbound",
    )
    if o.inbound_ports.wildcard:
        for port in o.local_exclude_ports:  # -d only applies with -b '*'
            b.add(
                table,
                INBOUND,
                "meta l4proto tcp",
                "tcp dport",
                str(port),
                COUNTER,
                "return",
                why="inbound port excluded by -d",
            )
        _capture_inbound(b, c, ())
    else:
        for included in o.inbound_ports.items:
            _capture_inbound(b, c, ("tcp dport", included))


def _tproxy_chains(b: _Builder, c: _Context) -> None:
    b.add(
        MANGLE,
        DIVERT,
        COUNTER,
        "meta mark set",
        c.mark,
        why="TPROXY: mark packets of established inbound flows",
    )
    b.add(MANGLE, DIVERT, COUNTER, "accept", why="TPROXY: established inbound flows pass")
    why = "TPROXY: deliver inbound TCP to the proxy's inbound port, source kept"
    port = f":{c.o.inbound_capture_port}"
    # Istio's token order: the mark statement comes before `counter accept`.
    b.add(
        MANGLE,
        TPROXY,
        "meta l4proto tcp",
        "ip daddr",
        "!=",
        c.lb4,
        "tproxy ip to",
        port,
        "meta mark set",
        c.mark,
        COUNTER,
        "accept",
        why=why,
    )
    b.add_v6(
        MANGLE,
        TPROXY,
        "meta l4proto tcp",
        "ip6 daddr",
        "!=",
        LB6,
        "tproxy ip6 to",
        port,
        "meta mark set",
        c.mark,
        COUNTER,
        "accept",
        why=why,
    )


def _capture_inbound(b: _Builder, c: _Context, port: tuple[str, ...]) -> None:
    which = f"port {port[1]}" if port else "every port"
    if not c.o.tproxy:
        b.add(
            NAT,
            INBOUND,
            "meta l4proto tcp",
            *port,
            COUNTER,
            "jump",
            IN_REDIRECT,
            why=f"inbound TCP on {which} is captured",
        )
        return
    # nft order differs from iptables: `ct state` comes before the port match.
    b.add(
        MANGLE,
        INBOUND,
        "meta l4proto tcp",
        "ct state",
        "related,established",
        *port,
        COUNTER,
        "jump",
        DIVERT,
        why=f"TPROXY: established inbound flow on {which} is marked",
    )
    b.add(
        MANGLE,
        INBOUND,
        "meta l4proto tcp",
        *port,
        COUNTER,
        "jump",
        TPROXY,
        why=f"TPROXY: new inbound connection on {which} is captured",
    )


def _output_jump(b: _Builder, c: _Context) -> None:
    """H: all locally generated traffic enters istio-output (UDP is filtered inside)."""
    b.add(
        NAT,
        OUTPUT,
        COUNTER,
        "jump",
        ISTIO_OUTPUT,
        why="locally generated traffic enters istio-output",
    )


def _outbound_port_excludes(b: _Builder, c: _Context) -> None:
    """I: -o ports are never captured, TCP or UDP."""
    for port in c.o.outbound_ports_exclude:
        for proto in ("tcp", "udp"):
            b.add(
                NAT,
                ISTIO_OUTPUT,
                f"{proto} dport",
                str(port),
                COUNTER,
                "return",
                why="outbound port excluded by -o",
            )


def _passthrough_source(b: _Builder, c: _Context) -> None:
    """J: the proxy's inbound passthrough source (127.0.0.6 / ::6) is never recaptured."""
    why = "inbound passthrough traffic from the proxy (source 127.0.0.6/::6)"
    b.add(
        NAT, ISTIO_OUTPUT, "oifname", "lo", "ip saddr", "127.0.0.6/32", COUNTER, "return", why=why
    )
    b.add_v6(NAT, ISTIO_OUTPUT, "oifname", "lo", "ip6 saddr", "::6/128", COUNTER, "return", why=why)


def _proxy_owners(b: _Builder, c: _Context) -> None:
    """K-L: the proxy's own traffic is not captured, except to the pod's own IP (goes inbound)."""
    for uid in c.o.proxy_uids:
        _owner_rules(b, c, "skuid", uid, dns_ports=c.redirect_dns)
    for gid in c.o.proxy_gids:
        # As in iptables, Istio's GID rule never takes the DNS port-set form (the goldens).
        _owner_rules(b, c, "skgid", gid, dns_ports=False)


def _owner_rules(b: _Builder, c: _Context, match: str, owner: str, dns_ports: bool) -> None:
    _owner_to_local_address(b, c, match, owner, dns_ports)
    if not c.o.service_cidr.has_loopback():  # an explicit loopback -i range turns this off
        _app_over_loopback(b, c, match, owner)
    why = f"the proxy's own outbound traffic ({match} {owner}) is not captured"
    b.add(NAT, ISTIO_OUTPUT, match, owner, COUNTER, "return", why=why)


def _owner_to_local_address(
    b: _Builder, c: _Context, match: str, owner: str, dns_ports: bool
) -> None:
    # With DNS capture, port 53 is also skipped: an anonymous set `{ 53, <tunnel> }`.
    ports = f"{{ {DNS_PORT}, {c.tunnel} }}" if dns_ports else c.tunnel
    why = f"proxy ({match} {owner}) to a local non-loopback address goes inbound"
    lo = ("oifname", "lo", "meta l4proto tcp")
    tail = ("tcp dport", "!=", ports, match, owner, COUNTER, "jump", IN_REDIRECT)
    b.add(NAT, ISTIO_OUTPUT, *lo, "ip daddr", "!=", c.lb4, *tail, why=why)
    b.add_v6(NAT, ISTIO_OUTPUT, *lo, "ip6 daddr", "!=", LB6, *tail, why=why)


def _app_over_loopback(b: _Builder, c: _Context, match: str, owner: str) -> None:
    # With DNS capture, TCP to port 53 over lo stays capturable (a DNS server on localhost).
    dns = ("meta l4proto tcp", "tcp dport", "!=", DNS_PORT) if c.redirect_dns else ()
    why = f"app traffic over lo is not captured ({match} != {owner})"
    b.add(NAT, ISTIO_OUTPUT, "oifname", "lo", *dns, match, "!=", owner, COUNTER, "return", why=why)


def _owner_groups(b: _Builder, c: _Context) -> None:
    """M: ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE) select which groups' traffic is captured."""
    include = c.o.owner_groups_include
    if include.wildcard:
        for gid in c.o.owner_groups_exclude:
            b.add(
                NAT,
                ISTIO_OUTPUT,
                "skgid",
                gid,
                COUNTER,
                "return",
                why="owner group excluded by ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            )
        return
    # One rule `skgid != g1 skgid != g2 ... counter return`; with no groups at all it is a
    # bare `counter return`, which turns off all outbound capture (as in iptables).
    none_of = [token for gid in include.items for token in ("skgid", "!=", gid)]
    b.add(
        NAT,
        ISTIO_OUTPUT,
        *none_of,
        COUNTER,
        "return",
        why="only groups in ISTIO_OUTBOUND_OWNER_GROUPS are captured",
    )


def _dns(b: _Builder, c: _Context) -> None:
    """N: DNS to the proxy's port 15053, with conntrack zones that keep UDP flows apart."""
    if not c.redirect_dns:
        return
    o = c.o
    b.add(RAW, OUTPUT, COUNTER, "jump", OUTPUT_DNS, why="DNS conntrack zoning")
    # One inet jump for both families, added if there is anything to capture at all (even when
    # the only servers are IPv6 ones and IPv6 is off: then the chain stays empty, Istio's bug).
    if o.capture_all_dns or o.dns_servers_v4 or o.dns_servers_v6:
        why = "DNS traffic is checked for capture"
        b.add(NAT, ISTIO_OUTPUT, COUNTER, "jump", OUTPUT_DNS, why=why)
    for proto in ("tcp", "udp"):
        _dns_redirect(b, c, proto)
    _dns_zones(b, c)


def _dns_redirect(b: _Builder, c: _Context, proto: str) -> None:
    to = ("redirect", "to", f":{DNS_PROXY_PORT}")
    if c.o.capture_all_dns:
        # Only the TCP rule carries `meta l4proto tcp` (Istio's tokens).
        l4 = ("meta l4proto tcp",) if proto == "tcp" else ()
        b.add(
            NAT,
            OUTPUT_DNS,
            *l4,
            f"{proto} dport",
            DNS_PORT,
            COUNTER,
            *to,
            why=f"DNS over {proto} to any server goes to the proxy",
        )
        return
    # Per server, the address match comes before the port match (unlike the raw zone rules).
    for server in c.o.dns_servers_v4:
        b.add(
            NAT,
            OUTPUT_DNS,
            "ip daddr",
            f"{server}/32",
            f"{proto} dport",
            DNS_PORT,
            COUNTER,
            *to,
            why=f"DNS over {proto} to {server} goes to the proxy",
        )
    for server in c.o.dns_servers_v6:
        b.add_v6(
            NAT,
            OUTPUT_DNS,
            "ip6 daddr",
            f"{server}/128",
            f"{proto} dport",
            DNS_PORT,
            COUNTER,
            *to,
            why=f"DNS over {proto} to {server} goes to the proxy",
        )


def _dns_zones(b: _Builder, c: _Context) -> None:
    o = c.o
    owners = [("skuid", u) for u in o.proxy_uids] + [("skgid", g) for g in o.proxy_gids]
    for match, owner in owners:
        # Spelled `meta skuid` here (nat rules say plain `skuid`).
        b.add(
            RAW,
            OUTPUT_DNS,
            "udp dport",
            DNS_PORT,
            "meta",
            match,
            owner,
            COUNTER,
            "ct zone set 1",
            why="the proxy's upstream DNS queries use conntrack zone 1",
        )
        b.add(
            RAW,
            OUTPUT_DNS,
            "udp sport",
            DNS_PROXY_PORT,
            "meta",
            match,
            owner,
            COUNTER,
            "ct zone set 2",
            why="the proxy's DNS answers to the app use conntrack zone 2",
        )
    if o.capture_all_dns:
        _dns_zones_all(b)
    else:
        _dns_zones_per_server(b, c)


def _dns_zones_all(b: _Builder) -> None:
    b.add(RAW, PREROUTING, COUNTER, "jump", INBOUND, why="DNS answers enter the raw inbound chain")
    b.add(
        RAW,
        OUTPUT_DNS,
        "udp dport",
        DNS_PORT,
        COUNTER,
        "ct zone set 2",
        why="the app's DNS queries use conntrack zone 2",
    )
    b.add(
        RAW,
        INBOUND,
        "udp sport",
        DNS_PORT,
        COUNTER,
        "ct zone set 1",
        why="upstream DNS answers use conntrack zone 1",
    )


def _dns_zones_per_server(b: _Builder, c: _Context) -> None:
    o = c.o
    # One inet jump if there is any server (iptables adds one per family with servers).
    if o.dns_servers_v4 or o.dns_servers_v6:
        why = "DNS answers enter the raw inbound chain"
        b.add(RAW, PREROUTING, COUNTER, "jump", INBOUND, why=why)
    for server in o.dns_servers_v4:
        _dns_server_zones(b.add, "ip", f"{server}/32", server)
    for server in o.dns_servers_v6:
        _dns_server_zones(b.add_v6, "ip6", f"{server}/128", server)


def _dns_server_zones(add: _Add, ip: str, prefix: str, server: str) -> None:
    add(
        RAW,
        OUTPUT_DNS,
        "udp dport",
        DNS_PORT,
        f"{ip} daddr",
        prefix,
        COUNTER,
        "ct zone set 2",
        why=f"the app's DNS queries to {server} use conntrack zone 2",
    )
    add(
        RAW,
        INBOUND,
        "udp sport",
        DNS_PORT,
        f"{ip} saddr",
        prefix,
        COUNTER,
        "ct zone set 1",
        why=f"DNS answers from {server} use conntrack zone 1",
    )


def _loopback_return(b: _Builder, c: _Context) -> None:
    """O: traffic to the loopback address itself is never captured."""
    why = "traffic to loopback is not captured"
    b.add(NAT, ISTIO_OUTPUT, "ip daddr", c.lb4, COUNTER, "return", why=why)
    b.add_v6(NAT, ISTIO_OUTPUT, "ip6 daddr", LB6, COUNTER, "return", why=why)


def _outbound_cidr_excludes(b: _Builder, c: _Context) -> None:
    """P: -x CIDRs are never captured."""
    for cidr, what in _cidr_matches(c, "exclude", "ip"):
        b.add(NAT, ISTIO_OUTPUT, "ip daddr", cidr, COUNTER, "return", why=f"{what} excluded by -x")
    for cidr, what in _cidr_matches(c, "exclude", "ip6"):
        why = f"{what} excluded by -x"
        b.add_v6(NAT, ISTIO_OUTPUT, "ip6 daddr", cidr, COUNTER, "return", why=why)


def _outbound_ports(b: _Builder, c: _Context) -> None:
    """Q: -q ports are always captured, whatever the destination."""
    for port in c.o.outbound_ports:
        b.add(
            NAT,
            ISTIO_OUTPUT,
            "tcp dport",
            str(port),
            COUNTER,
            "jump",
            REDIRECT,
            why=f"outbound TCP port {port} is always captured (-q)",
        )


def _outbound_include(b: _Builder, c: _Context) -> None:
    """R: -i CIDRs (or '*') are captured; KubeVirt interfaces' traffic to them too."""
    cidrs = c.o.service_cidr
    nics = c.o.kube_virt_interfaces
    if cidrs.wildcard:
        # One inet rule for both families (iptables adds one per family).
        why = "all other outbound traffic is captured (-i '*')"
        b.add(NAT, ISTIO_OUTPUT, COUNTER, "jump", REDIRECT, why=why)
        for nic in nics:
            why = f"traffic from virtual interface {nic} is captured as outbound"
            b.insert(NAT, PREROUTING, 0, "iifname", nic, COUNTER, "jump", REDIRECT, why=why)
        return
    families: tuple[tuple[str, _Add, _Insert], ...] = (
        ("ip", b.add, b.insert),
        ("ip6", b.add_v6, b.insert_v6),  # v6 rules only when IPv6 is on
    )
    for ip, add, insert in families:
        for cidr, what in _cidr_matches(c, "include", ip):
            to_cidr = (f"{ip} daddr", cidr, COUNTER, "jump", REDIRECT)
            for nic in nics:
                why = f"traffic from virtual interface {nic} to {what} is captured"
                insert(NAT, PREROUTING, 0, "iifname", nic, *to_cidr, why=why)
            why = f"outbound to {what} is captured (-i)"
            add(NAT, ISTIO_OUTPUT, f"{ip} daddr", cidr, COUNTER, "jump", REDIRECT, why=why)


def _tproxy_extras(b: _Builder, c: _Context) -> None:
    """S: TPROXY marks and returns (emitted whenever mode is TPROXY, even with empty -b)."""
    if not c.o.tproxy:
        return
    mark = c.mark
    b.add(
        MANGLE,
        PREROUTING,
        "meta l4proto tcp",
        "mark",
        mark,
        COUNTER,
        "ct mark set mark",
        why="TPROXY: remember the mark on the connection",
    )
    b.add(
        MANGLE,
        OUTPUT,
        "oifname",
        "lo",
        "meta l4proto tcp",
        "mark",
        mark,
        COUNTER,
        "return",
        why="TPROXY: marked loopback traffic passes",
    )
    why = "TPROXY: the proxy's traffic to local addresses is marked 1338"
    for match, owners in (("skuid", c.o.proxy_uids), ("skgid", c.o.proxy_gids)):
        for owner in owners:
            tail = (match, owner, COUNTER, "meta mark set", OUTBOUND_MARK)
            lo = ("oifname", "lo", "meta l4proto tcp")
            b.add(MANGLE, OUTPUT, *lo, "ip daddr", "!=", c.lb4, *tail, why=why)
            b.add_v6(MANGLE, OUTPUT, *lo, "ip6 daddr", "!=", LB6, *tail, why=why)
    b.add(
        MANGLE,
        OUTPUT,
        "meta l4proto tcp",
        "ct mark",
        mark,
        COUNTER,
        "meta mark set ct mark",
        why="TPROXY: replies of captured connections get the mark back",
    )
    _tproxy_inbound_returns(b, mark)


def _tproxy_inbound_returns(b: _Builder, mark: str) -> None:
    """The three head-of-chain returns of mangle istio-inbound (iptables `-I 1/2/3`).

    Quirk kept: the IPv4 127.0.0.6 rule and the IPv6 ::6 rule are *both* inserted at index 1,
    so with IPv6 the final order is mark, ::6, mark != 1338, 127.0.0.6 (iptables v4: mark,
    127.0.0.6, mark != 1338). Each verdict is `return`, so the result is the same.
    """
    b.insert(
        MANGLE,
        INBOUND,
        0,
        "meta l4proto tcp",
        "mark",
        mark,
        COUNTER,
        "return",
        why="TPROXY: already-marked traffic is not captured again",
    )
    why = "TPROXY: the proxy's passthrough traffic is not captured"
    lo = ("iifname", "lo", "meta l4proto tcp")
    b.insert(MANGLE, INBOUND, 1, *lo, "ip saddr", "127.0.0.6/32", COUNTER, "return", why=why)
    b.insert_v6(MANGLE, INBOUND, 1, *lo, "ip6 saddr", "::6/128", COUNTER, "return", why=why)
    b.insert(
        MANGLE,
        INBOUND,
        2,
        *lo,
        "mark",
        "!=",
        OUTBOUND_MARK,
        COUNTER,
        "return",
        why="TPROXY: loopback traffic not marked by the proxy is not captured",
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
