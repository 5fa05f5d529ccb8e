"""The rule languages `explain` reads back: iptables tokens and nft statements.

Each rule becomes conditions (predicates over the probe and the packet's marks) and actions
(`jump`, `return`, `accept`, `drop`, `redirect`, `tproxy`, `mark`, `save-mark`,
`restore-mark`, `zone`). Only the vocabulary meshnet's planners emit is understood; anything
else is an error, so a new rule shape cannot be silently misread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from meshnet.probe import Probe


@dataclass(slots=True)
class Packet:
    mark: int
    ctmark: int = 0


Condition = Callable[[Probe, Packet], bool]
Action = tuple[str, int | str | None]


# --- predicates shared by both languages ------------------------------------------------


def _negate(test: Condition, negated: bool) -> Condition:
    return (lambda p, k: not test(p, k)) if negated else test


def _proto(value: str) -> Condition:
    return lambda p, k: p.proto == value


def _address(which: str, cidr: str) -> Condition:
    network = ipaddress.ip_network(cidr, strict=False)

    def test(p: Probe, _k: Packet) -> bool:
        address = p.src if which == "src" else p.dst
        return address is not None and address.version == network.version and address in network

    return test


def _interface(which: str, name: str) -> Condition:
    def test(p: Probe, _k: Packet) -> bool:
        actual = p.iif if which == "iif" else p.oif
        return actual == name or (name.endswith("+") and actual.startswith(name[:-1]))

    return test


def _port(which: str, ports: Sequence[str]) -> Condition:
    def test(p: Probe, _k: Packet) -> bool:
        actual = p.dport if which == "dport" else p.sport
        return str(actual) in ports

    return test


def _owner(which: str, value: str) -> Condition:
    def test(p: Probe, _k: Packet) -> bool:
        owner = p.uid if which == "uid" else p.gid
        return p.direction == "out" and value.isdigit() and int(value) == owner

    return test


def _state(states: str) -> Condition:
    return lambda p, k: p.state in states.lower().split(",")


def _in_set(members: Sequence[str]) -> Condition:
    tests = [_address("dst", member) for member in members]
    return lambda p, k: any(test(p, k) for test in tests)


def _mark(value: str, conntrack: bool) -> Condition:
    expected = int(value.split("/")[0], 0)
    return lambda p, k: (k.ctmark if conntrack else k.mark) == expected


# --- iptables -------------------------------------------------------------------------------


def parse_iptables(
    spec: Sequence[str], sets: Mapping[str, Sequence[str]] | None = None
) -> tuple[list[Condition], list[Action]]:
    conditions: list[Condition] = []
    negated = False
    module = ""
    index = 0
    while index < len(spec):
        token = spec[index]
        if token == "!":
            negated = True
        elif token == "--match-set":  # --match-set NAME dst (meshnet's --cidr-sets)
            members = (sets or {})[spec[index + 1]]
            conditions.append(_negate(_in_set(members), negated))
            negated, index = False, index + 2
        elif token == "-j":
            return conditions, _iptables_target(spec[index + 1], spec[index + 2 :])
        elif token == "-m":
            module, index = spec[index + 1], index + 1
        else:
            conditions.append(_negate(_iptables_match(token, spec[index + 1], module), negated))
            negated, index = False, index + 1
        index += 1
    return conditions, []


def _iptables_match(option: str, value: str, module: str) -> Condition:
    if option == "-p":
        return _proto(value)
    if option in ("-s", "-d"):
        return _address("src" if option == "-s" else "dst", value)
    if option in ("-i", "-o"):
        return _interface("iif" if option == "-i" else "oif", value)
    if option in ("--dport", "--sport"):
        return _port(option[2:], [value])
    if option == "--dports":
        return _port("dport", value.split(","))
    if option in ("--uid-owner", "--gid-owner"):
        return _owner(option[2:5], value)
    if option == "--ctstate":
        return _state(value)
    if option == "--mark":
        return _mark(value, conntrack=module == "connmark")
    raise ValueError(f"explain does not know the iptables match {option}")


def _iptables_target(target: str, args: Sequence[str]) -> list[Action]:
    options = dict(zip(args[::2], args[1::2], strict=False))
    if target in ("RETURN", "ACCEPT", "DROP"):
        return [(target.lower(), None)]
    if target == "REDIRECT":
        return [("redirect", int(options.get("--to-ports") or options["--to-port"]))]
    if target == "TPROXY":
        mark = int(options["--tproxy-mark"].split("/")[0], 0)
        return [("mark", mark), ("tproxy", int(options["--on-port"])), ("accept", None)]
    if target == "MARK":
        return [("mark", int(options["--set-mark"].split("/")[0], 0))]
    if target == "CONNMARK":
        return [("save-mark" if "--save-mark" in args else "restore-mark", None)]
    if target == "CT":
        return [("zone", int(options["--zone"]))]
    return [("jump", target)]


# --- nftables -------------------------------------------------------------------------------


def _family(version: int) -> Condition:
    return lambda p, k: p.dst.version == version


def _outbound(p: Probe, _k: Packet) -> bool:
    return p.direction == "out"


# What nft compiles in front of a match (nftables src/payload.c, payload_gen_dependency): an
# `ip ...` match only ever sees IPv4 packets, `ip6 ...` IPv6, `tcp dport` TCP. The dependency is
# not negated by `!=` nor widened by a set: `ip daddr != 127.0.0.1/32` never matches IPv6.
# `meta l4proto`, `meta nfproto` and `th dport` carry none. `meta skuid`/`skgid` need the
# packet's local socket (nft_meta_get_eval breaks the rule without one, `!=` included), so only
# outbound probes can match them. Keyed by the selector's first word, `meta` left out.
_IMPLIED: dict[str, Condition] = {
    "ip": _family(4),
    "ip6": _family(6),
    "tcp": _proto("tcp"),
    "udp": _proto("udp"),
    "skuid": _outbound,
    "skgid": _outbound,
}
_SELECTORS = {
    ("meta", "l4proto"),
    ("meta", "nfproto"),
    ("tcp", "dport"),
    ("udp", "dport"),
    ("tcp", "sport"),
    ("udp", "sport"),
    ("th", "dport"),
    ("th", "sport"),
    ("ip", "saddr"),
    ("ip", "daddr"),
    ("ip", "protocol"),
    ("ip6", "saddr"),
    ("ip6", "daddr"),
    ("ip6", "nexthdr"),
    ("ct", "state"),
    ("ct", "mark"),
    ("meta", "skuid"),
    ("meta", "skgid"),
    ("meta", "mark"),
}
_SINGLE = {"oifname", "iifname", "skuid", "skgid", "mark"}
_NFPROTO = {"ipv4": 4, "ipv6": 6}


def parse_nft(
    spec: Sequence[str], sets: Mapping[str, Sequence[str]] | None = None
) -> tuple[list[Condition], list[Action]]:
    tokens = list(spec)
    conditions: list[Condition] = []
    actions: list[Action] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        pair = (token, tokens[index + 1]) if index + 1 < len(tokens) else (token, "")
        if token == "counter":
            index += 1
        elif _is_statement(tokens, index):
            action, index = _nft_statement(tokens, index)
            actions.append(action)
        elif pair in _SELECTORS or token in _SINGLE:
            width = 2 if pair in _SELECTORS else 1
            condition, index = _nft_match(tokens, index, width, sets or {})
            conditions.append(condition)
        else:
            action, index = _nft_verdict(tokens, index)
            actions.append(action)
    return conditions, actions


def _is_statement(tokens: Sequence[str], index: int) -> bool:
    window = tokens[index : index + 3]
    return (len(window) == 3 and window[2] == "set") or tokens[index : index + 2] == ["ct", "zone"]


def _nft_statement(tokens: Sequence[str], index: int) -> tuple[Action, int]:
    what = (tokens[index], tokens[index + 1])
    value = tokens[index + 3]
    if what == ("ct", "zone"):
        return ("zone", int(value)), index + 4
    if what == ("ct", "mark"):  # ct mark set mark
        return ("save-mark", None), index + 4
    if value == "ct":  # meta mark set ct mark
        return ("restore-mark", None), index + 5
    return ("mark", int(value, 0)), index + 4


def _nft_match(
    tokens: Sequence[str], index: int, width: int, sets: Mapping[str, Sequence[str]]
) -> tuple[Condition, int]:
    selector = tokens[index : index + width]
    index += width
    negated = tokens[index] == "!="
    index += negated
    if tokens[index] == "{":
        end = tokens.index("}", index)
        values = [t.rstrip(",") for t in tokens[index + 1 : end]]
        index = end + 1
    else:
        values, index = [tokens[index]], index + 1
    if values[0].startswith("@"):  # a named set (meshnet's --cidr-sets)
        test = _in_set(sets[values[0][1:]])
    else:
        test = _nft_condition(selector, values)
    test = _negate(test, negated)
    implied = _IMPLIED.get(selector[-1] if selector[0] == "meta" else selector[0])
    if implied is None:
        return test, index
    return (lambda p, k: implied(p, k) and test(p, k)), index


def _nft_condition(selector: Sequence[str], values: list[str]) -> Condition:
    head = selector[0]
    key = selector[-1]
    if key in ("l4proto", "protocol", "nexthdr"):
        return lambda p, k: p.proto in values
    if key == "nfproto":
        versions = [_NFPROTO[value] for value in values]
        return lambda p, k: p.dst.version in versions
    if key in ("dport", "sport"):
        return _port(key, values)
    if key in ("saddr", "daddr"):
        tests = [_address("src" if key == "saddr" else "dst", value) for value in values]
        return lambda p, k: any(test(p, k) for test in tests)
    if key in ("oifname", "iifname"):
        return _interface(key[:3], values[0].strip('"'))
    if key in ("skuid", "skgid"):
        return _owner(key[2:], values[0])
    if key == "state":
        return _state(values[0])
    if key == "mark":
        return _mark(values[0], conntrack=head == "ct")
    raise ValueError(f"explain does not know the nft match {' '.join(selector)}")


def _nft_verdict(tokens: Sequence[str], index: int) -> tuple[Action, int]:
    token = tokens[index]
    if token in ("return", "accept", "drop"):
        return (token, None), index + 1
    if token == "jump":
        return ("jump", tokens[index + 1]), index + 2
    if token == "redirect":  # redirect to :PORT
        return ("redirect", int(tokens[index + 2].lstrip(":"))), index + 3
    if token == "tproxy":  # tproxy ip to :PORT
        return ("tproxy", int(tokens[index + 3].lstrip(":"))), index + 4
    raise ValueError(f"explain does not know the nft statement {token!r}")
