"""The rule model as JSON: every rule with its reason, in emission and in final chain order."""

from __future__ import annotations

import json
from typing import Any

from meshnet.plan.model import Family, Ruleset


def render(ruleset: Ruleset) -> str:
    document: dict[str, Any] = {
        "ipv6_enabled": ruleset.ipv6_enabled,
        "warnings": list(ruleset.warnings),
        "families": {family: _family(ruleset, family) for family in ruleset.families()},
    }
    if ruleset.ipsets:  # --cidr-sets only, so Istio-compatible plans keep their shape
        document["ipsets"] = [
            {"name": s.name, "family": s.family, "members": list(s.members)} for s in ruleset.ipsets
        ]
    return json.dumps(document, indent=2) + "\n"


def _family(ruleset: Ruleset, family: Family) -> dict[str, Any]:
    tables = ruleset.chains(family)
    declared = ruleset.user_chains(family)
    return {
        "tables": {
            table: {
                "new_chains": declared.get(table, []),
                "chains": {
                    chain: [{"rule": " ".join(r.append_form()), "reason": r.reason} for r in rules]
                    for chain, rules in chains.items()
                },
            }
            for table, chains in sorted(tables.items())
        },
    }
