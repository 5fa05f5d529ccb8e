"""nft's listings of meshnet's tables, read and compared: what `nft list table` prints, per
chain, counters zeroed, and the readable differences between two such listings (or, when no
private namespace can print the plan, between a listing and the plan's rule counts)."""

from __future__ import annotations

import re

from meshnet.plan.nftables import TABLES, NftRuleset

Listing = dict[str, list[str]]  # chain -> its lines, as `nft list table` prints them
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


def diff_counts(ruleset: NftRuleset, live: dict[str, Listing | None]) -> list[str]:
    planned = ruleset.chains()
    lines: list[str] = []
    for table in TABLES:
        plan_table = ruleset.table(table)
        have = live.get(table)
        if plan_table is None or have is None:
            if (plan_table is None) != (have is None):
                lines.append(f"{'unexpected' if plan_table is None else 'missing'} table {table}")
            continue
        want = {name: len(rules) for name, rules in planned.get(table, {}).items()}
        want.update({f"set {s.name}": -1 for s in plan_table.sets})
        lines += [f"{table}: missing {name}" for name in want if name not in have]
        lines += [f"{table}: unexpected {name}" for name in have if name not in want]
        lines += [
            f"{table} {name}: {len(have[name])} rules, {count} planned"
            for name, count in want.items()
            if count >= 0 and name in have and len(have[name]) != count + _header(have, name)
        ]
    return lines


def _header(have: Listing, name: str) -> int:
    """Base chains list their `type ... hook ...` line before the rules."""
    return 1 if have[name] and have[name][0].startswith("type ") else 0


def parse(listing: str | None) -> Listing | None:
    if listing is None:
        return None
    chains: Listing = {}
    current: list[str] | None = None
    for raw in listing.splitlines():
        line = _COUNTER.sub("counter", raw.strip())
        if line.startswith(("chain ", "set ")):  # sets (--cidr-sets) are compared too
            kind, name = line.split()[:2]
            current = chains.setdefault(name if kind == "chain" else f"set {name}", [])
        elif line == "}":
            current = None
        elif current is not None and line:
            current.append(line)
    return chains


def diff(expected: dict[str, Listing | None], live: dict[str, Listing | None]) -> list[str]:
    """Readable differences, per table and chain."""
    lines: list[str] = []
    for table in TABLES:
        want, have = expected.get(table), live.get(table)
        if want is None and have is not None:
            lines.append(f"unexpected table inet {table}")
        elif want is not None and have is None:
            lines.append(f"missing table inet {table}")
        elif want is not None and have is not None:
            lines += _diff_table(table, want, have)
    return lines


def _diff_table(table: str, want: Listing, have: Listing) -> list[str]:
    lines = [f"{table}: missing chain {c}" for c in want if c not in have]
    lines += [f"{table}: unexpected chain {c}" for c in have if c not in want]
    for chain in (c for c in want if c in have):
        missing = [r for r in want[chain] if r not in have[chain]]
        extra = [r for r in have[chain] if r not in want[chain]]
        lines += [f"{table} {chain}: missing rule: {r}" for r in missing]
        lines += [f"{table} {chain}: unexpected rule: {r}" for r in extra]
        if not missing and not extra and want[chain] != have[chain]:
            lines.append(f"{table} {chain}: rules out of order")
    return lines
