"""The nft transaction text, exactly as Istio logs it: knftables v0.0.21 `tx.String()`.

One operation per line, in transaction order (SPEC-istio §3.7). This is also what `nft -f -`
reads, so the same text is printed by a dry run and piped to nft by the backend.
"""

from __future__ import annotations

from meshnet.nftplan import NftChain, NftRule, NftRuleset, NftSet, NftTable

FAMILY = "inet"  # every Istio table is inet: one rule serves IPv4 and IPv6


def render(ruleset: NftRuleset) -> str:
    """The whole transaction; empty when it has no operations."""
    lines = [line for table in ruleset.tables for line in table_lines(table)]
    return "".join(f"{line}\n" for line in lines)


def table_lines(table: NftTable) -> list[str]:
    """One table's operations: rebuild (add, flush, chains, rules) or delete (add, delete)."""
    head = f"{FAMILY} {table.name}"
    if table.action == "delete":
        # Adding first makes the delete succeed whether or not the table exists.
        return [f"add table {head}", f"delete table {head}"]
    lines = [f"add table {head}", f"flush table {head}"]
    lines += [f"add chain {head} {chain_declaration(chain)}" for chain in table.chains]
    for named in table.sets:  # meshnet's --cidr-sets only; declared before the rules use them
        lines += set_lines(head, named)
    lines += [rule_line(rule) for rule in table.rules]
    return lines


def set_lines(head: str, named: NftSet) -> list[str]:
    """An interval set (auto-merge: overlapping CIDRs are fine) and its elements."""
    return [
        f"add set {head} {named.name} {{ type {named.type} ; flags interval ; auto-merge ; }}",
        f"add element {head} {named.name} {{ {', '.join(named.members)} }}",
    ]


def chain_declaration(chain: NftChain) -> str:
    """`name`, or for a base chain `name { type T hook H priority N ; }` (knftables' spacing)."""
    if not chain.is_base:
        return chain.name
    return f"{chain.name} {{ type {chain.type} hook {chain.hook} priority {chain.priority} ; }}"


def rule_line(rule: NftRule) -> str:
    """`add rule inet T C <rule>` or `insert rule inet T C index N <rule>`."""
    where = f"{FAMILY} {rule.table} {rule.chain}"
    if rule.index is None:
        return f"add rule {where} {rule.text}"
    return f"insert rule {where} index {rule.index} {rule.text}"
