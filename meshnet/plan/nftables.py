"""The IR lowered to Istio's native nftables transaction (`tools/istio-nftables`).

The rule text is the `knftables.Concat` of Istio's tokens, which fixes match order and the
`counter` position byte for byte (e.g. `ip daddr 127.0.0.53/32 tcp dport 53 counter redirect to
:15053`). Where Istio's nft rules differ from its iptables ones, it is said here:
- three `inet` tables (`istio-proxy-nat`, `-mangle`, `-raw`), chains renamed (`ISTIO_OUTPUT` ->
  `istio-output`); a rule without an address match is added once and covers both families (an
  iptables rule per family becomes one rule); a rule with an `ip6` address only with IPv6 on;
- matches in a fixed order (`_ORDER`: interface, protocol, ct state, address, port, owner,
  mark), except in the raw table, where Istio's nft rules keep the iptables order; owners are
  `meta skuid` in raw and `skuid` elsewhere;
- inserts use 0-based indexes, and Istio turns an insert whose index is not below the number of
  rules already added to that chain *in this transaction* into an append (`_transaction`);
- chains come from a fixed per-table list, and only those that receive a rule are created.

One difference from Istio, on purpose: with IPv6 off, every base chain starts with
`meta nfproto ipv6 counter return` (`_ipv4_only`), so that IPv6 is left alone as in iptables mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from meshnet.config.options import Options
from meshnet.plan import ir, steps
from meshnet.plan.ir import Match

# Istio's table names (tools/istio-nftables/pkg/constants).
NAT = "istio-proxy-nat"
MANGLE = "istio-proxy-mangle"
RAW = "istio-proxy-raw"
TABLES: tuple[str, ...] = (NAT, MANGLE, RAW)  # transaction order
_TABLE: dict[ir.Table, str] = {"nat": NAT, "mangle": MANGLE, "raw": RAW}
_SHORT = {name: short for short, name in _TABLE.items()}  # istio-proxy-nat -> nat
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
    # The plan's rule this was lowered from (explain and dot read it).
    source: ir.Rule | None = field(default=None, compare=False, repr=False)

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


def chain_name(iptables_name: str) -> str:
    """Istio's nft name of a chain: `ISTIO_IN_REDIRECT` -> `istio-in-redirect`."""
    return iptables_name.lower().replace("_", "-")


# The fixed chains of each table, in the order Istio adds them (addIstio*TableRules).
# knftables prints the priorities as numbers: dstnat = -100, mangle = -150, raw = -300.
_LAYOUT: dict[str, tuple[NftChain, ...]] = {
    NAT: (
        NftChain("prerouting", "nat", "prerouting", -100),
        NftChain("output", "nat", "output", -100),
        NftChain("istio-inbound"),
        NftChain("istio-redirect"),
        NftChain("istio-in-redirect"),
        NftChain("istio-output"),
        NftChain("istio-output-dns"),
    ),
    MANGLE: (
        NftChain("prerouting", "filter", "prerouting", -150),
        # A `route` chain, so that a mark set on output re-routes the packet (to the TPROXY
        # routing table) as iptables' mangle OUTPUT does.
        NftChain("output", "route", "output", -150),
        NftChain("istio-divert"),
        NftChain("istio-tproxy"),
        NftChain("istio-inbound"),
        NftChain("istio-drop"),
    ),
    RAW: (
        NftChain("prerouting", "filter", "prerouting", -300),
        NftChain("output", "filter", "output", -300),
        NftChain("istio-inbound"),
        NftChain("istio-output-dns"),
    ),
}


def lower(plan: ir.Plan) -> NftRuleset:
    """Istio's nftables transaction for this plan."""
    if plan.cleanup_only:
        # Istio still builds the rules, then ignores them: cleanup deletes whole tables.
        tables = tuple(NftTable(name, "delete") for name in TABLES)
        return NftRuleset(tables, plan.ipv6_enabled, plan.warnings)
    per_table: dict[str, list[NftRule]] = {name: [] for name in TABLES}
    for source in plan.rules:
        if source.scope != "ipv6" or plan.ipv6_enabled or not source.has_address:
            per_table[_TABLE[source.table]].append(rule(source))
    tables = tuple(
        table for name in TABLES if (table := _transaction(name, per_table[name])) is not None
    )
    if not plan.ipv6_enabled:
        tables = tuple(_ipv4_only(table) for table in tables)
    if tables and tables[0].name == NAT and plan.ipsets:
        tables = (replace(tables[0], sets=_sets(plan)), *tables[1:])
    return NftRuleset(tables, plan.ipv6_enabled, plan.warnings)


def _sets(plan: ir.Plan) -> tuple[NftSet, ...]:
    """The same sets as the iptables lowering's ipsets, as nft interval sets."""
    kinds = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}
    return tuple(NftSet(s.name, kinds[s.family], s.members) for s in plan.ipsets)


def rule(source: ir.Rule) -> NftRule:
    matched, verdict = parts(source)
    index = None if source.insert_at is None else source.insert_at - 1
    table, chain = _TABLE[source.table], chain_name(source.chain)
    return NftRule(table, chain, (*matched, *verdict), source.reason, index, index, source)


def parts(source: ir.Rule) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The rule's words: its matches, then its statements and verdict."""
    given = source.matches
    if source.table != "raw":
        given = tuple(sorted(given, key=lambda m: _ORDER[m.kind]))
    ip = "ip6" if source.scope == "ipv6" else "ip"
    owner = ("meta",) if source.table == "raw" else ()
    return tuple(w for m in given for w in _match(m, ip, owner)), _target(source.target, ip)


_ORDER = {
    "iif": 0,
    "oif": 0,
    "proto": 1,
    "nfproto": 1,
    "ctstate": 2,
    "src": 3,
    "dst": 3,
    "dst-set": 3,
}
_ORDER |= {"sport": 4, "dport": 4, "uid": 5, "gid": 5, "mark": 6, "connmark": 6}
_WORDS: dict[str, tuple[str, ...]] = {
    "iif": ("iifname",),
    "oif": ("oifname",),
    "uid": ("skuid",),
    "gid": ("skgid",),
}
_WORDS |= {"src": ("saddr",), "dst": ("daddr",), "mark": ("mark",), "connmark": ("ct", "mark")}


def _match(m: Match, ip: str, owner: tuple[str, ...]) -> tuple[str, ...]:
    bang = ("!=",) if m.negated else ()
    if m.kind == "proto":
        return ("meta", "l4proto", m.value)
    if m.kind == "nfproto":
        return ("meta", "nfproto", m.value)
    if m.kind == "ctstate":
        return ("ct", "state", ",".join(m.values))
    if m.kind == "dst-set":
        return (ip, "daddr", f"@{m.value}")
    if m.kind in ("sport", "dport"):
        return (m.proto, m.kind, *bang, *_values(m.values))
    prefix = (ip,) if m.kind in ("src", "dst") else owner if m.kind in ("uid", "gid") else ()
    return (*prefix, *_WORDS[m.kind], *bang, m.value)


def _values(values: tuple[str, ...]) -> tuple[str, ...]:
    """One value, or an anonymous set `{ 53, 15008 }` as Istio writes it."""
    if len(values) == 1:
        return values
    return ("{", *(f"{v}," for v in values[:-1]), values[-1], "}")


def _target(t: ir.Target, ip: str) -> tuple[str, ...]:
    if t.kind == "jump":
        return (COUNTER, "jump", chain_name(t.chain))
    if t.kind == "redirect":
        return (COUNTER, "redirect", "to", f":{t.port}")
    if t.kind == "tproxy":
        # Istio's token order: the mark statement comes before `counter accept`.
        return ("tproxy", ip, "to", f":{t.port}", "meta", "mark", "set", t.mark, COUNTER, "accept")
    if t.kind == "set-mark":
        return (COUNTER, "meta", "mark", "set", t.mark)
    if t.kind == "save-mark":
        return (COUNTER, "ct", "mark", "set", "mark")
    if t.kind == "restore-mark":
        return (COUNTER, "meta", "mark", "set", "ct", "mark")
    if t.kind == "zone":
        return (COUNTER, "ct", "zone", "set", t.zone)
    return (COUNTER, t.kind)  # return, accept, drop


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
    short = _SHORT[table.name]
    guards = tuple(
        rule(_guard(short, chain.name.upper())) for chain in table.chains if chain.is_base
    )
    return replace(table, rules=(*table.rules, *guards))


def _guard(table: ir.Table, chain: str) -> ir.Rule:
    why = "IPv6 is off: IPv6 packets are left alone, as ip6tables would be without rules"
    return ir.Rule(table, chain, (Match("nfproto", ("ipv6",)),), ir.RETURN, why, insert_at=1)


def ruleset(options: Options) -> NftRuleset:
    """Istio's nftables transaction for these options."""
    return lower(steps.plan(options))
