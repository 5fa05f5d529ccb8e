"""The iptables rule model: what the iptables lowering produces and every renderer, check and
diff consumes.

A Ruleset keeps, per address family, the rules in the order Istio's builder emits them. That
order is observable (it is the restore text, byte for byte), so it is the primary data; the
final per-chain order after `-I` inserts is derived from it by `chains()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from meshnet.plan import ir

Family = Literal["ipv4", "ipv6"]
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
TABLES: tuple[str, ...] = ("filter", "mangle", "nat", "raw")  # sorted: the restore text's order
HOOKS: tuple[str, ...] = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")  # packet order
# Names a rule may use without `-N`: the built-in chains and the verdicts (Istio's buildRestore
# declares every other chain a rule is in or jumps to).
PREDEFINED = frozenset({*HOOKS, "ACCEPT", "RETURN", "DROP"})


@dataclass(frozen=True, slots=True)
class Rule:
    """One `-A` or `-I` line: table, chain, the tokens after the chain name, and why it exists."""

    table: str
    chain: str
    spec: tuple[str, ...]
    reason: str
    insert_at: int | None = None  # 1-based `-I CHAIN N`; None means `-A CHAIN`
    # The plan's rule this was lowered from (explain and dot read it); None when read back
    # from the kernel. Not part of equality: a planned rule equals its read-back form.
    source: ir.Rule | None = field(default=None, compare=False, repr=False)

    @property
    def jump_chain(self) -> str | None:
        """The target when it is the last token: a user chain or a bare verdict (Istio's test)."""
        if len(self.spec) >= 2 and self.spec[-2] == "-j":
            return self.spec[-1]
        return None

    def params(self) -> tuple[str, ...]:
        """The rule as Istio's builder holds it: `-A CHAIN ...` or `-I CHAIN N ...`."""
        if self.insert_at is None:
            return ("-A", self.chain, *self.spec)
        return ("-I", self.chain, str(self.insert_at), *self.spec)

    def line(self) -> str:
        return " ".join(self.params())

    def append_form(self) -> tuple[str, ...]:
        """The rule as `iptables-save` prints it once applied: always `-A CHAIN ...`."""
        return ("-A", self.chain, *self.spec)


@dataclass(frozen=True, slots=True)
class IpSet:
    """A set of CIDRs that rules match with `-m set --match-set NAME dst` (--cidr-sets)."""

    name: str
    family: Family
    members: tuple[str, ...]

    @property
    def kernel_family(self) -> str:
        return "inet6" if self.family == "ipv6" else "inet"


@dataclass(frozen=True, slots=True)
class Ruleset:
    """The planned rules of both families, in emission order."""

    ipv4: tuple[Rule, ...]
    ipv6: tuple[Rule, ...]
    ipv6_enabled: bool
    warnings: tuple[str, ...] = field(default=())
    ipsets: tuple[IpSet, ...] = field(default=())

    def sets(self, family: Family) -> tuple[IpSet, ...]:
        return tuple(s for s in self.ipsets if s.family == family)

    def rules(self, family: Family) -> tuple[Rule, ...]:
        return self.ipv4 if family == "ipv4" else self.ipv6

    def families(self) -> Iterator[Family]:
        """The families that get rules: IPv4 always, IPv6 when enabled."""
        yield "ipv4"
        if self.ipv6_enabled:
            yield "ipv6"

    def chains(self, family: Family) -> dict[str, dict[str, list[Rule]]]:
        """Final per-table, per-chain rule order after applying `-A` and `-I` in sequence."""
        tables: dict[str, dict[str, list[Rule]]] = {}
        for rule in self.rules(family):
            chain = tables.setdefault(rule.table, {}).setdefault(rule.chain, [])
            if rule.insert_at is None:
                chain.append(rule)
            else:
                chain.insert(rule.insert_at - 1, rule)
        return tables

    def user_chains(self, family: Family) -> dict[str, list[str]]:
        """Per table, the non-builtin chains the plan creates, in restore (`-N`) order."""
        return declared_chains(self.rules(family))


def declared_chains(rules: Sequence[Rule]) -> dict[str, list[str]]:
    """Per table, the `-N` chains in Istio's order: rule chains first, then jump targets."""
    seen: set[tuple[str, str]] = set()
    chains: dict[str, list[str]] = {}
    for rule in rules:  # first pass: chains that hold rules
        _declare(rule.chain, rule.table, seen, chains)
    for rule in rules:  # second pass: bare jump targets not seen yet
        target = rule.jump_chain
        if target is not None:
            _declare(target, rule.table, seen, chains)
    return chains


def _declare(
    chain: str, table: str, seen: set[tuple[str, str]], chains: dict[str, list[str]]
) -> None:
    if (chain, table) in seen:
        return
    seen.add((chain, table))
    if chain not in PREDEFINED:
        chains.setdefault(table, []).append(chain)
