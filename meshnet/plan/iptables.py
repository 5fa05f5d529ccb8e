"""The IR lowered to iptables rules: Istio's iptables builder's tokens, per family.

Each family gets the rules of its scope, in plan order (Istio's v4 and v6 builder lists).
Matches keep the IR's order, which is Istio's iptables order; what differs from the nft
lowering is spelled here:
- a port match needs `-p`: written before it unless the rule already matched the protocol;
- Istio's UDP DNS redirect says `--to-port` (its TCP one `--to-ports`);
- a match Istio's nft rule has and its iptables rule has not (`nft_only`) is left out.
"""

from __future__ import annotations

from meshnet.config.options import Options
from meshnet.plan import ir, steps
from meshnet.plan.ir import Match, Target
from meshnet.plan.model import FAMILIES, Rule, Ruleset

_OPTION = {"iif": "-i", "oif": "-o", "src": "-s", "dst": "-d"}
_MODULE = {"uid": ("owner", "--uid-owner"), "gid": ("owner", "--gid-owner")}
_MODULE |= {"mark": ("mark", "--mark"), "connmark": ("connmark", "--mark")}
_VERDICT = {"return": "RETURN", "accept": "ACCEPT", "drop": "DROP"}


def lower(plan: ir.Plan) -> Ruleset:
    """Both families' rules (IPv6's only when it is enabled)."""
    rules = {f: tuple(rule(r) for r in plan.for_family(f)) for f in FAMILIES}
    ipv6 = rules["ipv6"] if plan.ipv6_enabled else ()
    return Ruleset(rules["ipv4"], ipv6, plan.ipv6_enabled, plan.warnings, plan.ipsets)


def rule(source: ir.Rule) -> Rule:
    spec = (*matches(source.matches), *target(source))
    return Rule(source.table, source.chain, spec, source.reason, source.insert_at, source)


def matches(given: tuple[Match, ...]) -> list[str]:
    return [token for m in effective(given) for token in match(m)]


def effective(given: tuple[Match, ...]) -> tuple[Match, ...]:
    """The matches iptables writes: without `nft_only` ones, and with `-p` before a port match
    of a rule that did not match its protocol yet."""
    found: list[Match] = []
    has_proto = False
    for m in given:
        if m.nft_only:
            continue
        if m.kind in ("sport", "dport") and not has_proto:
            found.append(ir.proto(m.proto))
        has_proto = has_proto or m.kind in ("proto", "sport", "dport")
        found.append(m)
    return tuple(found)


def match(m: Match) -> list[str]:
    bang = ["!"] if m.negated else []
    if m.kind == "proto":
        return ["-p", m.value]
    if m.kind in _OPTION:
        return [*bang, _OPTION[m.kind], m.value]
    if m.kind == "dst-set":
        return ["-m", "set", "--match-set", m.value, "dst"]
    if m.kind in ("sport", "dport"):
        if len(m.values) > 1:
            return ["-m", "multiport", *bang, f"--{m.kind}s", ",".join(m.values)]
        return [*bang, f"--{m.kind}", m.value]
    if m.kind == "ctstate":
        return ["-m", "conntrack", "--ctstate", ",".join(m.values).upper()]
    if m.kind not in _MODULE:  # nfproto: iptables has one table per family instead
        raise ValueError(f"no iptables form for a {m.kind} match")
    module, option = _MODULE[m.kind]
    return ["-m", module, *bang, option, m.value]


def target(source: ir.Rule) -> list[str]:
    t: Target = source.target
    if t.kind == "jump":
        return ["-j", t.chain]
    if t.kind in _VERDICT:
        return ["-j", _VERDICT[t.kind]]
    if t.kind == "redirect":
        udp = any(m.proto == "udp" for m in source.matches)
        return ["-j", "REDIRECT", "--to-port" if udp else "--to-ports", t.port]
    if t.kind == "tproxy":
        return ["-j", "TPROXY", "--tproxy-mark", f"{t.mark}/0xffffffff", "--on-port", t.port]
    if t.kind == "set-mark":
        return ["-j", "MARK", "--set-mark", t.mark]
    if t.kind == "save-mark":
        return ["-j", "CONNMARK", "--save-mark"]
    if t.kind == "restore-mark":
        return ["-j", "CONNMARK", "--restore-mark"]
    return ["-j", "CT", "--zone", t.zone]


def ruleset(options: Options) -> Ruleset:
    """Istio's iptables rules for these options."""
    return lower(steps.plan(options))
