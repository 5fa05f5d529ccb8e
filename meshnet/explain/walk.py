"""Walk one hypothetical connection through a planned rule set, the way netfilter would.

Locally generated traffic (`out`) crosses the raw, mangle and nat OUTPUT hooks; arriving
traffic (`in`) crosses raw, mangle and nat PREROUTING (priority order -300, -150, -100, for
iptables and nftables alike). nat sees only the first packet of a connection. The walk follows
jumps, returns and falling off a chain, applies the marks and zones that rules set, and ends in
a verdict: REDIRECT to a port, TPROXY to a port, dropped, or not captured.

Both lowered plans are walked through the typed rules they were lowered from
(`meshnet.explain.conditions`), in each plan's own tables, chains and final rule order, so the
walk itself is shared and no rule text is parsed back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from meshnet.explain import conditions as cond
from meshnet.explain.conditions import Action, Condition, Packet
from meshnet.explain.probe import Probe
from meshnet.plan import ir, nftables
from meshnet.plan.model import Rule, Ruleset
from meshnet.plan.nftables import NftRule, NftRuleset, chain_name


@dataclass(frozen=True, slots=True)
class ParsedRule:
    text: str
    reason: str
    conditions: tuple[Condition, ...]
    actions: tuple[Action, ...]


Chains = Mapping[str, Sequence[ParsedRule]]  # one table: chain -> rules in final order


@dataclass(frozen=True, slots=True)
class Step:
    table: str
    chain: str
    number: int  # 1-based position of the rule in its chain
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # "redirect", "tproxy", "drop", "none"
    port: int | None = None
    original_dst: str | None = None

    def describe(self) -> str:
        if self.kind == "redirect":
            return f"captured: REDIRECT to :{self.port} (original destination {self.original_dst})"
        if self.kind == "tproxy":
            return (
                f"captured: TPROXY to :{self.port} (original destination "
                f"{self.original_dst}, source address kept)"
            )
        return "dropped" if self.kind == "drop" else "not captured"


@dataclass(frozen=True, slots=True)
class Explanation:
    probe: Probe
    backend: str
    path: tuple[Step, ...]
    verdict: Verdict


@dataclass(slots=True)
class _Walk:
    probe: Probe
    packet: Packet
    path: list[Step] = field(default_factory=list)
    verdict: Verdict | None = None


def explain_iptables(ruleset: Ruleset, probe: Probe) -> Explanation:
    tables: dict[str, Chains] = {}
    sets = {s.name: s.members for s in ruleset.ipsets}
    if probe.family == "ipv4" or ruleset.ipv6_enabled:
        tables = {
            table: {
                chain: [_iptables_rule(rule, sets) for rule in rules]
                for chain, rules in chains.items()
            }
            for table, chains in ruleset.chains(probe.family).items()
        }
    hook = "OUTPUT" if probe.direction == "out" else "PREROUTING"
    order = [(name, tables.get(name, {}), hook) for name in ("raw", "mangle", "nat")]
    return _run("iptables", order, probe)


def explain_nft(ruleset: NftRuleset, probe: Probe) -> Explanation:
    hook = "output" if probe.direction == "out" else "prerouting"
    chains = ruleset.chains()
    sets = {s.name: s.members for t in ruleset.tables for s in t.sets}
    order = []
    for short, table in _NFT_TABLES.items():
        parsed = {
            chain: [_nft_rule(rule, sets) for rule in rules]
            for chain, rules in chains.get(table, {}).items()
        }
        order.append((short, parsed, hook))
    return _run("nftables", order, probe, names=_NFT_TABLES)


_NFT_TABLES = {"raw": nftables.RAW, "mangle": nftables.MANGLE, "nat": nftables.NAT}


def _iptables_rule(rule: Rule, sets: cond.Sets) -> ParsedRule:
    source = ir.planned(rule.source)
    conditions = cond.conditions(source.matches, sets, nft=False)
    actions = cond.actions(source.target, lambda chain: chain)
    return ParsedRule(" ".join(rule.append_form()), rule.reason, conditions, actions)


def _nft_rule(rule: NftRule, sets: cond.Sets) -> ParsedRule:
    source = ir.planned(rule.source)
    conditions = cond.conditions(source.matches, sets, nft=True)
    actions = cond.actions(source.target, chain_name)
    return ParsedRule(rule.text, rule.reason, conditions, actions)


def _run(
    backend: str,
    order: Sequence[tuple[str, Chains, str]],
    probe: Probe,
    names: Mapping[str, str] | None = None,
) -> Explanation:
    walk = _Walk(probe, Packet(mark=probe.mark))
    for short, chains, hook in order:
        if short == "nat" and probe.state != "new":
            continue  # nat only sees the first packet of a connection
        _chain((names or {}).get(short, short), chains, hook, walk)
        if walk.verdict is not None and walk.verdict.kind in ("drop", "redirect"):
            break
    return Explanation(probe, backend, tuple(walk.path), walk.verdict or Verdict("none"))


def _chain(table: str, chains: Chains, chain: str, walk: _Walk) -> str:
    """Run one chain: "return" (RETURN or fell off the end) or "stop" (a verdict for the hook)."""
    for number, rule in enumerate(chains.get(chain, ()), start=1):
        if not all(condition(walk.probe, walk.packet) for condition in rule.conditions):
            continue
        walk.path.append(Step(table, chain, number, rule.text, rule.reason))
        outcome = _actions(table, chains, rule.actions, walk)
        if outcome != "continue":
            return outcome
    return "return"


def _actions(table: str, chains: Chains, actions: Sequence[Action], walk: _Walk) -> str:
    for action in actions:
        kind, value = action
        if kind == "return":
            return "return"
        if kind == "accept":
            return "stop"
        if kind == "drop":
            walk.verdict = Verdict("drop")
            return "stop"
        if kind in ("redirect", "tproxy"):
            port = value if isinstance(value, int) else None
            walk.verdict = Verdict(kind, port, walk.probe.endpoint())
            if kind == "redirect":
                return "stop"
        elif kind == "jump" and isinstance(value, str):
            if _chain(table, chains, value, walk) == "stop":
                return "stop"
        elif kind in _EFFECTS:
            _EFFECTS[kind](walk.packet, value)
    return "continue"


def _set_mark(packet: Packet, value: int | str | None) -> None:
    packet.mark = int(value or 0)


def _save_mark(packet: Packet, _value: int | str | None) -> None:
    packet.ctmark = packet.mark


def _restore_mark(packet: Packet, _value: int | str | None) -> None:
    packet.mark = packet.ctmark


_EFFECTS: dict[str, Callable[[Packet, int | str | None], None]] = {
    "mark": _set_mark,
    "save-mark": _save_mark,
    "restore-mark": _restore_mark,
}


def render_text(result: Explanation) -> str:
    p = result.probe
    who = f" uid={p.uid} gid={p.gid}" if p.direction == "out" else ""
    iface = f"oif={p.oif}" if p.direction == "out" else f"iif={p.iif}"
    lines = [
        f"probe: {p.direction} {p.proto}{who} {iface} state={p.state} → {p.endpoint()} "
        f"({p.family}, {result.backend} plan)"
    ]
    if not result.path:
        lines.append("  no rule matched")
    for step in result.path:
        lines.append(f"  {step.table} {step.chain}#{step.number}: {step.rule}")
        lines.append(f"      why: {step.reason}")
    lines.append(f"verdict: {result.verdict.describe()}")
    return "\n".join(lines) + "\n"


def render_json(result: Explanation) -> dict[str, object]:
    v = result.verdict
    return {
        "probe": {
            "direction": result.probe.direction,
            "proto": result.probe.proto,
            "dst": result.probe.endpoint(),
            "family": result.probe.family,
        },
        "backend": result.backend,
        "path": [
            {
                "table": s.table,
                "chain": s.chain,
                "number": s.number,
                "rule": s.rule,
                "reason": s.reason,
            }
            for s in result.path
        ],
        "verdict": {
            "kind": v.kind,
            "port": v.port,
            "original_dst": v.original_dst,
            "text": v.describe(),
        },
    }
