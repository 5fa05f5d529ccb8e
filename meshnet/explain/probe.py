"""A hypothetical connection, as `meshnet explain --probe` describes it.

Syntax: space- or comma-separated words; the first may be `out` (default: the pod's own
process connects somewhere) or `in` (a connection arrives at the pod), then any of:

    tcp | udp                     protocol (default tcp)
    uid=N gid=N                   the connecting process (out only; default 0)
    src=IP[:PORT] dst=IP:PORT     addresses (IPv6 in brackets: dst=[2001:db8::1]:80)
    iif=NAME oif=NAME             interfaces (default: in → eth0; out → lo for loopback or
                                  local=… destinations, else eth0)
    state=new|established|related|invalid   conntrack state (default new)
    mark=N                        packet mark already set (default 0)
    local=IP[,IP]                 the pod's own addresses (so `out` to them leaves via lo)

Examples: `out tcp uid=1000 dst=10.1.2.3:80`, `in tcp src=198.51.100.2:4000 dst=192.0.2.1:8080`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshnet.errors import OptionError
from meshnet.plan.model import Family

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FORM = (
    "expected e.g. 'out tcp uid=1000 dst=10.1.2.3:80' or "
    "'in tcp src=198.51.100.2:4000 dst=192.0.2.1:8080 iif=eth0'"
)
STATES = ("new", "established", "related", "invalid")


@dataclass(frozen=True, slots=True)
class Probe:
    direction: str  # "out" or "in"
    proto: str
    src: IPAddress | None
    sport: int
    dst: IPAddress
    dport: int
    uid: int
    gid: int
    iif: str
    oif: str
    state: str
    mark: int

    @property
    def family(self) -> Family:
        return "ipv6" if self.dst.version == 6 else "ipv4"

    def endpoint(self) -> str:
        host = f"[{self.dst}]" if self.dst.version == 6 else str(self.dst)
        return f"{host}:{self.dport}"


def parse(text: str) -> Probe:
    words = text.split()
    if not words:
        raise _bad(text, "empty probe")
    direction = "out"
    if words[0] in ("out", "in"):
        direction, words = words[0], words[1:]
    fields: dict[str, str] = {"proto": "tcp", "state": "new"}
    for word in words:
        if word in ("tcp", "udp"):
            fields["proto"] = word
            continue
        key, sep, value = word.partition("=")
        if not sep or key not in (
            "uid",
            "gid",
            "src",
            "dst",
            "iif",
            "oif",
            "state",
            "mark",
            "local",
        ):
            raise _bad(text, f"unknown word {word!r}")
        fields[key] = value
    return _build(text, direction, fields)


def _build(text: str, direction: str, fields: dict[str, str]) -> Probe:
    if "dst" not in fields:
        raise _bad(text, "dst=IP:PORT is required")
    dst, dport = _endpoint(text, fields["dst"], need_port=True)
    src, sport = _endpoint(text, fields["src"], need_port=False) if "src" in fields else (None, 0)
    if fields["state"] not in STATES:
        raise _bad(text, f"state must be one of {', '.join(STATES)}")
    local = [_address(text, a) for a in fields.get("local", "").split(",") if a]
    default_oif = "lo" if (dst.is_loopback or dst in local) else "eth0"
    return Probe(
        direction,
        fields["proto"],
        src,
        sport,
        dst,
        dport,
        _number(text, fields, "uid"),
        _number(text, fields, "gid"),
        fields.get("iif", "eth0" if direction == "in" else ""),
        fields.get("oif", default_oif if direction == "out" else ""),
        fields["state"],
        _number(text, fields, "mark"),
    )


def _endpoint(text: str, value: str, need_port: bool) -> tuple[IPAddress, int]:
    host, port = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port = value.split(":")
    if need_port and not port:
        raise _bad(text, f"{value!r} needs a port")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise _bad(text, f"bad port in {value!r}")
    return _address(text, host), int(port or 0)


def _address(text: str, value: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise _bad(text, f"{value!r} is not an IP address") from None


def _number(text: str, fields: dict[str, str], key: str) -> int:
    value = fields.get(key, "0")
    if not value.isdigit():
        raise _bad(text, f"{key} must be a number")
    return int(value)


def _bad(text: str, problem: str) -> OptionError:
    return OptionError(f"invalid --probe {text!r}: {problem}; {FORM}")
