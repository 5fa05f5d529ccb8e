"""A simulated `nft -f`: the test oracle for meshnet's nft transaction text (no kernel needed)."""

from __future__ import annotations

Chains = dict[str, dict[str, list[str]]]


def simulate(text: str) -> Chains:
    """Apply a transaction text to an empty nft state.

    `add rule` appends; `insert rule ... index N` puts the rule before rule N, which must exist
    (nft refuses otherwise). A rule for an undeclared chain is an error, as in nft.
    """
    tables: Chains = {}
    for line in text.splitlines():
        words = line.split(" ")
        verb, kind, family, table = words[:4]
        assert family == "inet", line
        if kind == "table":
            if verb == "add":
                tables.setdefault(table, {})
            elif verb == "flush":
                for rules in tables[table].values():
                    rules.clear()
            else:
                assert verb == "delete", line
                del tables[table]
        elif kind == "chain":
            assert verb == "add", line
            tables[table].setdefault(words[4], [])
        else:
            assert kind == "rule", line
            rules = tables[table][words[4]]
            if verb == "add":
                rules.append(" ".join(words[5:]))
            else:
                assert verb == "insert" and words[5] == "index", line
                index = int(words[6])
                assert 0 <= index < len(rules), f"nft would refuse: {line}"
                rules.insert(index, " ".join(words[7:]))
    return tables


# --- insert-index conversion ------------------------------------------------------------------
