"""The commands that remove what a plan installs, as Istio's BuildCleanupV4/BuildCleanupV6.

Istio builds them in `tools/istio-iptables/pkg/builder/iptables_builder_impl.go`.

Only rules the same flags would produce are removed: the jumps into ISTIO_* chains and the rules
in built-in chains are deleted one by one, then the ISTIO_* chains are flushed and deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshnet.plan.model import PREDEFINED, Rule


def cleanup_commands(rules: Sequence[Rule]) -> list[tuple[str, ...]]:
    """`-t T -D ...` for each rule to undo (reverse order), then `-F`/`-X` per user chain."""
    reversed_rules = list(reversed(rules))
    commands: list[tuple[str, ...]] = []
    for rule in reversed_rules:
        in_istio_chain = rule.chain.startswith("ISTIO_")
        target = rule.jump_chain or ""
        if in_istio_chain and not target.startswith("ISTIO_"):
            continue  # flushed with its chain
        commands.append(("-t", rule.table, "-D", rule.chain, *rule.spec))
    seen: set[tuple[str, str]] = set()
    for rule in reversed_rules:
        key = (rule.chain, rule.table)
        if key in seen or rule.chain in PREDEFINED:
            continue
        seen.add(key)
        commands.append(("-t", rule.table, "-F", rule.chain))
        commands.append(("-t", rule.table, "-X", rule.chain))
    return commands
