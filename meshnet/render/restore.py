"""iptables-restore input, built exactly as Istio's buildRestore does.

buildRestore is in `tools/istio-iptables/pkg/builder/iptables_builder_impl.go`.

iptables-restore splits a line on whitespace, reads `"` as quoting and `\\` as an escape, and
ends a rule at a newline (NUL or CR confuse it too): a token holding any of them would add
arguments, rules or whole tables. No planned token needs one, so such a token is refused here,
whatever let it through, rather than quoted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from meshnet.errors import UnsafeTextError
from meshnet.plan.model import TABLES, Rule, Ruleset, declared_chains

_UNSAFE = re.compile(r"[\s\"'\\\x00-\x1f\x7f-\x9f]")


def token(text: str) -> str:
    """`text` as one restore token; UnsafeTextError when it cannot be one."""
    if not text or _UNSAFE.search(text) or not text.isprintable():
        raise UnsafeTextError(f"refusing to write {text!r} into iptables-restore input")
    return text


def rule_line(rule: Rule) -> str:
    """`rule.line()`, every token checked, the table a known one."""
    if rule.table not in TABLES:
        raise UnsafeTextError(f"refusing to write rules for table {rule.table!r}")
    return " ".join(token(part) for part in rule.params())


def restore_lines(rules: Sequence[Rule]) -> list[str]:
    """One family's restore input as lines: tables sorted, `* <table>`, -N, rules, COMMIT."""
    unknown = {rule.table for rule in rules} - set(TABLES)
    if unknown:
        raise UnsafeTextError(f"refusing to write rules for tables {sorted(unknown)!r}")
    chains = declared_chains(rules)
    lines: list[str] = []
    for table in TABLES:  # already in sorted order: filter, mangle, nat, raw
        body = [f"-N {token(chain)}" for chain in chains.get(table, [])]
        body += [rule_line(rule) for rule in rules if rule.table == table]
        if body:
            lines += [f"* {table}", *body, "COMMIT"]
    return lines


def render(ruleset: Ruleset) -> str:
    """meshnet's `restore` format: one block per family, each introduced by `# ipv4`/`# ipv6`."""
    lines: list[str] = []
    for family in ruleset.families():
        lines.append(f"# {family}")
        lines += restore_lines(ruleset.rules(family))
    return "\n".join(lines) + "\n"
