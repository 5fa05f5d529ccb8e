"""A simulated iptables-restore: the test oracle for restore text (no kernel needed).

It applies one family's restore text to an empty state as iptables-restore would, refusing
what iptables-restore refuses, so that tests can check a rendered plan loads back into exactly
the model's per-chain rule lists.
"""

from __future__ import annotations

from meshnet.plan.model import HOOKS
from meshnet.state import iptables_save
from meshnet.state.iptables_save import RuleKey


def simulate_restore(text: str) -> dict[str, dict[str, list[RuleKey]]]:
    """Apply one family's restore text (`-N`, `-A`, `-I C n`, `:C` lines) to an empty iptables_save.

    Raises ValueError, naming the line, for a chain declared twice, a rule in an undeclared
    non-builtin chain, an out-of-range insert, a line outside a table, or another command.
    """
    tables: dict[str, dict[str, list[RuleKey]]] = {}
    chains: dict[str, list[RuleKey]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "COMMIT":
            chains = None
        elif line.startswith("*"):
            chains = tables.setdefault(line[1:].strip(), {})
        elif chains is None:
            raise ValueError(f"line {number}: outside a table: {line}")
        else:
            try:
                _simulate_line(chains, line)
            except ValueError as err:
                raise ValueError(f"line {number}: {err}: {line}") from None
    return tables


def _simulate_line(chains: dict[str, list[RuleKey]], line: str) -> None:
    if line.startswith(":"):
        name = line[1:].split()[0]
        if name in HOOKS:
            chains.setdefault(name, [])  # a policy line, as in iptables-save output
        else:
            _declare(chains, name)
        return
    tokens = iptables_save.split_rule(line)
    command = tokens[0]
    if command in ("-N", "--new") and len(tokens) == 2:
        _declare(chains, tokens[1])
    elif command in ("-A", "--append") and len(tokens) >= 2:
        _rule_list(chains, tokens[1]).append((tokens[1], *tokens[2:]))
    elif command in ("-I", "--insert") and len(tokens) >= 2:
        _insert(chains, tokens)
    else:
        raise ValueError(f"unsupported command {command}")


def _declare(chains: dict[str, list[RuleKey]], name: str) -> None:
    if name in HOOKS or name in chains:
        raise ValueError(f"chain {name} already exists")
    chains[name] = []


def _rule_list(chains: dict[str, list[RuleKey]], name: str) -> list[RuleKey]:
    if name not in chains:
        if name not in HOOKS:
            raise ValueError(f"chain {name} does not exist")
        chains[name] = []
    return chains[name]


def _insert(chains: dict[str, list[RuleKey]], tokens: list[str]) -> None:
    chain, rest = tokens[1], tokens[2:]
    position = 1
    if rest and rest[0].isdigit():
        position, rest = int(rest[0]), rest[1:]
    rules = _rule_list(chains, chain)
    if not 1 <= position <= len(rules) + 1:
        raise ValueError(f"index of insertion {position} out of range for {chain}")
    rules.insert(position - 1, (chain, *rest))


def state_from_restore(text: str) -> iptables_save.State:
    """The State that applying `text` to an empty namespace yields (`-I` positions resolved).

    Rules keep the restore text's spelling, so compare this with other unapplied text, not
    with iptables-save output.
    """
    tables: dict[str, dict[str, list[str]]] = {name: {} for name in iptables_save.STATE_TABLES}
    for table, chains in simulate_restore(text).items():
        if table not in tables:
            continue
        for chain, rules in chains.items():
            if rules or chain.startswith("ISTIO"):
                tables[table][chain] = [iptables_save.rule_line(rule) for rule in rules]
    return iptables_save.from_tables(tables)
