"""Facts about the machine that options depend on, as the option builder sees them.

`System` is what the builder may ask (users, groups, interface addresses, files); the real
machine answers in `meshnet.host.system`, tests inject a fake. What Istio derives from those
facts (FillConfigFromEnvironment: the pod's IP family, resolv.conf's servers) is decided here,
purely.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Protocol

from meshnet.errors import EnvironmentFactError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class System(Protocol):
    """What the option builder may ask of the machine."""

    def user_id(self, name: str) -> int | None: ...

    def group_exists(self, name: str) -> bool: ...

    def interface_addresses(self) -> list[IPAddress]: ...

    def read_text(self, path: str) -> str: ...


@dataclass(frozen=True, slots=True)
class IpDetection:
    host_ip: IPAddress
    ipv6: bool


def detect_ip(addresses: list[IPAddress], dual_stack: bool) -> IpDetection:
    """Istio's getLocalIP: the first usable address decides, or with dual stack any IPv6 one."""
    usable = [addr for addr in (_unmap(a) for a in addresses) if _usable(addr)]
    if not usable:
        raise EnvironmentFactError(
            "no valid local IP address found (pass --enable-ipv6 true|false to skip detection)"
        )
    if not dual_stack:
        return IpDetection(usable[0], usable[0].version == 6)
    first_v6 = next((addr for addr in usable if addr.version == 6), None)
    return IpDetection(usable[0], first_v6 is not None)


def parse_resolv_conf(text: str) -> list[IPAddress]:
    """`nameserver` entries in canonical form; unparseable entries are dropped, as Istio does."""
    servers: list[IPAddress] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append(_unmap(ipaddress.ip_address(fields[1])))
            except ValueError:
                continue
    return servers


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _usable(addr: IPAddress) -> bool:
    return not (addr.is_loopback or addr.is_link_local or _is_link_local_multicast(addr))


def _is_link_local_multicast(addr: IPAddress) -> bool:
    if addr.version == 4:
        return addr in ipaddress.ip_network("224.0.0.0/24")
    return addr in ipaddress.ip_network("ff02::/16")
