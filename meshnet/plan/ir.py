"""The rule IR: Istio's capture rules as typed matches and targets, before any rule language.

`meshnet.plan.steps` writes Istio's algorithm once, as IR; `meshnet.plan.iptables` lowers it to
iptables-restore rules and `meshnet.plan.nftables` to Istio's nft transaction. A rule's
matches are kept in the order Istio's iptables builder writes them; nft's order is the
lowering's business.

Two small classes (a match and a target with a `kind`) rather than one class per kind, and
NamedTuples rather than frozen dataclasses: the init container imports this on every pod start,
and creating a frozen dataclass costs ~0.5 ms at import, a NamedTuple ~0.07 ms (measured here).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from meshnet.plan.model import Family, IpSet

Scope = Literal["both", "ipv4", "ipv6"]  # the families a rule is planned for
Table = Literal["nat", "mangle", "raw"]
OwnerKind = Literal["uid", "gid"]
MatchKind = Literal[
    "proto",  # -p / meta l4proto
    "iif",  # -i / iifname
    "oif",  # -o / oifname
    "src",  # -s / ip saddr
    "dst",  # -d / ip daddr
    "dst-set",  # -m set --match-set NAME dst / ip daddr @NAME (--cidr-sets)
    "sport",  # --sport / tcp sport
    "dport",  # --dport, -m multiport --dports / tcp dport, tcp dport { ... }
    "uid",  # -m owner --uid-owner / skuid
    "gid",  # -m owner --gid-owner / skgid
    "ctstate",  # -m conntrack --ctstate / ct state
    "mark",  # -m mark --mark / mark
    "connmark",  # -m connmark --mark / ct mark
    "nfproto",  # meta nfproto (nft only: meshnet's IPv6 guard with IPv6 off)
]
TargetKind = Literal[
    "jump",  # to a chain of the plan
    "return",
    "accept",
    "drop",
    "redirect",  # to `port` on the local host
    "tproxy",  # to `port`, setting `mark`
    "set-mark",
    "save-mark",  # connection mark <- packet mark
    "restore-mark",  # packet mark <- connection mark
    "zone",  # conntrack zone
]


class Match(NamedTuple):
    """One condition. `values` holds one value, except a port list (multiport) and ct states.
    `proto` is the protocol of a port match. `nft_only`: Istio's nft rule has this match and
    its iptables rule does not (the lowerings say where)."""

    kind: MatchKind
    values: tuple[str, ...]
    negated: bool = False
    proto: str = ""
    nft_only: bool = False

    @property
    def value(self) -> str:
        return self.values[0]


class Target(NamedTuple):
    """What a rule does: `chain` for a jump, `port` for redirect/tproxy, `mark` for tproxy and
    set-mark, `zone` for a conntrack zone."""

    kind: TargetKind
    chain: str = ""
    port: str = ""
    mark: str = ""
    zone: str = ""


class Rule(NamedTuple):
    """One rule of Istio's plan, with the reason it exists.

    `chain` is Istio's iptables chain name (the nft lowering renames it). `insert_at` is the
    1-based position of an iptables `-I CHAIN N`; None appends. `scope` is the families Istio's
    iptables plan writes the rule for; a rule with an address match is for that address's family.
    """

    table: Table
    chain: str
    matches: tuple[Match, ...]
    target: Target
    reason: str
    scope: Scope = "both"
    insert_at: int | None = None

    @property
    def has_address(self) -> bool:
        return any(m.kind in ("src", "dst", "dst-set") for m in self.matches)


class Plan(NamedTuple):
    """Istio's rules for one set of options, in the order Istio's builders emit them."""

    rules: tuple[Rule, ...]
    ipv6_enabled: bool
    cleanup_only: bool = False
    warnings: tuple[str, ...] = ()
    ipsets: tuple[IpSet, ...] = ()

    def for_family(self, family: Family) -> tuple[Rule, ...]:
        """The rules Istio's iptables plan writes for one family."""
        return tuple(r for r in self.rules if r.scope in ("both", family))


def planned(source: Rule | None) -> Rule:
    """The IR rule a lowered rule came from; ValueError for a rule read back from the kernel
    (explain and dot draw plans, not live state)."""
    if source is None:
        raise ValueError("only planned rules carry their IR rule (this one was read back)")
    return source


# Constructors the steps use; short, because the steps are read side by side with Istio's.


def proto(name: str, *, nft_only: bool = False) -> Match:
    return Match("proto", (name,), nft_only=nft_only)


def dport(proto_name: str, *ports: str, negated: bool = False) -> Match:
    return Match("dport", ports, negated, proto_name)


def sport(proto_name: str, port: str) -> Match:
    return Match("sport", (port,), proto=proto_name)


def iif(name: str) -> Match:
    return Match("iif", (name,))


def oif(name: str) -> Match:
    return Match("oif", (name,))


def src(cidr: str) -> Match:
    return Match("src", (cidr,))


def dst(cidr: str, *, negated: bool = False) -> Match:
    return Match("dst", (cidr,), negated)


def dst_set(name: str) -> Match:
    return Match("dst-set", (name,))


def owner(kind: OwnerKind, value: str, *, negated: bool = False) -> Match:
    return Match(kind, (value,), negated)


def ctstate(*states: str) -> Match:
    return Match("ctstate", states)


def mark(value: str, *, negated: bool = False) -> Match:
    return Match("mark", (value,), negated)


def connmark(value: str) -> Match:
    return Match("connmark", (value,))


def jump(chain: str) -> Target:
    return Target("jump", chain=chain)


RETURN = Target("return")
ACCEPT = Target("accept")
DROP = Target("drop")
SAVE_MARK = Target("save-mark")
RESTORE_MARK = Target("restore-mark")


def redirect(port: str) -> Target:
    return Target("redirect", port=port)


def tproxy(port: str, mark_value: str) -> Target:
    return Target("tproxy", port=port, mark=mark_value)


def set_mark(value: str) -> Target:
    return Target("set-mark", mark=value)


def zone(number: str) -> Target:
    return Target("zone", zone=number)
