"""iptables state as text: parse it, simulate a restore, decide residue/delta, explain drift.

Pure functions, no I/O. `parse_save` and `verify_state` follow Istio's GetStateFromSave
(`tools/istio-iptables/pkg/builder/iptables_builder_impl.go`) and VerifyIptablesState
(`tools/istio-iptables/pkg/capture/helper.go`) exactly, quirks included; `diff_states` is
meshnet's readable diff for `verify` and the drift error.

Rules are compared as `normalize_rule` tuples ``(CHAIN, *tokens)``. iptables-save respells
rules (`-m tcp` added, marks in hex, options reordered), so compare a plan with live state only
after putting the plan through the same tool (`IptablesRunner.canonicalize`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from meshnet.plan.model import TABLES, Rule, declared_chains

__all__ = [
    "STATE_TABLES",
    "RuleKey",
    "State",
    "check_commands",
    "combine",
    "diff_states",
    "from_tables",
    "jump_targets",
    "normalize_rule",
    "parse_save",
    "planned_checks",
    "planned_state",
    "plans_rules",
    "rule_line",
    "split_rule",
    "verify_state",
]

RuleKey = tuple[str, ...]
"""A rule as ``(CHAIN, *tokens)``, e.g. ``("ISTIO_OUTPUT", "-o", "lo", "-j", "RETURN")``."""

STATE_TABLES = ("filter", "nat", "mangle", "raw")
"""The tables GetStateFromSave knows; others (e.g. `security`) are ignored."""

_ISTIO = "ISTIO"  # chain registration prefix in GetStateFromSave
_ISTIO_CHAIN = "ISTIO_"  # prefix for the rule-count and unexpected-chain checks
_APPEND = ("-A", "--append")
_INSERT = ("-I", "--insert")
_NEW = ("-N", "--new")


@dataclass(frozen=True, slots=True)
class State:
    """table → chain → rule lines, as GetStateFromSave builds it (read-only mappings).

    filter, nat, mangle and raw are always present. ISTIO* chains appear when declared, even
    empty; other chains only when they hold rules. Lines are kept as written (``-A C ...``).
    """

    tables: Mapping[str, Mapping[str, tuple[str, ...]]]

    def chains(self, table: str) -> Mapping[str, tuple[str, ...]]:
        """The chains of `table` (empty for an unknown table)."""
        return self.tables.get(table, MappingProxyType({}))

    def rules(self, table: str, chain: str) -> tuple[str, ...]:
        """The rule lines of one chain (empty when absent)."""
        return self.chains(table).get(chain, ())

    @property
    def is_empty(self) -> bool:
        """No chain in any table: Istio's "no residue" / "nothing expected"."""
        return not any(self.tables.values())

    def istio_chains(self) -> list[tuple[str, str]]:
        """(table, chain) for every ISTIO_* chain, in table then chain order."""
        return [
            (table, chain)
            for table, chains in self.tables.items()
            for chain in chains
            if chain.startswith(_ISTIO_CHAIN)
        ]


def parse_save(text: str) -> State:
    """Istio's GetStateFromSave, for iptables-save output or restore text."""
    tables: dict[str, dict[str, list[str]]] = {name: {} for name in STATE_TABLES}
    table = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        chains = tables.get(table)
        if chains is None:
            continue  # a table Istio does not track, e.g. security
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name.startswith(_ISTIO):
                chains.setdefault(name, [])
            continue
        _record_line(chains, line)
    return from_tables(tables)


def _record_line(chains: dict[str, list[str]], line: str) -> None:
    tokens = line.split(" ")  # Istio splits on single spaces
    for index, token in enumerate(tokens[:-1]):
        name = tokens[index + 1].strip("'\"")
        if token in _APPEND or token in _INSERT:
            chains.setdefault(name, []).append(line)
            return
        if token in _NEW:
            if name.startswith(_ISTIO):
                chains.setdefault(name, [])
            return


def planned_state(rules: Sequence[Rule]) -> State:
    """What GetStateFromSave reads from the restore text of these planned rules, built from the
    rules themselves: per table (restore order), the declared ISTIO* chains, then each rule's
    line under its chain."""
    tables: dict[str, dict[str, list[str]]] = {name: {} for name in STATE_TABLES}
    declared = declared_chains(rules)
    for table in TABLES:
        chains = tables[table]
        for chain in declared.get(table, []):
            if chain.startswith(_ISTIO):
                chains.setdefault(chain, [])
        for rule in rules:
            if rule.table == table:
                chains.setdefault(rule.chain, []).append(rule.line())
    return from_tables(tables)


def planned_checks(rules: Sequence[Rule]) -> list[tuple[str, ...]]:
    """Istio's BuildCheckVx for planned rules: ``-t TABLE -C CHAIN ...``, restore order."""
    return [("-t", r.table, "-C", r.chain, *r.spec) for t in TABLES for r in rules if r.table == t]


def from_tables(tables: Mapping[str, Mapping[str, Iterable[str]]]) -> State:
    return State(
        MappingProxyType(
            {
                table: MappingProxyType({chain: tuple(lines) for chain, lines in chains.items()})
                for table, chains in tables.items()
            }
        )
    )


def jump_targets(lines: Iterable[str]) -> set[str]:
    """The ISTIO_* chains that rule lines jump to (spelt the same in plans and in saves)."""
    targets = set()
    for line in lines:
        tokens = line.split()
        if "-j" in tokens[:-1] and tokens[tokens.index("-j") + 1].startswith("ISTIO_"):
            targets.add(tokens[tokens.index("-j") + 1])
    return targets


def split_rule(line: str) -> list[str]:
    """Split one rule line as iptables-restore does: whitespace separates, "..." groups.

    Inside double quotes a backslash escapes the next character; single quotes are literal.
    """
    tokens: list[str] = []
    current: list[str] = []
    quoted = escaped = pending = False
    for char in line:
        if quoted:
            if escaped:
                current.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            else:
                current.append(char)
        elif char == '"':
            quoted = pending = True
        elif char.isspace():
            if current or pending:
                tokens.append("".join(current))
            current, pending = [], False
        else:
            current.append(char)
    if quoted:
        raise ValueError(f"unterminated quote in rule: {line}")
    if current or pending:
        tokens.append("".join(current))
    return tokens


def normalize_rule(line: str) -> RuleKey:
    """``-A C rest`` / ``-I C [N] rest`` → ``(C, *rest)``; a leading ``-t TABLE`` is dropped."""
    tokens = split_rule(line)
    for index, token in enumerate(tokens[:-1]):
        if token in _APPEND or token in _INSERT:
            chain = tokens[index + 1]
            rest = tokens[index + 2 :]
            if token in _INSERT and rest and rest[0].isdigit():
                rest = rest[1:]
            return (chain, *_drop_table_option(tokens[:index]), *rest)
    raise ValueError(f"not an -A or -I rule: {line}")


def _drop_table_option(tokens: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for token in tokens:
        if skip:
            skip = False
        elif token in ("-t", "--table"):
            skip = True
        else:
            kept.append(token)
    return kept


def check_commands(restore_text: str) -> list[tuple[str, ...]]:
    """Istio's BuildCheckVx: ``-t TABLE -C CHAIN ...`` for every -A/-I rule, position dropped."""
    commands: list[tuple[str, ...]] = []
    table = ""
    for raw in restore_text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(_APPEND + _INSERT):
            chain, *rest = normalize_rule(line)
            commands.append(("-t", table, "-C", chain, *rest))
    return commands


def plans_rules(restore_text: str) -> bool:
    """Whether a family's restore text declares any chain (Istio's !emptyExpected)."""
    return not parse_save(restore_text).is_empty


def verify_state(
    expected_restore_text: str,
    save_text: str | None,
    check: Callable[[tuple[str, ...]], bool],
) -> tuple[bool, bool]:
    """(residue, delta) for one family, as one pass of VerifyIptablesState's per-family loop.

    `save_text` None means the save failed (treated as a clean state). `check` runs one
    `check_commands` argument tuple (e.g. ``IptablesRunner.check``) and says whether it passed;
    it is only called when residue exists and the chain structure already matches.
    """
    expected = parse_save(expected_restore_text)
    if save_text is None:
        return False, not expected.is_empty
    current = parse_save(save_text)
    if current.is_empty:  # any chain, foreign ones included, counts as residue
        return False, not expected.is_empty
    delta = _structure_differs(expected, current) or not all(
        check(command) for command in check_commands(expected_restore_text)
    )
    return True, delta


def _structure_differs(expected: State, current: State) -> bool:
    for table, chains in expected.tables.items():
        if table not in current.tables:
            return True
        for chain, rules in chains.items():
            if chain not in current.chains(table):
                return True
            if chain.startswith(_ISTIO_CHAIN) and len(rules) != len(current.rules(table, chain)):
                return True
    return any(chain not in expected.chains(table) for table, chain in current.istio_chains())


def combine(families: Iterable[tuple[bool, bool, bool]]) -> tuple[bool, bool]:
    """Istio's global verdict from per-family ``(residue, delta, plans_rules)`` (§3.5 steps 4-5).

    Residue in a family with nothing planned is ignored. No residue anywhere gives
    (False, True): clean state, apply. Otherwise (True, any delta).
    """
    residue = delta = False
    for family_residue, family_delta, planned in families:
        residue = residue or (family_residue and planned)
        delta = delta or family_delta
    if not residue:
        return False, True
    return True, delta


def diff_states(expected: State, current: State) -> list[str]:
    """Readable drift lines, per table and chain; empty when `current` matches `expected`.

    ISTIO_* chains must match exactly (missing, unexpected and out-of-order rules reported);
    other chains may hold foreign rules, but the expected ones must be there in order.
    """
    lines: list[str] = []
    for table in _tables_in_order(expected, current):
        lines.extend(_diff_table(table, expected.chains(table), current.chains(table)))
    return lines


def _tables_in_order(*states: State) -> list[str]:
    names = {table for state in states for table in state.tables}
    known = [table for table in TABLES if table in names]
    return known + sorted(names - set(known))


def _diff_table(
    table: str,
    expected: Mapping[str, tuple[str, ...]],
    current: Mapping[str, tuple[str, ...]],
) -> Iterator[str]:
    for chain, lines in expected.items():
        want = [normalize_rule(line) for line in lines]
        have = [normalize_rule(line) for line in current.get(chain, ())]
        if chain not in current and chain.startswith(_ISTIO):
            yield f"{table}: missing chain {chain}"
            yield from (f"{table} {chain}: missing rule: {rule_line(r)}" for r in want)
        elif chain.startswith(_ISTIO):
            yield from _diff_owned_chain(table, chain, want, have)
        else:
            yield from _diff_shared_chain(table, chain, want, have)
    for chain in current:
        if chain.startswith(_ISTIO_CHAIN) and chain not in expected:
            yield f"{table}: unexpected chain {chain}"


def _diff_owned_chain(
    table: str, chain: str, want: list[RuleKey], have: list[RuleKey]
) -> Iterator[str]:
    """An ISTIO chain: exactly the expected rules, in order."""
    missing = Counter(want) - Counter(have)
    extra = Counter(have) - Counter(want)
    yield from (f"{table} {chain}: missing rule: {rule_line(r)}" for r in missing.elements())
    yield from (f"{table} {chain}: unexpected rule: {rule_line(r)}" for r in extra.elements())
    common_want = _without(want, missing)
    common_have = _without(have, extra)
    yield from _order_message(table, chain, common_want, common_have)


def _diff_shared_chain(
    table: str, chain: str, want: list[RuleKey], have: list[RuleKey]
) -> Iterator[str]:
    """A built-in (shared) chain: foreign rules are fine; ours must be present and in order."""
    missing = Counter(want) - Counter(have)
    yield from (f"{table} {chain}: missing rule: {rule_line(r)}" for r in missing.elements())
    present = _without(want, missing)
    ours = Counter(present)
    in_current: list[RuleKey] = []
    for rule in have:
        if ours[rule] > 0:
            ours[rule] -= 1
            in_current.append(rule)
    yield from _order_message(table, chain, present, in_current)


def _without(rules: list[RuleKey], drop: Counter[RuleKey]) -> list[RuleKey]:
    remaining = Counter(drop)
    kept: list[RuleKey] = []
    for rule in rules:
        if remaining[rule] > 0:
            remaining[rule] -= 1
        else:
            kept.append(rule)
    return kept


def _order_message(
    table: str, chain: str, want: list[RuleKey], have: list[RuleKey]
) -> Iterator[str]:
    for position, (wanted, found) in enumerate(zip(want, have, strict=True), start=1):
        if wanted != found:
            yield (
                f"{table} {chain}: rules out of order at planned rule #{position}: "
                f"expected {rule_line(wanted)}, found {rule_line(found)}"
            )
            return


def rule_line(rule: RuleKey) -> str:
    """``-A CHAIN ...``, quoting tokens that need it as iptables-save does."""
    return " ".join(("-A", *(_quote(token) for token in rule)))


def _quote(token: str) -> str:
    if token and not any(char.isspace() or char in "\"\\'" for char in token):
        return token
    escaped = token.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
