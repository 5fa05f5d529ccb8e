"""Istio's dry-run transcript: what its stub executor records.

The stub is `tools/istio-iptables/pkg/dependencies/stub.go`.

With the stub every `*-save` returns nothing, so the state check always sees a clean namespace
and the planned rules are "applied"; with --cleanup-only the cleanup commands are recorded.
"""

from __future__ import annotations

from meshnet.plan.cleanup import cleanup_commands
from meshnet.plan.model import Ruleset
from meshnet.render.restore import restore_lines

_BINARY = {"ipv4": "iptables", "ipv6": "ip6tables"}


def render(ruleset: Ruleset, *, cleanup_only: bool = False) -> str:
    lines = ["iptables-save", "ip6tables-save"]  # the state check always saves both families
    for family in ruleset.families():
        if cleanup_only:
            binary = _BINARY[family]
            lines += [
                f"{binary} {' '.join(cmd)}" for cmd in cleanup_commands(ruleset.rules(family))
            ]
        else:
            lines += restore_lines(ruleset.rules(family))
    lines += [f"{_BINARY[family]}-save" for family in ruleset.families()]  # final state dump
    return "\n".join(lines) + "\n"
