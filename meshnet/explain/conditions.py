"""The plan's typed matches and targets as predicates and actions over a probe.

Each match also tests what nft compiles in front of it (nftables src/payload.c,
payload_gen_dependency): an IPv4 address match only ever sees IPv4 packets, an IPv6 one IPv6,
a port match its protocol; the dependency is not negated by `!=`. Owner matches need the
packet's local socket (nft_meta_get_eval breaks the rule without one, `!=` included; iptables'
owner match exists only on output), so only outbound probes can match them. iptables keeps one
table per family and needs `-p` before a port, so the same predicates hold for its rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from meshnet.explain.probe import Probe
from meshnet.plan.ir import Match, Target


@dataclass(slots=True)
class Packet:
    mark: int
    ctmark: int = 0


Condition = Callable[[Probe, Packet], bool]
Action = tuple[str, int | str | None]
Sets = Mapping[str, Sequence[str]]


def conditions(matches: Sequence[Match], sets: Sets, *, nft: bool) -> tuple[Condition, ...]:
    """The predicates of a rule's matches; `nft_only` matches count in the nft plan only."""
    return tuple(condition(m, sets) for m in matches if nft or not m.nft_only)


def condition(m: Match, sets: Sets) -> Condition:
    test = _TESTS[m.kind](m, sets)
    negated = (lambda p, k: not test(p, k)) if m.negated else test
    implied = _implied(m, sets)
    if implied is None:
        return negated
    return lambda p, k: implied(p, k) and negated(p, k)


def actions(target: Target, rename: Callable[[str], str]) -> tuple[Action, ...]:
    """What the target does, in the walk's vocabulary; `rename` maps a jump's chain name to the
    lowered plan's."""
    kind = target.kind
    if kind == "jump":
        return (("jump", rename(target.chain)),)
    if kind in ("redirect", "tproxy"):
        port = (kind, int(target.port))
        return (
            (("mark", _number(target.mark)), port, ("accept", None))
            if kind == "tproxy"
            else (port,)
        )
    if kind == "set-mark":
        return (("mark", _number(target.mark)),)
    if kind == "zone":
        return (("zone", int(target.zone)),)
    return ((kind, None),)  # return, accept, drop, save-mark, restore-mark


def _number(text: str) -> int:
    return int(text.split("/")[0], 0)


def _address(which: str, cidr: str) -> Condition:
    network = ipaddress.ip_network(cidr, strict=False)

    def test(p: Probe, _k: Packet) -> bool:
        address = p.src if which == "src" else p.dst
        return address is not None and address.version == network.version and address in network

    return test


def _in_set(members: Sequence[str]) -> Condition:
    tests = [_address("dst", member) for member in members]
    return lambda p, k: any(test(p, k) for test in tests)


def _interface(m: Match, _sets: Sets) -> Condition:
    name = m.value

    def test(p: Probe, _k: Packet) -> bool:
        actual = p.iif if m.kind == "iif" else p.oif
        return actual == name or (name.endswith("+") and actual.startswith(name[:-1]))

    return test


def _port(m: Match, _sets: Sets) -> Condition:
    ports = m.values
    if m.kind == "dport":
        return lambda p, k: str(p.dport) in ports
    return lambda p, k: str(p.sport) in ports


def _owner(m: Match, _sets: Sets) -> Condition:
    expected = int(m.value) if m.value.isdigit() else None
    if m.kind == "uid":
        return lambda p, k: p.uid == expected
    return lambda p, k: p.gid == expected


def _mark(m: Match, _sets: Sets) -> Condition:
    expected = _number(m.value)
    if m.kind == "connmark":
        return lambda p, k: k.ctmark == expected
    return lambda p, k: k.mark == expected


def _family(version: int) -> Condition:
    return lambda p, k: p.dst.version == version


_TESTS: dict[str, Callable[[Match, Sets], Condition]] = {
    "proto": lambda m, s: lambda p, k: p.proto == m.value,
    "iif": _interface,
    "oif": _interface,
    "src": lambda m, s: _address("src", m.value),
    "dst": lambda m, s: _address("dst", m.value),
    "dst-set": lambda m, s: _in_set(s[m.value]),
    "sport": _port,
    "dport": _port,
    "uid": _owner,
    "gid": _owner,
    "ctstate": lambda m, s: lambda p, k: p.state in m.values,
    "mark": _mark,
    "connmark": _mark,
    "nfproto": lambda m, s: _family(6 if m.value == "ipv6" else 4),
}


def _implied(m: Match, sets: Sets) -> Condition | None:
    if m.kind in ("src", "dst"):
        return _family(ipaddress.ip_network(m.value, strict=False).version)
    if m.kind == "dst-set" and sets.get(m.value):
        return _family(ipaddress.ip_network(sets[m.value][0], strict=False).version)
    if m.kind in ("sport", "dport"):
        return lambda p, k: p.proto == m.proto
    if m.kind in ("uid", "gid"):
        return lambda p, k: p.direction == "out"
    return None
